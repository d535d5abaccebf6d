"""Dataset loaders: real Fashion-MNIST splits, IDX parsing and clear errors for bad data dirs."""
import gzip
import shutil

import numpy as np
import pytest

from bench.config import preset_config
from bench.errors import BenchError
from datasets.fashion_mnist import load_fashion_mnist
from datasets.idx import FILES, read_idx
from datasets.synthetic import load_synthetic
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
    with pytest.raises(BenchError, match="outside"):
        load_synthetic(preset_config("smoke").replace(heldout_classes=(3, 12)))
    with pytest.raises(BenchError, match="fewer than 2 training classes"):
        load_synthetic(preset_config("smoke").replace(heldout_classes=tuple(range(9))))


@needs_fashion
def test_fashion_mnist_id_ood_split(tmp_path):
    for f in FILES.values():  # a --data-dir copy exercises the override path too
        shutil.copy(FASHION_DIR / f, tmp_path / f)
    cfg = preset_config("smoke").replace(data_dir=str(tmp_path), n_train=None, n_test=None)
    d = load_fashion_mnist(cfg)
    assert len(d.train_id) == 42000 and len(d.test_id) == 7000
    assert set(d.train_id.y.unique().tolist()) == set(range(7))
    assert set(d.test_ood["heldout"].y.unique().tolist()) == {7, 8, 9}
    assert len(d.test_ood["mnist"]) > 0 and d.train_id.x.shape[1] == 784
    assert abs(float(d.train_id.x.mean())) < 0.1 and d.class_names[9] == "Ankle boot"
