"""Retrieval/time trade-off of the frozen EfficientNet-Lite0 trunk's input resolution on a
fine-grained set: raw-feature leave-one-out R@1 (= precision@1) and mAP@1 on a seeded subset
of the zero-shot test split, and seconds per image of extraction (decode + resize + trunk), per size.

    PYTHONPATH=. python scripts/fine_grained_resolution.py --dataset cub100 --data-dir DIR --n 600 \
        --sizes 96,128,160,224 [--swap-check]

--swap-check (cars_train) also runs the first size with the red/blue reversal turned off, to show
which channel order the ImageNet trunk retrieves better with.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from backbones.efficientnet_lite0 import LITE_STATS, lite_trunk
from bench.config import RunConfig
from bench.data import DATASETS, protocol_indices
from bench.features import extract_features
from bench.images import ImageSplit, ImageStore, ImageTransform
from bench.metrics.bootstrap import bootstrap_mean_ci
from bench.metrics.retrieval import retrieval_per_query
from bench.splits import subset_indices


def measure(src, idx, size: int, swap: bool) -> tuple[float, dict]:
    cfg = RunConfig(backbone="efficientnet_lite0", pooling="avg")
    trunk = lite_trunk(cfg, 3, size).eval()
    t = ImageTransform(size, 1.0, *LITE_STATS, 3)
    split = ImageSplit(
        ImageStore(src.test_x, "probe", swap), idx, torch.from_numpy(src.test_y[idx]), t, workers=1
    )
    start = time.perf_counter()
    feats = extract_features(trunk, split, torch.device("cpu"), 100, quiet=True)
    sec = (time.perf_counter() - start) / len(idx)
    per_query = retrieval_per_query(feats, split.y, (1,))
    return sec, {k: bootstrap_mean_ci(v, 1000, 0.95, seed=0) for k, v in per_query.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="cub100")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--sizes", default="96,128,160,224")
    ap.add_argument("--swap-check", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = RunConfig(dataset=a.dataset, data_dir=a.data_dir, protocol="zero_shot")
    src = DATASETS.get(a.dataset)(cfg)
    _, test_idx, _ = protocol_indices(src, cfg)
    idx = test_idx[subset_indices(len(test_idx), a.n).numpy()]
    runs = [(int(s), src.swap_red_blue) for s in a.sizes.split(",")]
    if a.swap_check:
        runs.append((runs[0][0], not src.swap_red_blue))
    for size, swap in runs:
        sec, m = measure(dataclasses.replace(src), idx, size, swap)
        cells = "  ".join(f"{k} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in sorted(m.items()))
        print(f"{a.dataset} {size:4d} px swap={swap!s:5}  {1000 * sec:6.1f} ms/img  {cells}", flush=True)


if __name__ == "__main__":
    main()
