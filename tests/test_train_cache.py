"""The shared training loop and its on-disk model cache."""

import pytest
import torch

from bench.data import load_benchmark
from bench.model_cache import ModelCache, key_hash, model_key
from bench.train import train_embedding


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
    assert key_hash(model_key(smoke_cfg.replace(distance="cosine"), (32,), 400, 0, 0.0)) != base
    assert key_hash(model_key(smoke_cfg.replace(weight_decay=0.5), (32,), 400, 0, 0.0)) != base
    assert key_hash(model_key(smoke_cfg.replace(quiet=False, out="elsewhere"), (32,), 400, 0, 0.0)) == base


def _key_with_edited_source(monkeypatch, cfg, module: str, edit, recipe=None) -> str:
    """The key hash after `edit` (source -> source) is applied to the source of `module`."""
    import inspect

    import bench.model_cache as cache

    real = inspect.getsource
    monkeypatch.setattr(
        cache.inspect, "getsource", lambda m: edit(real(m)) if m.__name__ == module else real(m)
    )
    try:
        return key_hash(model_key(cfg, (32,), 400, 0, 0.0, recipe))
    finally:
        monkeypatch.setattr(cache.inspect, "getsource", real)


@pytest.mark.parametrize(
    "module", ["bench.train", "bench.optim", "bench.loss", "bench.model", "backbones.mlp"]
)
def test_cache_key_changes_with_the_training_code(smoke_cfg, monkeypatch, module):
    """Changed code that trains (loop, optimiser, loss, miner emulation, builder, the backbone's module)
    gives a new key; the same code, or only comments and docstrings changed, gives the same key."""
    import backbones.mlp  # noqa: F401  (the backbone's module is imported when it is registered)

    base = key_hash(model_key(smoke_cfg, (32,), 400, 0, 0.0))
    assert key_hash(model_key(smoke_cfg, (32,), 400, 0, 0.0)) == base
    assert _key_with_edited_source(monkeypatch, smoke_cfg, module, lambda s: s + "\nX_CHANGED = 1\n") != base
    assert _key_with_edited_source(monkeypatch, smoke_cfg, module, lambda s: s + "\n# a comment\n") == base
    redoc = lambda s: s.replace('"""', '"""Reworded. ', 1)  # noqa: E731  (the module docstring)
    assert _key_with_edited_source(monkeypatch, smoke_cfg, module, redoc) == base


def test_cache_key_of_a_recipe_covers_its_modules(smoke_cfg, monkeypatch):
    """A method's own net is keyed on the modules of its build and loss too (here HIB's)."""
    from bench.registry import METHODS
    from bench.train import Recipe

    method = METHODS.get("hib")(smoke_cfg)
    recipe = Recipe(name="hib", build=method.build, loss=method.batch_loss)  # as `fit` builds it
    base = key_hash(model_key(smoke_cfg, (32,), 400, 0, 0.0, recipe))
    for module in ("methods.hib", "methods._gaussian"):  # the loss's and the builder's modules
        assert (
            _key_with_edited_source(monkeypatch, smoke_cfg, module, lambda s: s + "\nY = 2\n", recipe) != base
        )
    assert base != key_hash(model_key(smoke_cfg, (32,), 400, 0, 0.0))


