"""Sort-once bootstrap statistics: AUROC / AUPR / FPR95 / var_ratio, ECE, and the ranking statistics
(AUSE, AURG, R-AUROC, Spearman, Spearman_within) as functions of per-item multiplicities.

A bootstrap resample of n items is the items repeated c_i times (c ~ Multinomial(n, 1/n)). Every
statistic here depends on the resample only through the order of its values and the tie runs, both
fixed by the original data: sorted once, a resample is a vector of weights on the sorted items, and
its statistic is a few cumulative sums, O(n) per resample instead of a sort, O(n log n). Each
`weighted` function equals the corresponding statistic (`bench.metrics.ood`, `calibration`,
`ranking`) on the expanded resample (tested), with one exception stated at
`RankingSort`: queries with tied scores are taken in a fixed order in the sparsification curve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bench.metrics.correlation import class_codes, mean_class_pearson, tie_runs
from bench.metrics.sparsification import FRACTIONS, _kept


def cumsum_rows(x: np.ndarray) -> np.ndarray:
    """np.cumsum(x, axis=-1) of a float64 array, through torch's kernel: the same numbers bit for bit
    (both accumulate each row in order in float64; tested), 2-3x faster than numpy's on CPU, where the
    cumulative sums of [resamples, items] weights are the bootstraps' largest passes."""
    return torch.cumsum(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)), -1).numpy()


def _before(cum: np.ndarray, start: np.ndarray) -> np.ndarray:
    """cum[..., start - 1], 0 where start == 0 (the cumulative sum before each run). (Gathers along the last
    axis here use np.take: `x[..., idx]` returns a non-C-contiguous array, which made every later pass over
    the [resamples, items] arrays ~3x slower.)"""
    out = np.take(cum, np.maximum(start - 1, 0), axis=-1)
    out[..., start == 0] = 0.0
    return out


class OODSort:
    """ID scores a [n0] and OOD scores b [n1] pooled and sorted once (descending); `weighted(c_a, c_b)`
    gives `bench.metrics.ood.ood_statistics` [4, batch] of the resample with multiplicities c_a
    [batch, n0], c_b [batch, n1] (stratified: each group keeps its size)."""

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        self.n0, self.n1 = a.shape[0], b.shape[0]
        s = np.concatenate([a, b])
        self.order = np.argsort(-s, kind="stable")
        self.is_ood = self.order >= self.n0
        self.start, self.end = tie_runs(s[self.order])
        self.last = self.end == np.arange(s.shape[0])
        self.a, self.b = a, b

    def weighted(self, ca: np.ndarray, cb: np.ndarray, tpr_level: float = 0.95) -> np.ndarray:
        w = np.take(np.concatenate([ca, cb], axis=-1), self.order, axis=-1)  # weights in sorted order
        w1 = np.where(self.is_ood, w, 0.0)
        w0 = w - w1
        tp, fp = cumsum_rows(w1), cumsum_rows(w0)
        tp_end, fp_end = np.take(tp, self.end, axis=-1), np.take(fp, self.end, axis=-1)
        tp_before = _before(tp, self.start)
        n0, n1 = self.n0, self.n1
        auroc = (w0 * (tp_before + tp_end)).sum(-1) / (2.0 * n0 * n1)
        with np.errstate(invalid="ignore", divide="ignore"):
            prec = np.where(w1 > 0, tp_end / np.maximum(tp_end + fp_end, 1e-300), 0.0)
        aupr = (w1 * prec).sum(-1) / n1
        hit = self.last & (tp >= tpr_level * n1 - 1e-9)
        k = np.argmax(hit, axis=-1)
        fpr = np.take_along_axis(fp, k[..., None], axis=-1)[..., 0] / n0
        den = (ca * self.a).sum(-1) / n0
        num = (cb * self.b).sum(-1) / n1
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)
        return np.stack([auroc, aupr, fpr, ratio])


class CalibrationSort:
    """Confidences p [n] and correctness c [n] sorted once by p; `weighted(w)` [1, batch] is
    `bench.metrics.calibration.ece` of the resample with multiplicities w [batch, n] (equal-mass bins
    of tie runs, as `_binned_sums`)."""

    def __init__(self, p: np.ndarray, c: np.ndarray, n_bins: int) -> None:
        p, c = np.asarray(p, np.float64), np.asarray(c, np.float64)
        self.order = np.argsort(p, kind="stable")
        self.p, self.c = p[self.order], c[self.order]
        self.start, _ = tie_runs(self.p)
        self.n, self.bins = p.shape[0], max(1, min(n_bins, p.shape[0]))

    def weighted(self, w: np.ndarray) -> np.ndarray:
        ws = np.take(w, self.order, axis=-1)
        rows = ws.shape[0]
        start = _before(cumsum_rows(ws), self.start)  # the run's first position in the resample
        b = np.minimum(start * self.bins // self.n, self.bins - 1).astype(
            np.int64
        )  # a run of weight 0 at the end: n
        b += (np.arange(rows) * self.bins)[:, None]
        sums = lambda v: np.bincount(b.ravel(), (ws * v).ravel(), minlength=rows * self.bins)  # noqa: E731
        return (np.abs(sums(self.c) - sums(self.p)).reshape(rows, self.bins).sum(-1) / self.n)[None]


