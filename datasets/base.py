"""The Dataset container every loader returns, plus helpers shared by the loaders."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bench.errors import BenchError

DATA_SEED = 0  # subsampling uses a fixed seed so every model seed sees the same data


@dataclass
class Split:
    """Flattened inputs x [N, D_in] (float32) and integer labels y [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, n: int | None, seed: int = DATA_SEED) -> "Split":
        """A seeded random subset of n items (all when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        return Split(self.x[idx], self.y[idx])


@dataclass
class Dataset:
    """In-distribution train/test splits, named OOD query sets and class names.

    test_ood maps a set name (e.g. "heldout", "mnist") to a Split; its labels are the source labels.
    """

    name: str
    train_id: Split
    test_id: Split
    test_ood: dict[str, Split] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)

    @property
    def input_dim(self) -> int:
        return int(self.train_id.x.shape[1])


def split_id_ood(x: np.ndarray, y: np.ndarray, heldout: tuple[int, ...]) -> tuple[Split, Split]:
    """Split arrays into (classes not held out, held-out classes) as tensors."""
    mask = np.isin(y, np.asarray(heldout, dtype=y.dtype))
    to = lambda m: Split(torch.from_numpy(np.ascontiguousarray(x[m])).float(),
                         torch.from_numpy(y[m].astype(np.int64)))
    return to(~mask), to(mask)


def check_heldout(heldout: tuple[int, ...], n_classes: int, dataset: str) -> None:
    """Held-out classes must exist and leave at least two classes for training."""
    bad = [c for c in heldout if not 0 <= c < n_classes]
    if bad:
        raise BenchError(f"heldout classes {bad} are outside {dataset}'s classes 0..{n_classes - 1}")
    if n_classes - len(set(heldout)) < 2:
        raise BenchError(f"heldout classes leave fewer than 2 training classes of {dataset}'s {n_classes}")
