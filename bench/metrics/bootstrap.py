"""Percentile bootstrap confidence intervals over queries (fixed seed, vectorised): plain means,
recomputed statistics (stratified or paired), and method differences on the same queries."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

# 2 MB of float64 per array of a vectorised call: cache-sized, and below glibc's mmap threshold
# (32 MB arrays were fresh pages, page-faulted, on every call)
DEFAULT_BATCH_ELEMENTS = 262_144


def bootstrap_mean_ci(
    values: np.ndarray, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high) of a per-query metric (mAP@K, Recall@K): queries are resampled with
    the gallery fixed (the kNN search ran once), so the statistic is a plain mean.

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
        res = stats.bootstrap(
            (v,),
            np.mean,
            n_resamples=n_resamples,
            confidence_level=level,
            method="percentile",
            vectorized=True,
            random_state=np.random.default_rng(seed),
        )
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass
class BootstrapCI:
    """Point estimates and percentile intervals of a k-output statistic: value, low, high [k];
    `distribution` [k, n_resamples] is the bootstrap distribution (None when no CI was computed)."""

    value: np.ndarray
    low: np.ndarray
    high: np.ndarray
    distribution: np.ndarray | None = None

    def triple(self, i: int = 0) -> tuple[float, float, float]:
        """(value, low, high) of output i as floats."""
        return float(self.value[i]), float(self.low[i]), float(self.high[i])


def _batch_size(n: int) -> int:
    return max(1, DEFAULT_BATCH_ELEMENTS // max(n, 1))


def bootstrap_ci(
    samples: Sequence[np.ndarray],
    statistic: Callable[..., np.ndarray],
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    paired: bool = False,
) -> BootstrapCI:
    """Percentile bootstrap CI of `statistic(*samples, axis=-1)`, for a statistic that is not a mean
    of per-query values (AUROC, ECE, AUSE, ...) and is recomputed on every resample. It must be
    vectorised: given arrays [..., n_i] it returns [k, ...] (k outputs, reduced along the last axis).

    With `paired=False` each sample is resampled on its own: OOD metrics pass the ID and the OOD
    scores as two samples, so every resample keeps both group sizes (stratified bootstrap). With
    `paired=True` the samples are columns of one table of queries and rows are resampled together
    (ECE: confidence and correctness of the same query).

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
        return BootstrapCI(value, nan.copy(), nan.copy())
    n_total = sum(s.shape[-1] for s in samples) if not paired else samples[0].shape[-1] * len(samples)
    kw = dict(vectorized=True, paired=paired, axis=-1, confidence_level=level, batch=_batch_size(n_total))

    def stat(*xs, axis=-1):
        return np.asarray(statistic(*xs, axis=axis), dtype=np.float64).reshape(k, *xs[0].shape[:-1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            samples, stat, n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed), **kw
        )
        dist = np.asarray(res.bootstrap_distribution, dtype=np.float64).reshape(k, -1)
    low, high = _percentile(dist, level)
    bad = ~np.isfinite(value)
    low[bad], high[bad] = np.nan, np.nan
    return BootstrapCI(value, low, high, dist)


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


