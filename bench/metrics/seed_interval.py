"""Intervals across seeds that stay inside a metric's range.

A Student-t interval mean +- t s / sqrt(n) on the raw values leaves the range of a bounded metric when
the seeds disagree and n is small (with 2 seeds t_{0.975, 1} = 12.7: AUROC [0.362, 1.177] was
reported). Here the interval is computed on a scale where the metric is unbounded and mapped back:

* metrics in [0, 1] (retrieval precision/recall/mAP, AUROC, AUPR, FPR95, ECE, AUSE, risks): logit
  of the value;
* metrics in [-1, 1] (Spearman, AURG): Fisher's z = atanh of the value;
* positive metrics (the OOD/ID variance ratio, seconds): log of the value;
* anything else: the raw values (the plain t-interval).

On that scale, the Student-t interval of the mean of the n per-seed values, z_bar +- t_{(1+level)/2,
n-1} s_z / sqrt(n), is mapped back through the inverse transform, so its ends are inside the range by
construction (values on the boundary are first moved 1e-6 of the range inside). Why a transformed
t-interval and not a bootstrap over seeds x queries: it needs only the per-seed values (results.csv),
so every metric and every older run folder gets one; and with 3 to 5 seeds a bootstrap over seeds has
at most 10 to 126 distinct resamples and is known to be too narrow, while the t quantile accounts for
the few seeds. With fewer than `MIN_SEEDS` seeds no interval across seeds is given at all (NaN): the
reports say so and show each seed's bootstrap CI over queries instead.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

MIN_SEEDS = 3  # fewer seeds: no interval across seeds (the t quantile with 1 d.o.f. is 12.7)
EDGE = 1e-6  # values on a bound are moved this share of the range inside before transforming

UNIT = (  # metrics in [0, 1], by base name prefix (the `[set]` and `:score` parts removed)
    "mAP",
    "Recall@",
    "MAP@R",
    "precision",
    "AUROC",
    "AUPR",
    "FPR95",
    "ECE",
    "AUSE",
    "error_AUROC",
    "R-AUROC",
    "AURC",
    "E-AURC",
    "AUGRC",
    "Risk@",
    "Coverage@",
)
SIGNED = ("Spearman", "AURG")  # in [-1, 1]
POSITIVE = ("var_ratio", "seconds")  # in (0, inf)

SEED_INTERVAL_NOTE = (
    "interval across seeds: Student-t on the logit (metrics in [0, 1]), Fisher-z (in [-1, 1]) or log "
    f"(positive metrics) scale, mapped back, so it stays in the metric's range; none below {MIN_SEEDS} "
    "seeds"
)


def _base(metric: str) -> str:
    return metric.split(":", 1)[0].split("[", 1)[0]


def metric_range(metric: str) -> tuple[float, float] | None:
    """(low, high) of a metric by its base name (`AUROC[mnist]:trace` -> AUROC -> (0, 1)); None when
    the metric is not known to be bounded."""
    b = _base(metric)
    if b.startswith(UNIT):
        return (0.0, 1.0)
    if b.startswith(SIGNED):
        return (-1.0, 1.0)
    if b.startswith(POSITIVE):
        return (0.0, math.inf)
    return None


def _transform(metric: str):
    """(forward, inverse) maps of the metric's scale (identity for unbounded metrics)."""
    r = metric_range(metric)
    if r is None:
        return (lambda v: v), (lambda z: z)
    lo, hi = r
    if math.isinf(hi):
        floor = EDGE

        return (lambda v: np.log(np.maximum(v, floor))), np.exp
    w = hi - lo

    def fwd(v: np.ndarray) -> np.ndarray:
        u = np.clip((v - lo) / w, EDGE, 1 - EDGE)
        return np.log(u) - np.log1p(-u)  # logit; Fisher z is the same map on (v + 1) / 2, up to a factor 2

    def inv(z: np.ndarray) -> np.ndarray:
        return lo + w / (1 + np.exp(-z))

    return fwd, inv


def seed_interval(values, metric: str, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a metric's per-seed values: the arithmetic mean of the finite values and
    the transformed Student-t interval of the module docstring; NaN interval with fewer than
    `MIN_SEEDS` finite values (NaN mean with none)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < MIN_SEEDS:
        return mean, math.nan, math.nan
    fwd, inv = _transform(metric)
    z = fwd(v)
    half = float(stats.t.ppf((1 + level) / 2, v.size - 1) * z.std(ddof=1) / math.sqrt(v.size))
    lo, hi = float(inv(z.mean() - half)), float(inv(z.mean() + half))
    return mean, lo, hi
