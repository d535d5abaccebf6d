"""Sparsification: does removing the most uncertain queries raise the retrieval score? Curves and
the area between them and the oracle's (AUSE)."""

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


def sparsification_curves(
    u: np.ndarray, metric: np.ndarray, fractions: np.ndarray = FRACTIONS, axis: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """(curve, oracle), each [..., F], vectorised over leading axes. With n_f = N - round(f N) (at
    least 1) queries kept after removing a fraction f (0, 0.05, ..., 0.95):
    S(f) = mean of the per-query metric m_q (higher is better) over the n_f least uncertain queries
    (ties in u broken by position: stable sort); oracle S_or(f) = mean of the n_f largest m_q."""
    u = np.moveaxis(np.asarray(u, np.float64), axis, -1)
    m = np.moveaxis(np.asarray(metric, np.float64), axis, -1)
    by_u = np.take_along_axis(m, np.argsort(u, axis=-1, kind="stable"), axis=-1)  # most certain first
    return curves_from_order(by_u, m, fractions)


def curves_from_order(
    m_by_u: np.ndarray, m: np.ndarray, fractions: np.ndarray = FRACTIONS
) -> tuple[np.ndarray, np.ndarray]:
    """(curve, oracle) [..., F] from the metric sorted most certain first, m_by_u [..., N], and the
    metric itself (for the oracle order; a 0/1 metric needs no sort: its oracle keeps the ones first)."""
    kept = _kept(m.shape[-1], np.asarray(fractions))
    if np.isin(m, (0.0, 1.0)).all():
        ones = m.sum(-1, keepdims=True)
        oracle = np.minimum(ones, kept) / kept
    else:
        oracle = _curve_from_order(-np.sort(-m, axis=-1), kept)
    return _curve_from_order(m_by_u, kept), oracle


def ause(u: np.ndarray, metric: np.ndarray, fractions: np.ndarray = FRACTIONS, axis: int = -1) -> np.ndarray:
    """AUSE = integral_0^0.95 (S_or(f) - S(f)) df (trapezoid rule on the fractions). S_or >= S, so
    AUSE >= 0, and AUSE = 0 exactly when u orders the metric as well as the oracle does."""
    curve, oracle = sparsification_curves(u, metric, fractions, axis)
    return np.trapezoid(oracle - curve, np.asarray(fractions, np.float64), axis=-1)


def aurg(u: np.ndarray, metric: np.ndarray, fractions: np.ndarray = FRACTIONS, axis: int = -1) -> np.ndarray:
    """AURG = integral_0^0.95 (S(f) - S_rand) df, the area under the gain over random removal
    (S_rand = mean of all m_q, the expected curve of a random order) = AUSE_random - AUSE.
    > 0: the score orders queries better than chance; 0 in expectation for a random score."""
    curve, _ = sparsification_curves(u, metric, fractions, axis)
    m = np.moveaxis(np.asarray(metric, np.float64), axis, -1)
    return np.trapezoid(curve - m.mean(-1, keepdims=True), np.asarray(fractions, np.float64), axis=-1)


def sparsification_metrics(
    u: np.ndarray, metric: np.ndarray, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[tuple[float, float, float], dict[str, np.ndarray]]:
    """((AUSE, ci_low, ci_high), extras) with the extras of `sparsification_extras`. The CI resamples
    paired (u, m) rows and recomputes the whole curve. (Evaluation gets AUSE, AURG and the Spearman
    diagnostics from one bootstrap: bench.metrics.ranking.)"""
    u = np.asarray(u, np.float64)
    m = np.asarray(metric, np.float64)

    def stat(uu, mm, axis=-1):
        return ause(uu, mm, axis=axis)[None]

    ci = bootstrap_ci((u, m), stat, n_resamples, level, seed, paired=True)
    return ci.triple(0), sparsification_extras(u, m)


def sparsification_extras(u: np.ndarray, metric: np.ndarray) -> dict[str, np.ndarray]:
    """The curves of a plot: sparsification_frac, _curve, _oracle, _random [F] (random removal: the
    mean of all m_q, in expectation)."""
    m = np.asarray(metric, np.float64)
    curve, oracle = sparsification_curves(u, m)
    return {
        "sparsification_frac": FRACTIONS.copy(),
        "sparsification_curve": curve,
        "sparsification_oracle": oracle,
        "sparsification_random": np.full(FRACTIONS.shape, m.mean()),
    }
