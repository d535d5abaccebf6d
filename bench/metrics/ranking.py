"""How well an uncertainty score orders the ID queries by retrieval correctness, from one sort of the
score per bootstrap resample: AUSE and AURG (sparsification, bench.metrics.sparsification) and the
confound diagnostics Spearman and Spearman_within (bench.metrics.correlation)."""
from __future__ import annotations

import numpy as np

from bench.metrics.bootstrap import bootstrap_ci
from bench.metrics.correlation import as_rows, class_codes, is_binary, pearson_rows, sorted_ranks, within_class_pearson
from bench.metrics.sparsification import FRACTIONS, curves_from_order

RANKING_METRICS = ("AUSE", "AURG", "Spearman", "Spearman_within")


def ranking_statistics(u: np.ndarray, m: np.ndarray, codes: np.ndarray, axis: int = -1) -> np.ndarray:
    """[4, ...]: AUSE, AURG, Spearman(u, m) and the within-class mean Spearman of score u against the
    per-query metric m (higher is better), classes `codes` (class_codes), vectorised over leading
    axes. Equal to ause(), aurg(), spearman() and within_class_spearman() (tested); one stable sort
    of u serves all four (plus a radix sort of the class codes)."""
    lead, (u, m, codes) = as_rows(np.asarray(u, np.float64), np.asarray(m, np.float64), np.asarray(codes), axis=axis)
    codes = codes.astype(np.int16) if codes.size and codes.max() < 2 ** 15 else codes.astype(np.int64)
    order, ranks, within = sorted_ranks(u, codes)
    curve, oracle = curves_from_order(np.take_along_axis(m, order, axis=-1), m)
    f = np.asarray(FRACTIONS, np.float64)
    ause = np.trapezoid(oracle - curve, f, axis=-1)
    aurg = np.trapezoid(curve - m.mean(-1, keepdims=True), f, axis=-1)
    if is_binary(m):
        rm, wm = m, m
    else:
        _, rm, wm = sorted_ranks(m, codes)
    rho = pearson_rows(ranks, rm)
    rho_within = within_class_pearson(within, wm, codes)
    return np.stack([ause, aurg, rho, rho_within]).reshape(4, *lead)


def ranking_metrics(u: np.ndarray, metric: np.ndarray, classes: np.ndarray, n_resamples: int = 1000,
                    level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """{AUSE, AURG, Spearman, Spearman_within: (value, ci_low, ci_high)} of score u [N] against the
    per-query metric [N] (the queries' true classes [N] only for the within-class mean); percentile
    bootstrap over queries, rows (u, metric, class) resampled together."""
    codes = class_codes(classes).astype(np.float64)

    def stat(uu, mm, cc, axis=-1):
        return ranking_statistics(uu, mm, cc.astype(np.int64), axis)

    ci = bootstrap_ci((np.asarray(u, np.float64), np.asarray(metric, np.float64), codes), stat, n_resamples, level,
                      seed, paired=True)
    return {m: ci.triple(i) for i, m in enumerate(RANKING_METRICS)}