class RankingSort:
    """Score u [n], a 0/1 metric m [n] (higher is better) and classes [n], sorted once by u (and once by
    class, then u); `weighted(w)` [5, batch] is `bench.metrics.ranking.ranking_statistics` (AUSE, AURG,
    R-AUROC, Spearman, Spearman_within) of the resample with multiplicities w [batch, n].

    Ranks are mean ranks of tie runs, as on the expanded resample. The sparsification curve keeps the
    least uncertain queries first; among queries with *equal* u it takes them in the original order
    (the expanded resample would take them in resample order): either is an arbitrary tie-break, and
    the point estimate is the same."""

    def __init__(self, u: np.ndarray, m: np.ndarray, classes: np.ndarray) -> None:
        u, m = np.asarray(u, np.float64), np.asarray(m, np.float64)
        if not np.isin(m, (0.0, 1.0)).all():
            raise ValueError("RankingSort needs a 0/1 metric")
        self.n = u.shape[0]
        self.order = np.argsort(u, kind="stable")
        self.m = m[self.order]
        self.start, self.end = tie_runs(u[self.order])
        codes = class_codes(classes).astype(np.int64)
        self.order2 = np.lexsort((u, codes))  # by class, then u
        self.codes2 = codes[self.order2]
        self.m2 = m[self.order2]
        breaks = np.ones(self.n, dtype=bool)
        breaks[1:] = self.codes2[1:] != self.codes2[:-1]
        self.start2, self.end2 = tie_runs(u[self.order2], breaks)
        self.class_start = np.maximum.accumulate(np.where(breaks, np.arange(self.n), 0))
        self.class_starts = np.flatnonzero(breaks)
        self.kept = _kept(self.n, np.asarray(FRACTIONS))

    @staticmethod
    def _mean_ranks(W: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        lo = _before(W, start)
        return lo + (np.take(W, end, axis=-1) - lo + 1.0) / 2.0

    def weighted(self, w: np.ndarray, rows: Sequence[int] | None = None) -> np.ndarray:
        """[5, batch], or only `rows` of it (indices into RANKING_METRICS' order; a paired criterion
        needs one, and the others' cumulative sums are then skipped)."""
        want = range(5) if rows is None else list(rows)
        m = self.m
        ws = np.take(w, self.order, axis=-1)
        W = cumsum_rows(ws)
        CM = cumsum_rows(ws * m)
        ones = CM[..., -1]
        out: dict[int, np.ndarray] = {}
        if {0, 1} & set(want):
            out[0], out[1] = self._sparsification(W, CM, ones)
        if {2, 3} & set(want):
            ranks = self._mean_ranks(W, self.start, self.end)
            wrong = ws * (1.0 - m)
            n_w, n_r = wrong.sum(-1), ones
            with np.errstate(invalid="ignore", divide="ignore"):
                err = ((ranks * wrong).sum(-1) - n_w * (n_w + 1) / 2) / (n_w * n_r)
            out[2] = np.where((n_w > 0) & (n_r > 0), err, np.nan)
            out[3] = _weighted_pearson(ranks, m, ws) if 3 in want else None
        if 4 in want:
            out[4] = self._within(w)
        return np.stack([out[r] for r in want])

    def _sparsification(
        self, W: np.ndarray, CM: np.ndarray, ones: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(AUSE, AURG): the mean of m over the first k items of the expanded sorted resample."""
        n, m = self.n, self.m
        rows = W.shape[0]
        # the item holding position k of each row: one search of the rows laid end to end (W + row offset)
        off = (np.arange(rows) * (n + 1.0))[:, None]
        flat = np.searchsorted((W + off).ravel(), (self.kept[None, :] + off).ravel()).reshape(rows, -1)
        j = np.minimum(flat - (np.arange(rows) * n)[:, None], n - 1)
        Wj, CMj = np.take_along_axis(W, j, -1), np.take_along_axis(CM, j, -1)
        curve = (CMj - (Wj - self.kept) * m[j]) / self.kept
        oracle = np.minimum(ones[..., None], self.kept) / self.kept
        f = np.asarray(FRACTIONS, np.float64)
        ause = np.trapezoid(oracle - curve, f, axis=-1)
        aurg = np.trapezoid(curve - (ones / n)[..., None], f, axis=-1)
        return ause, aurg

    def _within(self, w: np.ndarray) -> np.ndarray:
        """Spearman_within: the mean over classes of the within-class rank correlation."""
        ws2 = np.take(w, self.order2, axis=-1)
        W2 = cumsum_rows(ws2)
        within = self._mean_ranks(W2, self.start2, self.end2) - _before(W2, self.class_start)
        seg = lambda v: np.add.reduceat(v, self.class_starts, axis=-1)  # noqa: E731  (classes are contiguous here)
        wm2 = ws2 * self.m2
        return mean_class_pearson(
            seg(ws2),
            seg(ws2 * within),
            seg(wm2),
            seg(wm2 * within),
            seg(ws2 * within * within),
            seg(wm2),
            binary_a=False,
            binary_b=True,
        )


def _weighted_pearson(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation of a and b along the last axis with item weights w (multiplicities):
    `pearson_rows` of the expanded rows."""
    sw = w.sum(-1, keepdims=True)
    a = a - (w * a).sum(-1, keepdims=True) / sw
    b = b - (w * b).sum(-1, keepdims=True) / sw
    den = np.sqrt((w * a * a).sum(-1) * (w * b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (w * a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)
