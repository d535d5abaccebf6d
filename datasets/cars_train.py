"""Stanford Cars (Krause et al. 2013), the official training half: 8,144 images of all 196 models,
cropped to the car's box (varying sizes), from a snapshot of the public repository
fmejbah/car_dataset1 @ 2ac69202 (`datasets._snapshots.CARS_TRAIN`), extracted under --data-dir:

    DIR/cars_train/cars_train/NNNNN.jpg         00001.jpg ... 08144.jpg
    DIR/cars_train/train_perfect_preds.txt      line i: the 1-based class of image i
    DIR/cars_train/cars_meta.mat                class_names, the 196 model names

The snapshot's JPEGs store red and blue swapped (a BGR write): the loader marks them so and every
read reverses the channels (`DataSource.swap_red_blue`). Zero-shot, as the standard Cars196 split:
classes 1-98 train, 99-196 test. Results are labelled "Cars196 (training half, 196 classes)".
"""

from __future__ import annotations

import numpy as np

from bench.data import DataSource
from bench.errors import BenchError
from bench.registry import register_dataset
from datasets._files import zero_shot_source
from datasets._snapshots import CARS_TRAIN, find_snapshot
from datasets.cars196 import _loadmat, _names
from datasets.cifar10 import tree_checksum
from datasets.cub100 import cub100_present
from datasets.fine_grained_ood import NEAR_OOD, fine_grained_far_ood

LABEL = "Cars196 (training half, 196 classes)"
N_CLASSES, SEEN = 196, 98


def read_labels(path) -> np.ndarray:
    """The 1-based classes of train_perfect_preds.txt, one per line (a bad line is a BenchError)."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            c = int(line.strip())
        except ValueError:
            raise BenchError(f"{path}:{n}: expected a class number, got {line!r}") from None
        if not 1 <= c <= N_CLASSES:
            raise BenchError(f"{path}:{n}: class {c} is outside 1-{N_CLASSES}")
        out.append(c)
    return np.array(out, dtype=np.int64)


@register_dataset(
    "cars_train",
    far_ood=fine_grained_far_ood("cars_train", cub100_present),
    near_ood=(NEAR_OOD["cars_train"],),
)
def load_cars_train(cfg) -> DataSource:
    """Stanford Cars' training half (196 models, red/blue reversed on read); zero-shot: classes 1-98
    train, 99-196 test; near-OOD cub100, far-OOD Caltech-101 and PACS sketches when present."""
    root = find_snapshot(cfg.data_dir, "cars_train", CARS_TRAIN)
    classes = read_labels(root / CARS_TRAIN.marker)
    paths = [f"cars_train/{i:05d}.jpg" for i in range(1, len(classes) + 1)]
    meta = root / "cars_meta.mat"
    names = _names(_loadmat(meta)["class_names"]) if meta.is_file() else []
    names = names if len(names) == N_CLASSES else [f"car{c}" for c in range(1, N_CLASSES + 1)]
    src = zero_shot_source("cars_train", root, paths, classes, SEEN, names, LABEL)
    src.checksum = tree_checksum(root, "cars_train/*.jpg") + ":bgr"
    src.swap_red_blue = True
    return src
