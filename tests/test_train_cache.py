"""The shared training loop and its on-disk model cache."""
import torch

from bench.train import ModelCache, model_key, key_hash, train_embedding
from bench.data import load_benchmark


def test_cache_reuses_trained_model(smoke_cfg, tmp_path):
    data = load_benchmark(smoke_cfg)
    cache = ModelCache(tmp_path / "models", smoke_cfg, data.train_id, torch.device("cpu"))
    m1, info1, cached1 = cache.get(seed=0)
    assert not cached1 and cache.trained == 1
    fresh = ModelCache(tmp_path / "models", smoke_cfg, data.train_id, torch.device("cpu"))
    m2, info2, cached2 = fresh.get(seed=0)
    assert cached2 and fresh.trained == 0, "a second cache on the same folder must not retrain"
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert info2["seconds"] == info1["seconds"]  # the recorded cost travels with the model


def test_cache_key_changes_with_what_determines_the_weights(smoke_cfg):
    base = key_hash(model_key(smoke_cfg, (32,), 400, 0, 0.0))
    assert key_hash(model_key(smoke_cfg, (32,), 400, 1, 0.0)) != base
    assert key_hash(model_key(smoke_cfg, (32,), 400, 0, 0.1)) != base
    assert key_hash(model_key(smoke_cfg.replace(backbone="other"), (32,), 400, 0, 0.0)) != base
    assert key_hash(model_key(smoke_cfg.replace(epochs=2), (32,), 400, 0, 0.0)) != base
    assert key_hash(model_key(smoke_cfg.replace(quiet=False, out="elsewhere"), (32,), 400, 0, 0.0)) == base


def test_training_is_seeded_and_lowers_the_loss(smoke_cfg):
    data = load_benchmark(smoke_cfg)
    cfg = smoke_cfg.replace(epochs=3)
    a, info = train_embedding(cfg, data.train_id, torch.device("cpu"), seed=0)
    b, _ = train_embedding(cfg, data.train_id, torch.device("cpu"), seed=0)
    c, _ = train_embedding(cfg, data.train_id, torch.device("cpu"), seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert info["loss_history"][-1] < info["loss_history"][0]


def test_corrupt_cache_entry_is_retrained(smoke_cfg, tmp_path):
    data = load_benchmark(smoke_cfg)
    cache = ModelCache(tmp_path / "models", smoke_cfg, data.train_id, torch.device("cpu"))
    cache.get(seed=0)
    for p in (tmp_path / "models").glob("*.pt"):
        p.write_bytes(b"garbage")
    again = ModelCache(tmp_path / "models", smoke_cfg, data.train_id, torch.device("cpu"))
    _, _, cached = again.get(seed=0)
    assert not cached and again.trained == 1


def _trained_in_child(args) -> int:
    root, cfg = args
    cache = ModelCache(root, cfg, load_benchmark(cfg).train_id, torch.device("cpu"))
    cache.get(seed=0)
    return cache.trained


def test_concurrent_processes_train_a_model_once(smoke_cfg, tmp_path):
    """Two processes (e.g. two grid cells) asking for the same model: one trains, the other waits and loads."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
        counts = list(pool.map(_trained_in_child, [(tmp_path / "models", smoke_cfg)] * 2))
    assert sorted(counts) == [0, 1]