def resample_counts(n: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicities [rows, n] (float64) of n items in `rows` bootstrap resamples of size n: each row
    counts n uniform draws with replacement (rng.integers), i.e. Multinomial(n, 1/n)."""
    idx = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def count_bootstrap_ci(
    sizes: Sequence[int],
    weighted: Callable[..., np.ndarray],
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    max_elements: int | None = None,
) -> BootstrapCI:
    """Percentile bootstrap of a statistic written as a function of item multiplicities: `weighted(*counts)`
    with counts[g] [batch, sizes[g]] (how often each item of group g is in a resample) returns [k, batch].
    Groups are resampled independently (stratified, each keeps its size); arrays that share a group are
    paired. The point estimate is weighted(ones). For the sort-once statistics of bench.metrics.weighted:
    the same percentile bootstrap as resampling the items, without a sort per resample. Counts come from
    numpy.random.default_rng(seed), one group after the other per batch of about max_elements items."""
    rng = np.random.default_rng(seed)
    return _counts_ci(
        sizes,
        weighted,
        n_resamples,
        level,
        max_elements or DEFAULT_BATCH_ELEMENTS,
        lambda start, rows: [resample_counts(n, rows, rng) for n in sizes],
    )


def grouped_bootstrap_ci(
    groups: Sequence[Sequence[np.ndarray]],
    statistic: Callable[..., np.ndarray],
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    max_elements: int = DEFAULT_BATCH_ELEMENTS,
) -> BootstrapCI:
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
        return BootstrapCI(value, nan.copy(), nan.copy())
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, n, size=(n_resamples, n)) for n in sizes]
    batch = max(1, max_elements // max(sum(len(g) * n for g, n in zip(groups, sizes)), 1))
    dist = np.empty((k, n_resamples))
    for s in range(0, n_resamples, batch):
        args = [a[i[s : s + batch]] for g, i in zip(groups, idx) for a in g]
        dist[:, s : s + batch] = np.asarray(statistic(*args, axis=-1), dtype=np.float64).reshape(k, -1)
    low, high = _percentile(dist, level)
    bad = ~np.isfinite(value)
    low[bad], high[bad] = np.nan, np.nan
    return BootstrapCI(value, low, high, dist)


def grouped_count_bootstrap_ci(
    sizes: Sequence[int],
    weighted: Callable[..., np.ndarray],
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    max_elements: int = DEFAULT_BATCH_ELEMENTS,
) -> BootstrapCI:
    """`grouped_bootstrap_ci`'s resamples (the same seed draws the same indices, group after group) handed
    to a sort-once statistic as multiplicities: `weighted(*counts)`, counts[g] [batch, sizes[g]], returns
    [k, batch], and weighted(ones) is the point estimate. The same intervals as resampling the arrays, up
    to rounding, without a sort per resample (`bench.metrics.weighted`, `bench.metrics.paired`)."""
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, n, size=(n_resamples, n)) for n in sizes]  # all of group 0 first, as grouped_...

    def counts(start: int, rows: int) -> list[np.ndarray]:
        return [
            np.bincount(
                (i[start : start + rows] + (np.arange(rows) * n)[:, None]).ravel(), minlength=rows * n
            )
            .reshape(rows, n)
            .astype(np.float64)
            for i, n in zip(idx, sizes)
        ]

    return _counts_ci(sizes, weighted, n_resamples, level, max_elements, counts)


def _counts_ci(
    sizes: Sequence[int],
    weighted: Callable[..., np.ndarray],
    n_resamples: int,
    level: float,
    max_elements: int,
    counts: Callable[[int, int], list[np.ndarray]],
) -> BootstrapCI:
    """The percentile bootstrap of a multiplicity statistic: point estimate weighted(ones), then
    weighted(*counts(start, rows)) over batches of about max_elements items (NaNs when it cannot run)."""
    value = np.atleast_1d(np.asarray(weighted(*[np.ones((1, n)) for n in sizes]), np.float64)).reshape(-1)
    k = value.shape[0]
    if n_resamples <= 0 or min(sizes) < 2 or not np.isfinite(value).any():
        nan = np.full(k, np.nan)
        return BootstrapCI(value, nan.copy(), nan.copy())
    batch = max(1, max_elements // max(sum(sizes), 1))
    dist = np.empty((k, n_resamples))
    for s in range(0, n_resamples, batch):
        rows = min(batch, n_resamples - s)
        dist[:, s : s + rows] = np.asarray(weighted(*counts(s, rows)), np.float64).reshape(k, rows)
    low, high = _percentile(dist, level)
    bad = ~np.isfinite(value)
    low[bad], high[bad] = np.nan, np.nan
    return BootstrapCI(value, low, high, dist)
