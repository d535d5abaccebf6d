"""Caltech-101 (Fei-Fei et al. 2004), all 9,144 images (101 object classes + BACKGROUND_Google),
a far-OOD set for the fine-grained sets, from a snapshot of the public repository
MachineLearning2020/Homework2-Caltech101 @ 836044dd (`datasets._snapshots.CALTECH101`) extracted as
DIR/caltech101/101_ObjectCategories/<class>/image_NNNN.jpg under --data-dir.

Every image is an OOD item, background included. Caveat: a few classes overlap the ID domains
(car_side, 123 images, for cars; ibis, flamingo, flamingo_head, emu, rooster, pigeon, 339 images, for
birds), 5% of the images; they are kept, as the set is used as published.
"""

from __future__ import annotations

from bench.data import DataSource
from bench.registry import register_dataset
from datasets._files import IMAGENET_LIKE_STATS
from datasets._snapshots import CALTECH101, find_snapshot
from datasets.cifar10 import tree_checksum
from datasets.image_folders import class_folders


@register_dataset("caltech101")
def load_caltech101(cfg) -> DataSource:
    """Caltech-101 images as a far-OOD set "caltech101" (all 102 folders; files under --data-dir)."""
    root = find_snapshot(cfg.data_dir, "caltech101", CALTECH101) / CALTECH101.marker
    x, y, names = class_folders(root, "caltech101")
    return DataSource(
        "caltech101",
        x,
        y,
        x,
        y,
        names,
        IMAGENET_LIKE_STATS,
        ood_name="caltech101",
        label="Caltech-101",
        checksum=tree_checksum(root, "*/*"),
    )
