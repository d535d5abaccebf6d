"""Confound diagnostics of an uncertainty score: its Spearman correlation with retrieval correctness
over all queries and averaged within each true class, vectorised so a bootstrap is one call.

A useful score is negatively correlated with correctness (more uncertain, less often right). A score
that correlates overall but not within a class ranks *classes* (e.g. by how far their cluster lies
from the origin), not the queries of a class. The query's class is used here only, never by a score.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from bench.metrics.bootstrap import bootstrap_ci

SPEARMAN_METRICS = ("Spearman", "Spearman_within")


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; NaN where either side is constant."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def spearman(u: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho of u and c along `axis`: Pearson of their ranks, ties at their mean rank
    (as scipy.stats.spearmanr); NaN when either is constant."""
    u = np.moveaxis(np.asarray(u, np.float64), axis, -1)
    c = np.moveaxis(np.asarray(c, np.float64), axis, -1)
    return _pearson_rows(stats.rankdata(u, axis=-1), stats.rankdata(np.broadcast_to(c, u.shape), axis=-1))


def within_class_spearman(u: np.ndarray, c: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """(1/|C'|) sum_{k in C'} rho_k: the mean over classes k of Spearman's rho of u and c among the
    queries of class k (ties at their mean rank within the class); C' = the classes with a defined
    rho (at least 2 queries, u and c not constant within the class). NaN when C' is empty.

    Vectorised: a query's rank within its class is its rank by (class, value) minus the size of the
    classes before it; per-class sums come from one bincount."""
    u = np.moveaxis(np.asarray(u, np.float64), axis, -1)
    c = np.moveaxis(np.asarray(c, np.float64), axis, -1)
    y = np.moveaxis(np.asarray(y), axis, -1)
    lead, n = u.shape[:-1], u.shape[-1]
    u, c = u.reshape(-1, n), np.broadcast_to(c, lead + (n,)).reshape(-1, n)
    classes, yk = np.unique(np.broadcast_to(y, lead + (n,)).reshape(-1, n), return_inverse=True)
    yk = yk.reshape(-1, n)
    rows, k = u.shape[0], len(classes)
    flat = yk + (np.arange(rows) * k)[:, None]
    count = np.bincount(flat.ravel(), minlength=rows * k).reshape(rows, k).astype(np.float64)
    before = np.take_along_axis(np.cumsum(count, axis=1) - count, yk, axis=1)

    def ranks(v: np.ndarray) -> np.ndarray:
        return stats.rankdata(yk * (n + 1.0) + stats.rankdata(v, axis=-1), axis=-1) - before

    ru, rc = ranks(u), ranks(c)
    s = lambda w: np.bincount(flat.ravel(), w.ravel(), minlength=rows * k).reshape(rows, k)  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):
        mu, mc = s(ru) / count, s(rc) / count
        cov = s(ru * rc) / count - mu * mc
        vu, vc = s(ru * ru) / count - mu ** 2, s(rc * rc) / count - mc ** 2
        tol = 1e-9 * np.maximum(count, 1.0) ** 2
        ok = (count >= 2) & (vu > tol) & (vc > tol)
        rho = np.where(ok, cov / np.sqrt(np.where(ok, vu * vc, 1.0)), np.nan)
        n_ok = ok.sum(1)
        out = np.where(n_ok > 0, np.nansum(rho, axis=1) / np.maximum(n_ok, 1), np.nan)
    return out.reshape(lead)


def spearman_metrics(u: np.ndarray, correct: np.ndarray, classes: np.ndarray, n_resamples: int = 1000,
                     level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """{Spearman, Spearman_within: (value, ci_low, ci_high)} of score u [N] against correctness [N]
    (queries' true classes [N] for the within-class mean); percentile bootstrap over queries (rows
    (u, correct, class) resampled together)."""
    def stat(uu, cc, yy, axis=-1):
        return np.stack([spearman(uu, cc, axis), within_class_spearman(uu, cc, yy.astype(np.int64), axis)])

    ci = bootstrap_ci((np.asarray(u, np.float64), np.asarray(correct, np.float64), np.asarray(classes, np.float64)),
                      stat, n_resamples, level, seed, paired=True)
    return {m: ci.triple(i) for i, m in enumerate(SPEARMAN_METRICS)}
