"""SVHN (Netzer et al. 2011) test digits as a far-OOD set for colour data, read offline with
torchvision's loader from --data-dir (test_32x32.mat, download=False); and the default far-OOD
choice of colour datasets: SVHN when its file is there, else MNIST and Fashion-MNIST (real data
that is always offline here), made to the ID images' shape by `bench.data.conform_images`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.data import DataSource
from bench.errors import BenchError
from bench.registry import register_dataset

SVHN_FILE = "test_32x32.mat"
SVHN_STATS = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)


def svhn_dir(data_dir: str | None) -> Path | None:
    """The folder holding SVHN's test_32x32.mat: --data-dir or its svhn/ subfolder, else None."""
    if data_dir is None:
        return None
    for d in (Path(data_dir), Path(data_dir) / "svhn", Path(data_dir) / "SVHN"):
        if (d / SVHN_FILE).is_file():
            return d
    return None


def colour_far_ood(cfg) -> tuple[str, ...]:
    """Default far-OOD sets of a colour dataset: SVHN when in --data-dir, else MNIST + Fashion-MNIST."""
    return ("svhn",) if svhn_dir(cfg.data_dir) is not None else ("mnist_ood", "fashion_ood")


@register_dataset("svhn")
def load_svhn(cfg) -> DataSource:
    """SVHN 32x32 house-number digits (far-OOD set "svhn"), torchvision's test_32x32.mat from --data-dir."""
    d = svhn_dir(cfg.data_dir)
    if d is None:
        raise BenchError(
            f"SVHN not found: put {SVHN_FILE} (ufldl.stanford.edu/housenumbers) in --data-dir "
            "or its svhn/ subfolder"
        )
    from torchvision.datasets import SVHN

    te = SVHN(str(d), split="test", download=False)
    y = np.asarray(te.labels, dtype=np.int64) % 10
    return DataSource(
        "svhn", te.data, y, te.data, y, [str(i) for i in range(10)], SVHN_STATS, ood_name="svhn"
    )
