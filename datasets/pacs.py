"""PACS (Li et al. 2017): 9,991 images of 7 classes (dog, elephant, giraffe, guitar, horse, house,
person) in 4 styles (photo, art_painting, cartoon, sketch), 227 x 227, as OOD sets: `pacs` (every
style) and `pacs_<style>` (one style; `pacs_sketch` is the fine-grained sets' far-OOD set). From a
snapshot of the public repository MachineLearning2020/Homework3-PACS @ d586a6cf
(`datasets._snapshots.PACS`) extracted as DIR/pacs/PACS/<style>/<class>/<image> under --data-dir.
"""

from __future__ import annotations

import numpy as np

from bench.data import DataSource
from bench.errors import BenchError
from bench.registry import register_dataset
from datasets._files import IMAGENET_LIKE_STATS
from datasets._snapshots import PACS, find_snapshot
from datasets.cifar10 import tree_checksum
from datasets.image_folders import class_folders

STYLES = ("photo", "art_painting", "cartoon", "sketch")


def load_pacs_styles(cfg, name: str, styles: tuple[str, ...]) -> DataSource:
    """The images of `styles`, labelled by object class (the same 7 classes in every style)."""
    root = find_snapshot(cfg.data_dir, name, PACS) / PACS.marker
    xs, ys, names = [], [], None
    for style in styles:
        if not (root / style).is_dir():
            raise BenchError(f"{name}: {root / style} is missing; extract the whole PACS snapshot")
        x, y, cls = class_folders(root / style, name)
        if names is not None and cls != names:
            raise BenchError(f"{name}: style {style} has classes {cls}, expected {names}")
        names = cls
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    checksum = "".join(tree_checksum(root / s, "*/*")[:16] for s in styles)
    return DataSource(
        name,
        x,
        y,
        x,
        y,
        names,
        IMAGENET_LIKE_STATS,
        ood_name=name,
        label=f"PACS ({', '.join(styles)})",
        checksum=checksum,
    )


def _register(name: str, styles: tuple[str, ...]) -> None:
    def load(cfg) -> DataSource:
        return load_pacs_styles(cfg, name, styles)

    load.__doc__ = f"PACS, {' + '.join(styles)} images, as a far-OOD set {name!r} (files under --data-dir)."
    register_dataset(name)(load)


_register("pacs", STYLES)
for _style in STYLES:
    _register(f"pacs_{_style}", (_style,))
