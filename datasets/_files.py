"""Shared by the loaders of the file-based retrieval benchmarks (CUB-200-2011, Cars-196, SOP):
finding the official layout under --data-dir, with one line saying what to put where, and
turning (paths, 1-based class ids) into a zero-shot DataSource."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.data import DataSource
from bench.errors import BenchError

IMAGENET_LIKE_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # photos: ImageNet's statistics


def find_layout(data_dir: str | None, dataset: str, marker: str, folders: tuple[str, ...], how: str) -> Path:
    """The folder F with F/marker, looked for at --data-dir and its subfolders `folders`; else a
    BenchError: '<dataset>: put ... so that DIR/<folder>/<marker> exists and pass --data-dir DIR'."""
    tip = f"{dataset}: {how}, so that DIR/{folders[0]}/{marker} exists, and pass --data-dir DIR"
    if data_dir is None:
        raise BenchError(f"{tip} (no --data-dir given)")
    root = Path(data_dir)
    for d in (root, *(root / f for f in folders)):
        if (d / marker).is_file():
            return d
    raise BenchError(f"{tip} (not found under {root})")


def read_table(path: Path, columns: int, skip_header: bool = False) -> list[list[str]]:
    """Whitespace-separated rows with at least `columns` fields (a short row is a BenchError)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines[1:] if skip_header else lines, start=2 if skip_header else 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < columns:
            raise BenchError(f"{path}:{n}: expected {columns} fields, got {line!r}")
        rows.append(parts)
    return rows


def zero_shot_source(
    name: str,
    root: Path,
    paths: list[str],
    class_ids: np.ndarray,
    n_train_classes: int,
    class_names: list[str],
    label: str,
) -> DataSource:
    """A DataSource of image files with 1-based class ids: classes 1..n_train_classes are the
    training images, the rest the test images (the standard zero-shot split); labels 0-based."""
    files = np.array([str(root / p) for p in paths])
    missing = [f for f in files[: min(len(files), 5)] if not Path(f).is_file()]
    if missing:
        raise BenchError(f"{name}: image {missing[0]} listed but missing; extract the whole archive")
    y = class_ids.astype(np.int64) - 1
    train = y < n_train_classes
    if not train.any() or train.all():
        raise BenchError(
            f"{name}: expected images of classes 1-{n_train_classes} and above, found classes "
            f"{int(y.min()) + 1}-{int(y.max()) + 1}"
        )
    return DataSource(
        name,
        files[train],
        y[train],
        files[~train],
        y[~train],
        class_names,
        IMAGENET_LIKE_STATS,
        label=label,
        seen_classes=n_train_classes,
        split_by_class=True,
    )
