"""Stanford Online Products (Oh Song et al. 2016), 22,634 products, from the official layout under
--data-dir: Stanford_Online_Products/Ebay_train.txt and Ebay_test.txt (image_id class_id
super_class_id path, one header line). Standard zero-shot split: 11,318 training classes (59,551
images), 11,316 test classes (60,502 images)."""

from __future__ import annotations

import numpy as np

from bench.data import DataSource
from bench.errors import BenchError
from bench.registry import register_dataset
from datasets._files import find_layout, read_table, zero_shot_source
from datasets.svhn import colour_far_ood

HOW = "download Stanford_Online_Products.zip and extract it into a folder DIR"
TRAIN_CLASSES = 11318


@register_dataset("sop", far_ood=colour_far_ood)
def load_sop(cfg) -> DataSource:
    """Stanford Online Products (files under --data-dir); zero-shot: 11,318 train / 11,316 test classes."""
    root = find_layout(cfg.data_dir, "sop", "Ebay_train.txt", ("Stanford_Online_Products",), HOW)
    if not (root / "Ebay_test.txt").is_file():
        raise BenchError(f"sop: {root}/Ebay_test.txt is missing; extract the whole archive")
    rows = read_table(root / "Ebay_train.txt", 4, skip_header=True) + read_table(
        root / "Ebay_test.txt", 4, skip_header=True
    )
    classes = np.array([int(r[1]) for r in rows])
    n_classes = int(classes.max())
    return zero_shot_source(
        "sop",
        root,
        [r[3] for r in rows],
        classes,
        TRAIN_CLASSES,
        [f"product{c}" for c in range(1, n_classes + 1)],
        "Stanford Online Products",
    )
