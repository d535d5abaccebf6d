"""Dataset loaders and the benchmark protocol: real Fashion-MNIST splits, far-OOD sets from the
registry, IDX parsing and clear errors for bad data dirs."""

import gzip
import shutil

import numpy as np
import pytest
import torch

from bench.config import preset_config
from bench.data import DataSource, load_benchmark, to_model_input
from bench.errors import BenchError
from bench.registry import DATASETS
from datasets.fashion_mnist import PIXEL_STATS, load_fashion_mnist
from datasets.idx import FILES, read_idx
from tests.conftest import FASHION_DIR, needs_fashion


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, size=(200, 28, 28)).astype(np.uint8)
    _write_idx(tmp_path / "a.gz", arr)
    raw = (tmp_path / "a.gz").read_bytes()
    (tmp_path / "a.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BenchError, match="corrupt or truncated"):
        read_idx(tmp_path / "a.gz")


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_bad_data_dir_says_how_to_get_data(tmp_path, make):
    d = tmp_path / "data"
    if make == "empty":
        d.mkdir()
    cfg = preset_config("smoke").replace(data_dir=str(d), far_ood=())
    with pytest.raises(BenchError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(cfg)


def test_heldout_classes_are_checked():
    cfg = preset_config("smoke").replace(dataset="synthetic")
    with pytest.raises(BenchError, match="outside"):
        load_benchmark(cfg.replace(heldout_classes=(3, 12)))
    with pytest.raises(BenchError, match="fewer than 2 training classes"):
        load_benchmark(cfg.replace(heldout_classes=tuple(range(9))))


def test_far_ood_sets_come_from_the_registry():
    cfg = preset_config("smoke").replace(dataset="synthetic")
    d = load_benchmark(cfg)  # the dataset's registered default: uniform noise
    assert list(d.test_ood) == ["heldout", "noise"] and d.test_ood["noise"].in_shape == (32,)
    assert list(load_benchmark(cfg.replace(far_ood=())).test_ood) == ["heldout"]
    with pytest.raises(BenchError, match="far-OOD dataset 'mnist_ood' has inputs of shape"):
        load_benchmark(cfg.replace(far_ood=("mnist_ood",)))
    with pytest.raises(BenchError, match="unknown dataset 'nope'"):
        load_benchmark(cfg.replace(far_ood=("nope",)))


def test_images_are_normalised_in_one_place():
    img = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)  # [1, 2, 2]
    x = to_model_input(img, (0.5, 0.25))
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    assert torch.allclose(x.flatten(), torch.tensor([-2.0, 2.0, -1.2, -0.4]))
    feats = np.ones((3, 4), dtype=np.float64)
    assert torch.equal(to_model_input(feats, None), torch.ones(3, 4))


def test_subsets_are_seeded_and_shared_by_every_model_seed():
    cfg = preset_config("smoke").replace(dataset="synthetic")
    a, b = load_benchmark(cfg), load_benchmark(cfg.replace(seed=5))
    assert torch.equal(a.train_id.x, b.train_id.x) and len(a.train_id) == cfg.n_train
    assert set(a.train_id.y.tolist()) <= set(range(7)) and set(a.test_ood["heldout"].y.tolist()) <= {7, 8, 9}


@needs_fashion
def test_fashion_mnist_id_ood_split(tmp_path):
    for f in FILES.values():  # a --data-dir copy exercises the override path too
        shutil.copy(FASHION_DIR / f, tmp_path / f)
    cfg = preset_config("smoke").replace(data_dir=str(tmp_path), n_train=None, n_test=None)
    src = load_fashion_mnist(cfg)
    assert isinstance(src, DataSource) and src.train_x.dtype == np.uint8 and src.pixel_stats == PIXEL_STATS
    d = load_benchmark(cfg)
    assert len(d.train_id) == 42000 and len(d.test_id) == 7000
    assert set(d.train_id.y.unique().tolist()) == set(range(7))
    assert set(d.test_ood["heldout"].y.unique().tolist()) == {7, 8, 9}
    assert len(d.test_ood["mnist"]) > 0 and d.train_id.in_shape == (1, 28, 28)
    assert abs(float(d.train_id.x.mean())) < 0.1 and d.class_names[9] == "Ankle boot"
    mnist = DATASETS.get("mnist_ood")(
        cfg
    )  # far-OOD digits get Fashion-MNIST's scaling, like any unseen image
    n = len(d.test_ood["mnist"])
    assert torch.equal(
        d.test_ood["mnist"].x,
        to_model_input((mnist.ood_x if mnist.ood_x is not None else mnist.test_x)[:n], PIXEL_STATS),
    )


def test_validation_split_is_stratified_and_disjoint_from_training():
    from bench.data import stratified_holdout

    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    mask = stratified_holdout(y, 20)
    assert mask.sum() == 20
    assert [int(mask[y == c].sum()) for c in range(4)] == [10, 6, 3, 1]
    assert np.array_equal(mask, stratified_holdout(y, 20))  # seeded
    with pytest.raises(BenchError, match="val_items"):
        stratified_holdout(y, 100)
    cfg = preset_config("smoke").replace(dataset="synthetic", val_items=60)
    data, plain = load_benchmark(cfg), load_benchmark(cfg.replace(val_items=0))
    assert data.val_id is not None and len(data.val_id) == 60 and plain.val_id is None

    def rows(s):
        return {tuple(r) for r in s.x.numpy().round(6)}

    assert not rows(data.val_id) & rows(data.train_id)  # never trained on
    assert not rows(data.val_id) & rows(data.test_id)  # never test data
    assert set(data.val_id.y.tolist()) <= set(data.train_id.y.tolist())  # training classes only
