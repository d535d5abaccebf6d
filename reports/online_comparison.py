"""Online vs post-hoc Laplace in one run: each online-Laplace method against the post-hoc Laplace method of
the same structure on the same backbone (same data and seeds): paired differences online − post-hoc on the
same queries (bootstrap CIs, `bench.metrics.aggregate.paired_differences`) on mAP@1, AUROC, AUSE and ECE
per seed, their mean over seeds with a Student-t interval and a plain verdict per metric, and the wall
time of each, with online training's cost against the plain training of the same backbone and epochs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from bench.config import RunConfig, bootstrap_resamples
from bench.conventions import BASE_METHOD as BASE
from bench.conventions import CORRECTNESS_METRIC
from bench.metrics.aggregate import paired_differences
from bench.run_folder import RunFolder
from reports.formats import Block, Cell, Heading, Para, Table
from reports.tables import direction, fmt_ci, header, wide_cells

HEADLINE = (CORRECTNESS_METRIC, "AUROC", "AUSE", "ECE")  # AUROC stands for AUROC[<set>] of every OOD set
MEAN_ROW = "mean over seeds"


def _facts(run: RunFolder) -> dict[str, dict]:
    """Method -> its Laplace facts (online, structure, subset) from the recorded diagnostics."""
    out: dict[str, dict] = {}
    for key, d in (run.meta.get("diagnostics") or {}).items():
        method = key.rpartition("-seed")[0]
        if isinstance(d, dict) and "structure" in d and method not in out:
            out[method] = {
                "online": bool(d.get("online")),
                "structure": d["structure"],
                "subset": d.get("subset"),
                "D": d.get("D"),
            }
    return out


def laplace_pairs(run: RunFolder) -> list[tuple[str, str]]:
    """(online, post-hoc) method pairs of the same structure in the run, in the run's method order."""
    facts = _facts(run)
    ms = [m for m in run.methods if m in facts]
    return [
        (o, p)
        for o in ms
        if facts[o]["online"]
        for p in ms
        if not facts[p]["online"] and facts[p]["structure"] == facts[o]["structure"]
    ]


def _wanted(metric: str) -> bool:
    return metric in HEADLINE or metric.split("[", 1)[0] in HEADLINE


def pair_differences(run: RunFolder, online: str, post_hoc: str) -> pd.DataFrame:
    """paired_differences rows (online − post-hoc) of the headline metrics for every seed both ran."""
    cfg = run.config
    pq = {(m, s): a for s in run.seeds for m in (online, post_hoc) if (a := run.perquery(m, s)) is not None}
    df = paired_differences(
        pq,
        post_hoc,
        bootstrap_resamples(cfg),
        float(cfg.get("ci_level", 0.95)),
        int(cfg.get("seed", 0)),
        id_score=cfg.get("id_score", RunConfig.id_score),
        ood_score=cfg.get("ood_score", RunConfig.ood_score),
    )
    return df[df["metric"].map(_wanted)].reset_index(drop=True)


