"""Cars-196 (Krause et al. 2013), 196 car models, from --data-dir in either official layout:
cars_annos.mat + car_ims/ (all 16,185 images), or the devkit (devkit/cars_train_annos.mat,
devkit/cars_test_annos_withlabels.mat, devkit/cars_meta.mat + cars_train/, cars_test/).
Standard zero-shot split over all images: classes 1-98 train, 99-196 test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.data import DataSource
from bench.errors import BenchError
from bench.registry import register_dataset
from datasets._files import zero_shot_source
from datasets.svhn import colour_far_ood

HOW = (
    "download cars_annos.mat and car_ims.tgz (Stanford Cars) and extract them into a folder DIR "
    "(or the devkit with cars_train/ and cars_test/)"
)


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, TypeError) as e:
        raise BenchError(f"cars196: cannot read {path}: {e}") from None


def _records(mat: dict, key: str, path: Path) -> list:
    if key not in mat:
        raise BenchError(f"cars196: {path} has no {key!r} table")
    recs = mat[key]
    return list(np.atleast_1d(recs))


def _names(raw) -> list[str]:
    return [str(n) for n in np.atleast_1d(raw)]


def _find(data_dir: str | None) -> tuple[str, Path]:
    if data_dir is None:
        raise BenchError(
            f"cars196: {HOW}, so that DIR/cars_annos.mat exists, and pass --data-dir DIR "
            "(no --data-dir given)"
        )
    root = Path(data_dir)
    for d in (root, root / "cars196", root / "stanford_cars"):
        if (d / "cars_annos.mat").is_file():
            return "annos", d
        if (d / "devkit" / "cars_train_annos.mat").is_file():
            return "devkit", d
    raise BenchError(
        f"cars196: {HOW}, so that DIR/cars_annos.mat exists, and pass --data-dir DIR (not found under {root})"
    )


@register_dataset("cars196", far_ood=colour_far_ood)
def load_cars196(cfg) -> DataSource:
    """Cars-196 car models (files under --data-dir); zero-shot: classes 1-98 train, 99-196 test."""
    kind, root = _find(cfg.data_dir)
    if kind == "annos":
        mat = _loadmat(root / "cars_annos.mat")
        recs = _records(mat, "annotations", root / "cars_annos.mat")
        paths = [str(r.relative_im_path) for r in recs]
        classes = np.array([int(getattr(r, "class")) for r in recs])
        names = _names(mat["class_names"]) if "class_names" in mat else []
    else:
        dev = root / "devkit"
        paths, cls = [], []
        for part, folder in (
            ("cars_train_annos.mat", "cars_train"),
            ("cars_test_annos_withlabels.mat", "cars_test"),
        ):
            if not (dev / part).is_file():
                raise BenchError(
                    f"cars196: {dev / part} is missing; the devkit layout needs both annotation files"
                )
            for r in _records(_loadmat(dev / part), "annotations", dev / part):
                paths.append(f"{folder}/{r.fname}")
                cls.append(int(getattr(r, "class")))
        classes = np.array(cls)
        meta = dev / "cars_meta.mat"
        names = _names(_loadmat(meta)["class_names"]) if meta.is_file() else []
    n = max(int(classes.max()), len(names))
    names = names if len(names) == n else [f"car{c}" for c in range(1, n + 1)]
    return zero_shot_source("cars196", root, paths, classes, 98, names, "Cars-196")