def test_training_is_seeded_and_lowers_the_loss(smoke_cfg):
    data = load_benchmark(smoke_cfg)
    cfg = smoke_cfg.replace(epochs=3)
    a, info = train_embedding(cfg, data.train_id, torch.device("cpu"), seed=0)
    b, _ = train_embedding(cfg, data.train_id, torch.device("cpu"), seed=0)
    c, _ = train_embedding(cfg, data.train_id, torch.device("cpu"), seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert info["loss_history"][-1] < info["loss_history"][0]


def test_weight_decay_shrinks_the_trained_weights(smoke_cfg):
    """cfg.weight_decay reaches the shared optimiser: the same seed and data give smaller weights."""
    cfg = smoke_cfg.replace(epochs=3)
    data = load_benchmark(cfg)
    norm = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()]).norm()  # noqa: E731
    plain, _ = train_embedding(cfg, data.train_id, torch.device("cpu"), seed=0)
    decayed, _ = train_embedding(cfg.replace(weight_decay=0.5), data.train_id, torch.device("cpu"), seed=0)
    assert norm(decayed) < 0.99 * norm(plain)


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
    """Two processes (e.g. two grid cells) asking for the same model: one trains, the other waits and
    loads."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
        counts = list(pool.map(_trained_in_child, [(tmp_path / "models", smoke_cfg)] * 2))
    assert sorted(counts) == [0, 1]


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_vectorised_loss_equals_pml_loss_and_gradients(distance):
    """The training loss (vectorised miner + reducer weights) against PML's ContrastiveLoss and
    TripletMarginMiner on the same batches: values and gradients equal up to float rounding,
    including batches with no or one mined triplet (PML's zero loss). For cosine the reference is
    PML with its own defaults (ContrastiveLoss(), TripletMarginMiner(margin=0.2), default LpDistance)."""
    from pytorch_metric_learning import losses, miners

    from bench.config import preset_config
    from bench.loss import batched_contrastive_loss, make_loss_and_miner

    cfg = preset_config("paper").replace(distance=distance)
    loss_fn, miner = make_loss_and_miner(cfg)
    if distance == "cosine":
        loss_fn, miner = (
            losses.ContrastiveLoss(),
            miners.TripletMarginMiner(margin=0.2, type_of_triplets="all"),
        )
    g = torch.Generator().manual_seed(0)
    cases = [
        (torch.randn(b, 2, generator=g, dtype=torch.float64) * s, torch.randint(0, c, (b,), generator=g))
        for b, s, c in [(16, 0.5, 7), (16, 2.0, 3), (64, 0.7, 7), (5, 0.1, 2), (4, 9.0, 4)]
    ]
    cases.append(
        (
            torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.1], [5.0, 5.0]], dtype=torch.float64),
            torch.tensor([0, 0, 1, 2]),
        )
    )  # exactly one mined triplet
    for F, y in cases:
        a = F.clone().requires_grad_()
        b = F.clone().requires_grad_()
        ref = loss_fn(a, y, miner(a, y))
        ours = batched_contrastive_loss(b[None], y[None], cfg)[0]
        (ref * 1.0).backward()
        ours.backward()
        assert torch.allclose(ours, ref.to(ours.dtype), atol=1e-12, rtol=1e-10)
        grad_a = a.grad if a.grad is not None else torch.zeros_like(a)
        assert torch.allclose(b.grad, grad_a, atol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])  # 0.5: the cifar preset's (Adam's L2 term, per element)
def test_nets_trained_side_by_side_equal_nets_trained_alone(smoke_cfg, weight_decay):
    """Each jointly trained net keeps its own seed, init, data order and Adam state."""
    from bench.model import build_model
    from bench.train import train_nets_jointly

    cfg = smoke_cfg.replace(epochs=2, weight_decay=weight_decay)
    data = load_benchmark(cfg)
    seeds = [0, 7, 123]
    joint = [build_model(cfg, data.train_id.in_shape, s) for s in seeds]
    infos = train_nets_jointly(joint, cfg, data.train_id, torch.device("cpu"), seeds)
    for s, net, info in zip(seeds, joint, infos):
        alone, info_alone = train_embedding(cfg, data.train_id, torch.device("cpu"), seed=s)
        for p, q in zip(net.parameters(), alone.parameters()):
            assert torch.allclose(p, q, atol=1e-5, rtol=1e-4)
        assert info["loss_history"] == pytest.approx(info_alone["loss_history"], rel=1e-4)


def test_joint_group_is_cached(smoke_cfg, tmp_path):
    data = load_benchmark(smoke_cfg)
    cache = ModelCache(tmp_path / "models", smoke_cfg, data.train_id, torch.device("cpu"))
    first = cache.get_joint([0, 1])
    again = ModelCache(tmp_path / "models", smoke_cfg, data.train_id, torch.device("cpu")).get_joint([0, 1])
    assert [c for _, _, c in first] == [False, False] and [c for _, _, c in again] == [True, True]
    assert all(
        torch.equal(p, q)
        for (a, _, _), (b, _, _) in zip(first, again)
        for p, q in zip(a.parameters(), b.parameters())
    )


def test_stacked_forward_equals_the_vmapped_functional_call():
    """The MLP's own batched matmuls (the ensemble's side-by-side training) against vmap(functional_call)
    of the same stacked parameters; a net with dropout is not stackable (it takes vmap)."""
    from torch.func import functional_call, stack_module_state, vmap

    from backbones.mlp import EmbeddingNet

    torch.manual_seed(0)
    nets = [EmbeddingNet(784, (16, 16, 16, 16), 2) for _ in range(4)]  # the default preset's net
    assert nets[0].stackable and not EmbeddingNet(12, (8,), 3, dropout=0.1).stackable
    params, buffers = stack_module_state(nets)
    x = torch.randn(4, 64, 1, 28, 28)  # [M, B, *in_shape], batch 64 (a fused baddbmm differs here)
    ref = vmap(lambda p, b, xb: functional_call(nets[0], (p, b), (xb,)))(params, buffers, x)
    got = nets[0].stacked_forward(params, x)
    assert torch.equal(got, ref)  # bit-identical: training side by side stays the vmapped one
    torch.testing.assert_close(got[2], nets[2](x[2]), rtol=1e-6, atol=1e-6)
    grads = []
    for fwd in (
        lambda p: nets[0].stacked_forward(p, x),
        lambda p: vmap(lambda q, b, xb: functional_call(nets[0], (q, b), (xb,)))(p, buffers, x),
    ):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        fwd(p).square().sum().backward()
        grads.append(p)
    assert all(torch.equal(grads[0][k].grad, grads[1][k].grad) for k in params)
