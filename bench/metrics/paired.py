"""Paired differences of two methods (or two scores) on the same queries, with bootstrap intervals, from
statistics sorted once (`bench.metrics.weighted`): a resample is a vector of multiplicities shared by
both sides, so each side costs a few cumulative sums per resample instead of a sort. The resamples are
`grouped_bootstrap_ci`'s (same seed, same draws): the intervals equal those of resampling the arrays
up to rounding (tested), except AUSE/AURG, whose ties in the score are broken in a fixed order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bench.metrics.bootstrap import BootstrapCI, grouped_count_bootstrap_ci
from bench.metrics.calibration import DEFAULT_BINS
from bench.metrics.weighted import CalibrationSort, OODSort, RankingSort


@dataclass(frozen=True)
class Weighted:
    """A statistic of one side as a function of per-group multiplicities: `fn(*counts)` [k, batch] with
    counts[g] [batch, sizes[g]]."""

    sizes: tuple[int, ...]
    fn: Callable[..., np.ndarray]


def mean_of(v: np.ndarray) -> Weighted:
    """The mean of a per-query metric over its finite entries (np.nanmean)."""
    v = np.asarray(v, np.float64)
    finite = np.isfinite(v)
    v0 = np.where(finite, v, 0.0)

    def fn(c: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return ((c @ v0) / (c @ finite.astype(np.float64)))[None]

    return Weighted((v.shape[0],), fn)


def ranking_of(u: np.ndarray, correct: np.ndarray, rows: Sequence[int]) -> Weighted:
    """Rows of `ranking_statistics` (AUSE, AURG, R-AUROC, Spearman, Spearman_within) of score u against
    the 0/1 correctness, one class for all queries."""
    sort = RankingSort(u, correct, np.zeros(np.shape(u), np.int64))
    idx = list(rows)
    return Weighted((np.shape(u)[0],), lambda c: sort.weighted(c, idx))


def ece_of(confidence: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_BINS) -> Weighted:
    """`bench.metrics.calibration.ece` of the confidences against the 0/1 correctness."""
    return Weighted((np.shape(confidence)[0],), CalibrationSort(confidence, correct, n_bins).weighted)


def ood_of(id_scores: np.ndarray, ood_scores: np.ndarray, rows: Sequence[int] | None = None) -> Weighted:
    """Rows of `ood_statistics` (AUROC, AUPR, FPR95, var_ratio; None: all) of ID against OOD scores, the
    two sets resampled separately (stratified)."""
    sort = OODSort(id_scores, ood_scores)
    idx = slice(None) if rows is None else list(rows)
    return Weighted((np.shape(id_scores)[0], np.shape(ood_scores)[0]), lambda a, b: sort.weighted(a, b)[idx])


def difference_ci(
    pairs: Sequence[tuple[Weighted, Weighted]], n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> BootstrapCI:
    """The mean over `pairs` (e.g. seeds) of a - b, each pair's two sides on one resample of its queries,
    the pairs' query sets resampled independently; percentile interval."""
    for a, b in pairs:
        if a.sizes != b.sizes:
            raise ValueError(f"paired statistics over different query sets: {a.sizes} vs {b.sizes}")
    sizes = [n for a, _ in pairs for n in a.sizes]

    def weighted(*counts: np.ndarray) -> np.ndarray:
        out, i = [], 0
        for a, b in pairs:
            c = counts[i : i + len(a.sizes)]
            i += len(a.sizes)
            out.append(np.asarray(a.fn(*c)) - np.asarray(b.fn(*c)))
        return np.mean(out, axis=0)

    return grouped_count_bootstrap_ci(sizes, weighted, n_resamples, level, seed)