def seed_means(df: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per metric: the mean of the per-seed differences with a Student-t interval (NaN below 2 seeds)."""
    rows = []
    for metric, g in df.groupby("metric", sort=False):
        v = g["diff"].to_numpy(float)
        v = v[np.isfinite(v)]
        mean = float(v.mean()) if v.size else math.nan
        half = (
            float(stats.t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
            if v.size >= 2
            else math.nan
        )
        rows.append(
            {"metric": metric, "diff": mean, "ci_low": mean - half, "ci_high": mean + half, "n": int(v.size)}
        )
    return pd.DataFrame(rows, columns=["metric", "diff", "ci_low", "ci_high", "n"])


def verdict(metric: str, lo: float, hi: float) -> str:
    """wins / loses / ties for online − post-hoc with interval [lo, hi] (by the metric's direction)."""
    d = direction(metric)
    if d is None or not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
        return "ties"
    return "wins" if (lo > 0) == (d > 0) else "loses"


def _seconds(run: RunFolder, method: str, seed: int) -> dict[str, float]:
    t = run.timings
    d = t[(t["method"] == method) & (t["seed"] == seed)]
    return dict(zip(d["stage"], d["seconds"].astype(float)))


def wall_time_table(run: RunFolder, online: str, post_hoc: str) -> Table:
    """Seconds per stage (mean over seeds) of both methods, the post-hoc one with the shared base training,
    and online training (train + in-training curvature and marglik) over the base (plain) training."""
    stages = ["train", "hessian", "prior", "predict", "evaluate"]
    diags = run.meta.get("diagnostics") or {}
    rows, ratios, shares = [], [], []
    for m in (online, post_hoc):
        per_seed = []
        for s in run.seeds:
            sec = _seconds(run, m, s)
            if not sec:
                continue
            if m == post_hoc:
                sec["train"] = sec.get("train", 0.0) + _seconds(run, BASE, s).get("train", 0.0)
            per_seed.append(sec)
            if m == online and (base := _seconds(run, BASE, s).get("train")):
                in_prior = float((diags.get(f"{m}-seed{s}") or {}).get("prior_seconds_in_training", 0.0))
                total = sec.get("train", 0.0) + sec.get("hessian", 0.0) + in_prior
                ratios.append(total / base)
                shares.append(sec.get("hessian", 0.0) / total if total > 0 else math.nan)
        if not per_seed:
            continue
        mean = {st: float(np.mean([p.get(st, 0.0) for p in per_seed])) for st in stages}
        rows.append(
            [Cell(m + (" (+ base training)" if m == post_hoc else ""))]
            + [Cell(f"{mean[st]:.2f}") for st in stages]
            + [Cell(f"{sum(mean.values()):.2f}")]
        )
    notes = [
        f"Seconds per seed, mean over {len(run.seeds)} seed(s). {online}'s train is its own training "
        "without the curvature (hessian) and marglik (part of prior) computed inside it; the post-hoc "
        "method's train is the shared base training."
    ]
    if ratios:
        notes.append(
            f"Online training / plain training of the same backbone and epochs: "
            f"{', '.join(f'{r:.2f}x' for r in ratios)} "
            "(per seed; base training as recorded in the model cache); "
            f"curvature (hessian) share of online training: {', '.join(f'{100 * x:.0f}%' for x in shares)}."
        )
    return Table(f"Wall time: {online} vs {post_hoc} (s)", ["method", *stages, "total"], rows, notes)


def comparison_blocks(run: RunFolder) -> list[Block]:
    """The report section; empty when the run has no online/post-hoc Laplace pair."""
    pairs = laplace_pairs(run)
    if not pairs:
        return []
    facts, level = _facts(run), float(run.config.get("ci_level", 0.95))
    out: list[Block] = [Heading("Online vs post-hoc Laplace")]
    for online, post in pairs:
        fo, fp = facts[online], facts[post]
        same = fo["subset"] == fp["subset"] or (fo["D"] is not None and fo["D"] == fp["D"])
        subset = lambda f: f["subset"] + (f" (D = {f['D']})" if f["D"] is not None else "")  # noqa: E731
        out.append(Heading(f"{online} − {post} ({fo['structure']})", 3))
        out.append(
            Para(
                f"Structure {fo['structure']}; Bayesian subset: {online} {subset(fo)}, {post} {subset(fp)}"
                + ("" if same else " (different subsets: the difference includes that choice)")
                + ". Rows: paired difference on the same queries with its bootstrap CI, per seed; last row: "
                f"mean over seeds with a Student-t {100 * level:g}% interval. "
                "**bold**: the interval excludes 0.",
                note=True,
            )
        )
        df = pair_differences(run, online, post)
        if df.empty:
            out.append(Para("No per-query arrays to pair.", note=True))
            continue
        means = seed_means(df, level)
        metrics = list(dict.fromkeys(df["metric"]))
        frame = pd.concat(
            [df.assign(row=[f"seed {s}" for s in df["seed"]]), means.assign(row=MEAN_ROW)], ignore_index=True
        )
        rows = list(dict.fromkeys(frame["row"]))
        cells = wide_cells(
            frame, "row", metrics, rows, value="diff", mark_best=False, signed=True, mark_nonzero=True
        )
        out.append(Table(f"{online} − {post}", ["difference", *map(header, metrics)], cells))
        multi = len(df["seed"].unique()) > 1
        src = means if multi else df
        said = []
        for metric in metrics:
            r = src[src["metric"] == metric].iloc[0]
            text = (
                f"{verdict(metric, r['ci_low'], r['ci_high'])} on {metric} "
                f"({fmt_ci(r['diff'], r['ci_low'], r['ci_high'], signed=True)}"
            )
            if multi:
                per = [
                    verdict(metric, lo, hi)
                    for lo, hi in df.loc[df["metric"] == metric, ["ci_low", "ci_high"]].to_numpy()
                ]
                text += "; seeds: " + ", ".join(
                    f"{per.count(v)} {v}" for v in ("wins", "loses", "ties") if per.count(v)
                )
            said.append(text + ")")
        basis = "the t-interval over seeds" if multi else "the bootstrap CI of the one seed"
        out.append(Para(f"{online} against {post}, by {basis}: " + "; ".join(said) + "."))
        out.append(wall_time_table(run, online, post))
    return out
