"""The OOD sets of the two fine-grained retrieval sets: near-OOD is the other fine-grained set (cars
for birds, birds for cars), far-OOD Caltech-101 and PACS sketches. A run's default takes those whose
images are there (under --data-dir; the CUB subset also from the archive beside the project) and
falls back to the colour datasets' default (SVHN, else MNIST + Fashion-MNIST) when none is."""

from __future__ import annotations

from collections.abc import Callable

from bench.errors import BenchError
from datasets._snapshots import CALTECH101, CARS_TRAIN, PACS, snapshot_present
from datasets.svhn import colour_far_ood

NEAR_OOD = {"cub100": "cars_train", "cars_train": "cub100"}
FAR_OOD = ("caltech101", "pacs_sketch")


def _present(name: str, data_dir: str | None) -> bool:
    if name == "cub100":
        from datasets.cub100 import locate_cub100

        try:
            locate_cub100(data_dir)
        except BenchError:
            return False
        return True
    snap = {"cars_train": CARS_TRAIN, "caltech101": CALTECH101, "pacs_sketch": PACS}[name]
    return snapshot_present(data_dir, snap)


def fine_grained_far_ood(dataset: str) -> Callable[..., tuple[str, ...]]:
    """The registered default OOD sets of `dataset` (cub100 or cars_train): a function of the config."""
    wanted = (NEAR_OOD[dataset], *FAR_OOD)

    def default(cfg) -> tuple[str, ...]:
        found = tuple(n for n in wanted if _present(n, cfg.data_dir))
        return found or colour_far_ood(cfg)

    default.__doc__ = f"{', '.join(wanted)} when present, else the colour default"
    return default
