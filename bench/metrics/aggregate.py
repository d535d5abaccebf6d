"""Summaries over a run: across-seed means with t-intervals, paired differences against a reference
method on the same queries, and the wall-time breakdown per stage."""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import pandas as pd

from bench.conventions import CORRECTNESS_METRIC, ID_SET, STAGES, score_arrays
from bench.metrics.ood import OOD_METRICS
from bench.metrics.paired import difference_ci, ece_of, mean_of, ood_of, ranking_of
from bench.metrics.ranking import RANKING_METRICS
from bench.metrics.seed_interval import seed_interval
from bench.metrics.uncertainty import score_from_var

SEED_COLUMNS = ["method", "metric", "mean", "t_low", "t_high", "n_seeds"]
PAIRED_COLUMNS = ["method", "reference", "seed", "metric", "diff", "ci_low", "ci_high"]
CORRECTNESS = f"pq_{CORRECTNESS_METRIC}"  # per-query array of the correctness


def seed_summary(results: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """(method, metric, mean, t_low, t_high, n_seeds) from tidy results rows (one value per seed).

    mean of the finite per-seed values v_1..v_n (NaN, i.e. n/a, is left out; n_seeds = n) and the
    Student-t interval on the metric's own scale (`bench.metrics.seed_interval`: logit, Fisher-z or
    log for bounded metrics, so it stays inside their range); NaN interval when n < MIN_SEEDS (3)."""
    rows = []
    for (m, met), g in results.groupby(["method", "metric"], sort=False):
        v = g["value"].to_numpy(dtype=float)
        mean, lo, hi = seed_interval(v, str(met), level)
        n = int(np.isfinite(v).sum())
        rows.append({"method": m, "metric": met, "mean": mean, "t_low": lo, "t_high": hi, "n_seeds": n})
    return pd.DataFrame(rows, columns=SEED_COLUMNS)


def stage_breakdown(timings: pd.DataFrame) -> pd.DataFrame:
    """One row per method (first-seen order): seconds per stage (train, hessian, prior, predict,
    evaluate, then any other stage) summed over seeds, `total`, and `share` = total / run total."""
    if timings.empty:
        return pd.DataFrame(columns=["method", *STAGES, "total", "share"])
    methods = list(dict.fromkeys(timings["method"]))
    extra = [s for s in dict.fromkeys(timings["stage"]) if s not in STAGES]
    wide = timings.pivot_table(
        index="method", columns="stage", values="seconds", aggfunc="sum", fill_value=0.0
    )
    wide = wide.reindex(index=methods, columns=[*STAGES, *extra], fill_value=0.0).astype(float)
    wide["total"] = wide.sum(axis=1)
    grand = float(wide["total"].sum())
    wide["share"] = wide["total"] / grand if grand > 0 else float("nan")
    wide.columns.name = None
    return wide.reset_index().rename(columns={"index": "method"})


def _score_vectors(
    arrs: dict[str, np.ndarray], id_score: str | None, ood_score: str | None
) -> tuple[np.ndarray | None, dict[str, np.ndarray], np.ndarray | None]:
    """(ID vector of id_score, {OOD set: vector of ood_score}, ID vector of ood_score) from the saved
    score vectors; without them (older run folders) tr Sigma from id_var / ood_<s>_var."""
    saved = score_arrays(arrs)
    if saved:
        sets = {s for s, _ in saved if s != ID_SET}
        ood = {s: saved[(s, ood_score)] for s in sets if (s, ood_score) in saved}
        return saved.get((ID_SET, id_score)), ood, saved.get((ID_SET, ood_score))
    if "id_var" not in arrs:
        return None, {}, None
    u = score_from_var(arrs["id_var"])
    ood = {m[1]: score_from_var(v) for k, v in arrs.items() if (m := re.fullmatch(r"ood_(.+)_var", k))}
    return u, ood, u


def _pairs(
    arrs: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    n_resamples: int,
    level: float,
    seed: int,
    id_score: str | None,
    ood_score: str | None,
) -> Iterable[tuple[str, float, float, float]]:
    """(metric, diff, lo, hi) for every metric both sides can be paired on."""
    boot = dict(n_resamples=n_resamples, level=level, seed=seed)
    for key, a in arrs.items():
        if key.startswith("pq_") and key in ref and len(ref[key]) == len(a):
            ok = np.isfinite(a) & np.isfinite(ref[key])
            if ok.sum() >= 1:
                yield (key[3:], *difference_ci([(mean_of(a[ok]), mean_of(ref[key][ok]))], **boot).triple())
    ua, ood_a, va = _score_vectors(arrs, id_score, ood_score)
    ub, ood_b, vb = _score_vectors(ref, id_score, ood_score)
    have = lambda k: k in arrs and k in ref  # noqa: E731
    if ua is not None and ub is not None and ua.shape == ub.shape:
        if have("extra_confidence") and have(CORRECTNESS):
            sides = (
                ece_of(arrs["extra_confidence"], arrs[CORRECTNESS]),
                ece_of(ref["extra_confidence"], ref[CORRECTNESS]),
            )
            yield ("ECE", *difference_ci([sides], **boot).triple())
        if have(CORRECTNESS):
            ause_row = [RANKING_METRICS.index("AUSE")]
            sides = (ranking_of(ua, arrs[CORRECTNESS], ause_row), ranking_of(ub, ref[CORRECTNESS], ause_row))
            yield ("AUSE", *difference_ci([sides], **boot).triple())
    if va is None or vb is None or va.shape != vb.shape:
        return
    for s, oa in ood_a.items():
        ob = ood_b.get(s)
        if ob is None or oa.shape != ob.shape or len(oa) == 0:
            continue
        ci = difference_ci([(ood_of(va, oa), ood_of(vb, ob))], **boot)
        for i, name in enumerate(OOD_METRICS):
            yield (f"{name}[{s}]", *ci.triple(i))


def paired_differences(
    perquery: dict[tuple[str, int], dict[str, np.ndarray]],
    reference: str,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    metrics: Iterable[str] | None = None,
    id_score: str | None = None,
    ood_score: str | None = None,
) -> pd.DataFrame:
    """(method, reference, seed, metric, diff, ci_low, ci_high) for every method against `reference`
    on each seed both ran, in the order of `perquery` ({(method, seed): per-query arrays});
    `seed` seeds the bootstrap, `metrics` restricts the metric names (None: all that pair).

    diff = metric(method) - metric(reference) on the same queries, with a percentile bootstrap CI
    that resamples the *same* query indices for both methods (`bench.metrics.paired`: sorted once):
    - per-query metrics `pq_<m>` (mAP@K, Recall@K): diff of means;
    - ECE (both with uncertainty): from extra_confidence and the correctness (the confidence maps
      stay the ones fitted in the run); AUSE: from the saved vectors of `id_score` (the run's
      config id_score) and the correctness;
    - AUROC/AUPR/FPR95/var_ratio[s]: from the saved vectors of `ood_score` on the ID queries and on
      set s, ID and OOD queries resampled separately (stratified), each paired across the two methods.
    Per-query files without score vectors (older runs) use tr Sigma from id_var / ood_<s>_var.
    A metric that either method lacks (uncertainty metrics against the deterministic `plain`) gets
    no row."""
    wanted = None if metrics is None else set(metrics)
    rows = []
    for (m, s), arrs in perquery.items():
        ref = perquery.get((reference, s))
        if m == reference or ref is None:
            continue
        for metric, d, lo, hi in _pairs(arrs, ref, n_resamples, level, seed, id_score, ood_score):
            if wanted is None or metric in wanted:
                rows.append(
                    {
                        "method": m,
                        "reference": reference,
                        "seed": s,
                        "metric": metric,
                        "diff": d,
                        "ci_low": lo,
                        "ci_high": hi,
                    }
                )
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)
