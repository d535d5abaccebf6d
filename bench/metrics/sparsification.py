"""Sparsification: does removing the most uncertain queries raise the retrieval score?

For fractions f = 0, 0.05, ..., 0.95 (step 5%) the fraction f of queries with the largest
uncertainty is removed and the mean of a per-query metric m_q (mAP@1 by default) is taken over the
n_f = N - round(f N) remaining queries (at least 1):

    S(f)      = mean of m_q over the n_f least uncertain queries       (sparsification curve)
    S_or(f)   = mean of the n_f largest m_q                            (oracle: worst queries first)
    S_rand(f) = mean of all m_q                                        (random removal, in expectation)
    AUSE      = integral_0^0.95 (S_or(f) - S(f)) df                    (trapezoid rule on the 20 points)

S_or >= S at every f, so AUSE >= 0, and AUSE = 0 exactly when ordering by uncertainty orders the
metric as well as the oracle does (a perfect uncertainty). Ties in u are broken by query position
(stable sort); the metric is "higher is better", so the oracle removes the lowest m_q first.
The bootstrap CI resamples queries (paired (u, m) rows) and recomputes the whole curve.
"""
from __future__ import annotations

import numpy as np

from bench.metrics.bootstrap import bootstrap_ci

STEP = 0.05
FRACTIONS = np.round(np.arange(0.0, 0.95 + 1e-9, STEP), 10)  # 0, 0.05, ..., 0.95


def _kept(n: int, fractions: np.ndarray) -> np.ndarray:
    return np.maximum(n - np.round(fractions * n).astype(np.int64), 1)


def _curve_from_order(m_sorted: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Mean of the first kept[i] items along the last axis -> [..., F]."""
    cs = np.cumsum(m_sorted, axis=-1)
    return cs[..., kept - 1] / kept


def sparsification_curves(u: np.ndarray, metric: np.ndarray, fractions: np.ndarray = FRACTIONS,
                          axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(curve, oracle), each [..., F]: mean metric after removing the most uncertain / the worst
    fraction f of queries (vectorised over leading axes)."""
    u = np.moveaxis(np.asarray(u, np.float64), axis, -1)
    m = np.moveaxis(np.asarray(metric, np.float64), axis, -1)
    kept = _kept(m.shape[-1], np.asarray(fractions))
    by_u = np.take_along_axis(m, np.argsort(u, axis=-1, kind="stable"), axis=-1)  # most certain first
    best_first = -np.sort(-m, axis=-1)
    return _curve_from_order(by_u, kept), _curve_from_order(best_first, kept)


def ause(u: np.ndarray, metric: np.ndarray, fractions: np.ndarray = FRACTIONS, axis: int = -1) -> np.ndarray:
    """Area between the oracle and the uncertainty sparsification curves (trapezoid over fractions)."""
    curve, oracle = sparsification_curves(u, metric, fractions, axis)
    return np.trapezoid(oracle - curve, np.asarray(fractions, np.float64), axis=-1)


def sparsification_metrics(u: np.ndarray, metric: np.ndarray, n_resamples: int = 1000, level: float = 0.95,
                           seed: int = 0, method: str = "percentile"
                           ) -> tuple[tuple[float, float, float], dict[str, np.ndarray]]:
    """((AUSE, ci_low, ci_high), extras) with extras sparsification_frac, _curve, _oracle, _random [F]."""
    u = np.asarray(u, np.float64)
    m = np.asarray(metric, np.float64)
    curve, oracle = sparsification_curves(u, m)

    def stat(uu, mm, axis=-1):
        return ause(uu, mm, axis=axis)[None]

    ci = bootstrap_ci((u, m), stat, n_resamples, level, seed, paired=True, method=method)
    extras = {"sparsification_frac": FRACTIONS.copy(), "sparsification_curve": curve,
              "sparsification_oracle": oracle, "sparsification_random": np.full(FRACTIONS.shape, m.mean())}
    return ci.triple(0), extras
