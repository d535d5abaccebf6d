"""CUB-200-2011 (Wah et al. 2011), 200 bird species, from the official archive's layout under
--data-dir: CUB_200_2011/images.txt (id, relative path), image_class_labels.txt (id, class 1-200),
classes.txt (names), images/. Standard zero-shot split: classes 1-100 train, 101-200 test."""

from __future__ import annotations

import numpy as np

from bench.data import DataSource
from bench.registry import register_dataset
from datasets._files import find_layout, read_table, zero_shot_source
from datasets.svhn import colour_far_ood

HOW = "download CUB_200_2011.tgz (Caltech) and extract it into a folder DIR"


@register_dataset("cub200", far_ood=colour_far_ood)
def load_cub200(cfg) -> DataSource:
    """CUB-200-2011 birds (files under --data-dir); zero-shot: classes 1-100 train, 101-200 test."""
    root = find_layout(cfg.data_dir, "cub200", "images.txt", ("CUB_200_2011",), HOW)
    paths = {i: p for i, p in read_table(root / "images.txt", 2)}
    labels = {i: int(c) for i, c in read_table(root / "image_class_labels.txt", 2)}
    ids = sorted(paths, key=int)
    names = [f"class{c}" for c in range(1, 201)]
    if (root / "classes.txt").is_file():
        for i, n in read_table(root / "classes.txt", 2):
            names[int(i) - 1] = n
    return zero_shot_source(
        "cub200",
        root / "images",
        [paths[i] for i in ids],
        np.array([labels[i] for i in ids]),
        100,
        names,
        "CUB-200-2011",
    )
