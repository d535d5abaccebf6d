"""A tiny synthetic dataset for tests: Gaussian class blobs in 32-d, and uniform noise as far-OOD."""

from __future__ import annotations

import numpy as np

from bench.data import DataSource
from bench.registry import register_dataset

N_CLASSES, DIM = 10, 32
NOISE_RANGE = 4.0


@register_dataset("synthetic", far_ood=("synthetic_noise",))
def load_synthetic(cfg) -> DataSource:
    """Ten Gaussian blobs in 32-d (seconds to train; for tests); default far-OOD: uniform noise."""
    rng = np.random.default_rng(1234)
    centers = rng.normal(0.0, 1.0, size=(N_CLASSES, DIM)).astype(np.float32) * 1.5

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, N_CLASSES, size=n)
        return centers[y] + rng.normal(0.0, 1.0, size=(n, DIM)).astype(np.float32), y.astype(np.int64)

    # 1.5x so that, with classes held out, about n_train / n_test ID items remain to subsample
    train_x, train_y = sample(int((cfg.n_train or 2000) * 1.5))
    test_x, test_y = sample(int((cfg.n_test or 500) * 1.5))
    return DataSource("synthetic", train_x, train_y, test_x, test_y, [f"blob{i}" for i in range(N_CLASSES)])


@register_dataset("synthetic_noise")
def load_synthetic_noise(cfg) -> DataSource:
    """Uniform noise in [-4, 4]^32 (far-OOD for `synthetic`; one dummy class, label -1)."""
    rng = np.random.default_rng(4321)
    n = cfg.n_test or 500
    x = rng.uniform(-NOISE_RANGE, NOISE_RANGE, size=(2 * n, DIM)).astype(np.float32)
    y = np.full(2 * n, -1, dtype=np.int64)
    return DataSource("synthetic_noise", x[:n], y[:n], x[n:], y[n:], ["noise"], ood_name="noise")
