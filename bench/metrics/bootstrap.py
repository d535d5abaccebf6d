"""Bootstrap confidence intervals over queries (scipy.stats.bootstrap, fixed seed, vectorised).

Two entry points:

* `bootstrap_mean_ci(values)`: the CI of a per-query metric (mAP@K, Recall@K): queries are
  resampled with the gallery fixed (the kNN search is run once), so the statistic is a plain mean.
* `bootstrap_ci(samples, statistic)`: the CI of a statistic that is not a mean of per-query values
  (AUROC, AUPR, FPR95, variance ratio, ECE, AUSE). The statistic is recomputed on every resample.
  With several samples and `paired=False`, each sample is resampled on its own: for OOD metrics the
  ID and the OOD scores are separate samples, so every resample keeps both group sizes
  (stratified bootstrap). With `paired=True` the samples are columns of one table of queries and
  rows are resampled together (ECE: uncertainty, confidence and correctness of the same query).

Interval method: "percentile" (the default: the (1-level)/2 and (1+level)/2 quantiles of the
bootstrap distribution) or "BCa" (bias-corrected and accelerated; needs a jackknife, i.e. one
evaluation per left-out observation, so it costs O(n) extra statistic evaluations). BCa is undefined
on degenerate resamples (every replicate equal to the estimate, or a NaN jackknife), where scipy
returns NaN: the interval then falls back to the percentile interval of the same bootstrap
distribution, and `BootstrapCI.method` records which method produced each interval.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats

DEFAULT_BATCH_ELEMENTS = 4_000_000  # ~32 MB of float64 per vectorised call of the statistic


def bootstrap_mean_ci(values: np.ndarray, n_resamples: int = 1000, level: float = 0.95,
                      seed: int = 0, method: str = "percentile") -> tuple[float, float, float]:
    """(mean, ci_low, ci_high) of a per-query vector; the gallery stays fixed, queries are resampled.

    NaN entries are dropped; with fewer than 2 values, or n_resamples == 0, the CI is NaN.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size < 2 or n_resamples <= 0:
        return mean, float("nan"), float("nan")
    if np.all(v == v[0]):
        return mean, mean, mean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=level,
                              method=method, vectorized=True, random_state=np.random.default_rng(seed))
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass
class BootstrapCI:
    """Point estimates and intervals of a k-output statistic: value, low, high [k]; `method` is
    "percentile" or "BCa" per output (BCa falls back to percentile where it is undefined);
    `distribution` [k, n_resamples] is the bootstrap distribution (None when no CI was computed)."""

    value: np.ndarray
    low: np.ndarray
    high: np.ndarray
    method: list[str]
    distribution: np.ndarray | None = None

    def triple(self, i: int = 0) -> tuple[float, float, float]:
        """(value, low, high) of output i as floats."""
        return float(self.value[i]), float(self.low[i]), float(self.high[i])


