"""Reading an ImageFolder-style tree (<root>/<class>/<image file>) as (paths, labels, class names),
for the OOD image sets that come as plain class folders (Caltech-101, PACS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.errors import BenchError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def class_folders(
    root: Path, dataset: str, skip: tuple[str, ...] = ()
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(file paths [N] as str, 0-based labels [N], class names): every image file (by suffix,
    case-insensitive; other files such as a stray `tmp` are ignored) of every class folder of root
    but `skip`, classes in sorted folder order, files in sorted order."""
    names = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in skip)
    paths, labels = [], []
    for c, name in enumerate(names):
        files = sorted(
            f for f in (root / name).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        paths += [str(f) for f in files]
        labels += [c] * len(files)
    if not paths:
        raise BenchError(f"{dataset}: no images in class folders under {root}")
    return np.array(paths), np.array(labels, dtype=np.int64), names
