"""A small synthetic run folder written through bench.run_folder.RunWriter from seeded numbers, so
report tests do not depend on training or on the metrics code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.config import preset_config
from bench.run_folder import RESULT_COLUMNS, RunWriter, score_array

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt"]
CLASS_NAMES_10 = CLASS_NAMES + ["Sneaker", "Bag", "Ankle boot"]  # recorded in config.json
OOD_SETS = {"heldout": (7, 8, 9), "noise": None}
METHODS = {"plain": False, "diag_la": True, "mc_dropout": True}  # name -> has uncertainty


def make_run(
    root: Path,
    seeds: tuple[int, ...] = (0,),
    embed_dim: int = 2,
    n: int = 60,
    n_bins: int = 10,
    methods: dict[str, bool] | None = None,
    with_seeds_csv: bool = False,
    with_paired_csv: bool = False,
    command: str | None = None,
    failures: list[dict] | None = None,
    all_failed: bool = False,
    score_vectors: bool = False,
) -> Path:
    """Write a complete run folder under root and return it. Values come from a seeded Generator.
    all_failed: no method has results or per-query arrays (every one failed). score_vectors: methods with
    uncertainty also save the score vectors of the default scores (`score__<set>__trace`, `__top1_flip`),
    as runs do since the score plugins; without them the readers fall back to tr Sigma from the variances."""
    methods = methods or METHODS
    rng = np.random.default_rng(7)
    writer = RunWriter(Path(root) / "20260101-000000-fixture")
    cfg = preset_config("smoke").replace(
        dataset="fashion_mnist",
        seed=seeds[0],
        seeds=tuple(seeds) if len(seeds) > 1 else (),
        embed_dim=embed_dim,
        methods=tuple(methods),
        out=str(root),
    )
    rows, times = [], []
    for s in seeds:
        times.append({"method": "base", "seed": s, "stage": "train", "seconds": 3.0 + s})
        for mi, (m, unc) in enumerate(methods.items()):
            n_id = n
            y = rng.integers(0, len(CLASS_NAMES), n_id)
            centers = rng.normal(0, 3, (10, embed_dim))
            arrs = {
                "id_mean": (centers[y] + rng.normal(0, 1, (n_id, embed_dim))).astype(np.float32),
                "id_labels": y,
            }
            if unc:
                arrs["id_var"] = rng.gamma(2.0, 0.05, (n_id, embed_dim)).astype(np.float32)
            for k, cls in OOD_SETS.items():
                no = n // 2
                lab = rng.choice(cls, no) if cls else np.full(no, -1)
                arrs[f"ood_{k}_mean"] = rng.normal(0, 4, (no, embed_dim)).astype(np.float32)
                arrs[f"ood_{k}_labels"] = lab.astype(np.int64)
                if unc:
                    arrs[f"ood_{k}_var"] = rng.gamma(2.0, 0.12, (no, embed_dim)).astype(np.float32)
            if unc and score_vectors:
                arrs[score_array("id", "trace")] = arrs["id_var"].sum(-1).astype(np.float64)
                arrs[score_array("id", "top1_flip")] = rng.random(n_id)
                for k in OOD_SETS:
                    arrs[score_array(k, "trace")] = arrs[f"ood_{k}_var"].sum(-1).astype(np.float64)
            for K in (1, 3, 5):
                for fam in ("mAP", "Recall"):
                    v = rng.random(n_id) < 0.4 + 0.1 * mi + (0.05 * K if fam == "Recall" else 0)
                    arrs[f"pq_{fam}@{K}"] = v.astype(np.float64)
                    mean = v.mean()
                    rows.append(
                        {
                            "method": m,
                            "seed": s,
                            "metric": f"{fam}@{K}",
                            "value": mean,
                            "ci_low": mean - 0.05,
                            "ci_high": min(mean + 0.05, 1.0),
                        }
                    )
            scal = {"ECE": 0.1 + 0.02 * mi, "AUSE": 0.05 + 0.01 * mi}
            for k in OOD_SETS:
                scal |= {
                    f"AUROC[{k}]": 0.6 + 0.1 * mi,
                    f"AUPR[{k}]": 0.5 + 0.1 * mi,
                    f"FPR95[{k}]": 0.7 - 0.1 * mi,
                    f"var_ratio[{k}]": 2.0 + mi,
                }
            for met, v in scal.items():
                val = v + 0.01 * s if unc else float("nan")
                rows.append(
                    {
                        "method": m,
                        "seed": s,
                        "metric": met,
                        "value": val,
                        "ci_low": val - 0.03,
                        "ci_high": val + 0.03,
                    }
                )
            if unc:
                conf = np.sort(rng.random(n_bins))
                arrs |= {
                    "extra_reliability_conf": conf,
                    "extra_reliability_acc": np.clip(conf + rng.normal(0, 0.1, n_bins), 0, 1),
                    "extra_reliability_count": np.full(n_bins, n_id // n_bins),
                }
                frac = np.round(np.arange(0, 0.951, 0.05), 2)
                arrs |= {
                    "extra_sparsification_frac": frac,
                    "extra_sparsification_curve": 0.4 + 0.3 * frac,
                    "extra_sparsification_oracle": 0.4 + 0.6 * frac,
                    "extra_sparsification_random": np.full(frac.size, 0.4),
                }
            own_train = m == "mc_dropout"
            stages = (
                {"predict": 0.1 + mi, "evaluate": 0.2}
                | ({"train": 4.0} if own_train else {})
                | ({"hessian": 1.5, "prior": 0.5} if m == "diag_la" else {})
            )
            times += [{"method": m, "seed": s, "stage": st, "seconds": sec} for st, sec in stages.items()]
            if not all_failed:
                writer.save_method(m, s, arrs, [], [], {})
    results = pd.DataFrame([] if all_failed else rows, columns=RESULT_COLUMNS)
    timings = pd.DataFrame([] if all_failed else times, columns=["method", "seed", "stage", "seconds"])
    sc = pd.DataFrame(
        columns=["method", "metric", "mean", "t_low", "t_high", "n_seeds"]
    )  # empty: reports compute it
    if with_seeds_csv:
        g = results.groupby(["method", "metric"], sort=False)["value"]
        sc = g.mean().reset_index().rename(columns={"value": "mean"})
        sc["t_low"], sc["t_high"], sc["n_seeds"] = sc["mean"] - 0.02, sc["mean"] + 0.02, len(seeds)
    paired = None
    if with_paired_csv:
        pr = []
        for s in seeds:
            for m in methods:
                if m != "plain":
                    pr += [
                        {
                            "method": m,
                            "reference": "plain",
                            "seed": s,
                            "metric": "mAP@1",
                            "diff": 0.05,
                            "ci_low": 0.01,
                            "ci_high": 0.09,
                        },
                        {
                            "method": m,
                            "reference": "plain",
                            "seed": s,
                            "metric": "AUROC[heldout]",
                            "diff": -0.01,
                            "ci_low": -0.05,
                            "ci_high": 0.03,
                        },
                    ]
        paired = pd.DataFrame(pr)
    writer.write_tables(results, timings, sc, paired)
    meta = {
        "bench_version": "0.1.0",
        "config": cfg.to_dict(),
        "config_digest": cfg.digest(),
        "methods": list(methods),
        "device": "cpu",
        "device_description": "cpu (fixture)",
        "packages": {"numpy": np.__version__, "pandas": pd.__version__},
        "git_commit": "0123456789abcdef",
        "command": command,
        "failures": failures or [],
        "diagnostics": {},
        "wall_seconds": 12.5,
        "models_trained": 1,
        "class_names": CLASS_NAMES_10,
        "data": {"train_id": 400, "test_id": n, "ood_heldout": n // 2, "ood_noise": n // 2},
    }
    writer.write_config(meta, "complete" if not failures else "complete-with-failures")
    (Path(root) / "cache" / "models").mkdir(parents=True)
    (Path(root) / "cache" / "models" / "dummy.pt").write_bytes(b"not a model")
    return writer.path