def _batch_size(n: int) -> int:
    return max(1, DEFAULT_BATCH_ELEMENTS // max(n, 1))


def bootstrap_ci(samples: Sequence[np.ndarray], statistic: Callable[..., np.ndarray],
                 n_resamples: int = 1000, level: float = 0.95, seed: int = 0, paired: bool = False,
                 method: str = "percentile") -> BootstrapCI:
    """Bootstrap CI of `statistic(*samples, axis=-1)`, which must be vectorised: given arrays of
    shape [..., n_i] it returns [k, ...] (k outputs, reduced along the last axis).

    The point estimate is the statistic on the original samples. Resampling uses
    numpy.random.default_rng(seed) through scipy.stats.bootstrap, in batches of about
    DEFAULT_BATCH_ELEMENTS elements. With n_resamples <= 0, a sample of fewer than 2 items or a NaN
    estimate the interval is NaN. Replicates that are NaN (e.g. a resample where a score is
    undefined) are ignored by the percentile interval.
    """
    samples = [np.asarray(s, dtype=np.float64) for s in samples]
    value = np.atleast_1d(np.asarray(statistic(*samples, axis=-1), dtype=np.float64))
    k = value.shape[0]
    nan = np.full(k, np.nan)
    if n_resamples <= 0 or min(s.shape[-1] for s in samples) < 2 or not np.isfinite(value).any():
        return BootstrapCI(value, nan.copy(), nan.copy(), ["none"] * k)
    n_total = sum(s.shape[-1] for s in samples) if not paired else samples[0].shape[-1] * len(samples)
    kw = dict(vectorized=True, paired=paired, axis=-1, confidence_level=level,
              batch=_batch_size(n_total))

    def stat(*xs, axis=-1):
        return np.asarray(statistic(*xs, axis=axis), dtype=np.float64).reshape(k, *xs[0].shape[:-1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(samples, stat, n_resamples=n_resamples, method="percentile",
                              rng=np.random.default_rng(seed), **kw)
        dist = np.asarray(res.bootstrap_distribution, dtype=np.float64).reshape(k, -1)
        low, high = _percentile(dist, level)
        used = ["percentile"] * k
        if method.lower() == "bca":
            res_b = stats.bootstrap(samples, stat, n_resamples=0, method="BCa", bootstrap_result=res,
                                    rng=np.random.default_rng(seed), **kw)
            bl = np.atleast_1d(np.asarray(res_b.confidence_interval.low, dtype=np.float64))
            bh = np.atleast_1d(np.asarray(res_b.confidence_interval.high, dtype=np.float64))
            ok = np.isfinite(bl) & np.isfinite(bh)
            low, high = np.where(ok, bl, low), np.where(ok, bh, high)
            used = ["BCa" if o else "percentile" for o in ok]
        elif method.lower() != "percentile":
            raise ValueError(f"unknown bootstrap method {method!r}; use 'percentile' or 'BCa'")
    bad = ~np.isfinite(value)
    low[bad], high[bad] = np.nan, np.nan
    return BootstrapCI(value, low, high, used, dist)


def _percentile(dist: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per row of dist [k, B], ignoring NaN replicates (NaN if all are NaN)."""
    a = (1 - level) / 2
    low = np.full(dist.shape[0], np.nan)
    high = np.full(dist.shape[0], np.nan)
    for i, row in enumerate(dist):
        row = row[np.isfinite(row)]
        if row.size:
            low[i], high[i] = np.quantile(row, [a, 1 - a])
    return low, high


def grouped_bootstrap_ci(groups: Sequence[Sequence[np.ndarray]], statistic: Callable[..., np.ndarray],
                         n_resamples: int = 1000, level: float = 0.95, seed: int = 0,
                         max_elements: int = DEFAULT_BATCH_ELEMENTS) -> BootstrapCI:
    """Percentile bootstrap where each group is a tuple of equally long arrays resampled *together*
    (the same indices for every array of the group) and the groups are resampled independently.

    This is the paired-and-stratified scheme that scipy.stats.bootstrap cannot express: comparing two
    methods on the same ID and OOD queries, group 0 = (u_A[id], u_B[id]) and group 1 =
    (u_A[ood], u_B[ood]) keep the pairing of A and B on each query and the ID/OOD group sizes.
    `statistic(*arrays, axis=-1)` gets every array of every group in order, shaped [batch, n_g], and
    returns [k, batch]. Indices come from numpy.random.default_rng(seed), one group after the other,
    in batches of about max_elements elements.
    """
    groups = [[np.asarray(a, np.float64) for a in g] for g in groups]
    for g in groups:
        if len({a.shape[-1] for a in g}) != 1:
            raise ValueError("arrays of one group must have the same length")
    flat = [a for g in groups for a in g]
    value = np.atleast_1d(np.asarray(statistic(*flat, axis=-1), dtype=np.float64))
    k = value.shape[0]
    sizes = [g[0].shape[-1] for g in groups]
    if n_resamples <= 0 or min(sizes) < 2 or not np.isfinite(value).any():
        nan = np.full(k, np.nan)
        return BootstrapCI(value, nan.copy(), nan.copy(), ["none"] * k)
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, n, size=(n_resamples, n)) for n in sizes]
    batch = max(1, max_elements // max(sum(len(g) * n for g, n in zip(groups, sizes)), 1))
    dist = np.empty((k, n_resamples))
    for s in range(0, n_resamples, batch):
        args = [a[i[s:s + batch]] for g, i in zip(groups, idx) for a in g]
        dist[:, s:s + batch] = np.asarray(statistic(*args, axis=-1), dtype=np.float64).reshape(k, -1)
    low, high = _percentile(dist, level)
    bad = ~np.isfinite(value)
    low[bad], high[bad] = np.nan, np.nan
    return BootstrapCI(value, low, high, ["percentile"] * k, dist)
