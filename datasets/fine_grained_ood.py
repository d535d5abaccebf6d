"""The OOD sets of the two fine-grained retrieval sets: near-OOD is the other fine-grained set (cars
for birds, birds for cars), far-OOD Caltech-101 and PACS sketches. A run's default takes those whose
images are there (under --data-dir; the CUB subset also from the archive beside the project) and
falls back to the colour datasets' default (SVHN, else MNIST + Fashion-MNIST) when none is."""

from __future__ import annotations

from collections.abc import Callable

from datasets._snapshots import CALTECH101, CARS_TRAIN, PACS, snapshot_present
from datasets.svhn import colour_far_ood

NEAR_OOD = {"cub100": "cars_train", "cars_train": "cub100"}
FAR_OOD = ("caltech101", "pacs_sketch")


SNAPSHOTS = {"cars_train": CARS_TRAIN, "caltech101": CALTECH101, "pacs_sketch": PACS}


def fine_grained_far_ood(
    dataset: str, near_present: Callable[[str | None], bool] | None = None
) -> Callable[..., tuple[str, ...]]:
    """The registered default OOD sets of `dataset` (cub100 or cars_train): a function of the config.
    `near_present(data_dir)` tells whether the near-OOD set is there when it is not a snapshot (the CUB
    subset, which its own module locates: passed in, so this module imports no dataset module)."""
    wanted = (NEAR_OOD[dataset], *FAR_OOD)

    def present(name: str, data_dir: str | None) -> bool:
        if name in SNAPSHOTS:
            return snapshot_present(data_dir, SNAPSHOTS[name])
        return near_present is not None and near_present(data_dir)

    def default(cfg) -> tuple[str, ...]:
        found = tuple(n for n in wanted if present(n, cfg.data_dir))
        return found or colour_far_ood(cfg)

    default.__doc__ = f"{', '.join(wanted)} when present, else the colour default"
    return default
