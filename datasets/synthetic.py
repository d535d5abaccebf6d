"""A tiny synthetic dataset for tests: Gaussian class blobs in 32-d, plus uniform-noise far-OOD."""
from __future__ import annotations

import numpy as np
import torch

from bench.registry import register_dataset
from datasets.base import Dataset, Split, check_heldout, split_id_ood

N_CLASSES, DIM = 10, 32


@register_dataset("synthetic")
def load_synthetic(cfg) -> Dataset:
    """Ten Gaussian blobs in 32-d (seconds to train; for tests), uniform noise as far-OOD."""
    check_heldout(cfg.heldout_classes, N_CLASSES, "synthetic")
    rng = np.random.default_rng(1234)
    centers = rng.normal(0.0, 1.0, size=(N_CLASSES, DIM)).astype(np.float32) * 1.5

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, N_CLASSES, size=n)
        return centers[y] + rng.normal(0.0, 1.0, size=(n, DIM)).astype(np.float32), y.astype(np.int64)

    n_train = cfg.n_train or 2000
    n_test = cfg.n_test or 500
    train_id, _ = split_id_ood(*sample(int(n_train * 1.5)), cfg.heldout_classes)
    test_id, heldout = split_id_ood(*sample(int(n_test * 1.5)), cfg.heldout_classes)
    noise = Split(torch.from_numpy(rng.uniform(-4, 4, size=(n_test, DIM)).astype(np.float32)),
                  torch.full((n_test,), -1, dtype=torch.int64))
    ood = {"noise": noise}
    if len(heldout):
        ood = {"heldout": heldout.subset(n_test), **ood}
    return Dataset("synthetic", train_id.subset(n_train), test_id.subset(n_test), ood,
                   [f"blob{i}" for i in range(N_CLASSES)])
