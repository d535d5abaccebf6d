"""Is far-OOD MNIST "less uncertain" than CIFAR on `--preset cifar` because of the methods or the input
pipeline? (docs/findings.md). Reads the run's cached frozen-trunk features (no extraction when the run
made them) and prints per split: the raw trunk feature norm, the norm after the harness's
standardisation (`bench.features.standardize`, what the head sees), and the AUROC of that norm as an
OOD score against the ID test set; with a run folder, the Spearman correlation between each method's
ID+OOD uncertainty score (the run's ood_score) and the standardised feature norm. Usage:

    PYTHONPATH=. python scripts/feature_norms.py --run RUN_DIR   # a `bench run --preset cifar` folder
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from bench.conventions import ID_SET, score_arrays
from bench.data import load_benchmark
from bench.features import STD_FLOOR, FeatureCache, frozen_trunk
from bench.grid.spec import config_from_dict
from bench.metrics.ood import auroc
from bench.run_folder import RunFolder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a run folder of --preset cifar (its config and cache)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = RunFolder(args.run)
    cfg = config_from_dict(run.config)
    data = load_benchmark(cfg)
    trunk = frozen_trunk(cfg, data.train_id.in_shape)
    cache = FeatureCache(Path(cfg.out) / "cache" / "features", cfg, trunk, torch.device("cpu"))
    splits = {"train": data.train_id, ID_SET: data.test_id, **data.test_ood}
    raw = {k: cache.get(s, k).x for k, s in splits.items()}
    mean, std = raw["train"].mean(0), raw["train"].std(0)
    std = std.clamp_min(STD_FLOOR * float(std.mean()) + 1e-12)
    norms = {k: (x.norm(dim=1).numpy(), ((x - mean) / std).norm(dim=1).numpy()) for k, x in raw.items()}
    out = {"splits": {}, "spearman": {}}
    print(f"{'split':<16}{'n':>6}  {'raw norm: median [q25, q75]':<32}{'standardised':<32}AUROC(std norm)")
    for k, (r, z) in norms.items():
        a = float(auroc(norms[ID_SET][1], z)) if k not in ("train", ID_SET) else float("nan")
        q = lambda v: f"{np.median(v):7.2f} [{np.quantile(v, 0.25):6.2f}, {np.quantile(v, 0.75):6.2f}]"  # noqa
        print(f"{k:<16}{len(r):>6}  {q(r):<32}{q(z):<32}{a:.3f}")
        out["splits"][k] = {
            "n": len(r),
            "raw_median": float(np.median(r)),
            "std_median": float(np.median(z)),
            "std_auroc_vs_id": a,
        }
    ood_score = run.config.get("ood_score")
    for m in run.methods:
        arrs = run.perquery(m, run.seeds[0])
        saved = score_arrays(arrs) if arrs else {}
        row = {}
        for k in norms:
            u = saved.get((k, ood_score))
            if u is not None and len(u) == len(norms[k][1]):
                row[k] = float(stats.spearmanr(u, norms[k][1]).statistic)
        if row:
            out["spearman"][m] = row
            print(f"spearman(score, std norm) {m:<14}" + "  ".join(f"{k} {v:+.2f}" for k, v in row.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
