"""How well an uncertainty score orders the ID queries by retrieval correctness, from one sort of the
score per bootstrap resample: AUSE and AURG (sparsification, bench.metrics.sparsification), the
error-detection AUROC, and the confound diagnostics Spearman and Spearman_within
(bench.metrics.correlation)."""

from __future__ import annotations

import numpy as np

from bench.metrics.bootstrap import bootstrap_ci, count_bootstrap_ci
from bench.metrics.correlation import (
    as_rows,
    class_codes,
    is_binary,
    pearson_rows,
    sorted_ranks,
    within_class_pearson,
)
from bench.metrics.sparsification import FRACTIONS, curves_from_order
from bench.metrics.weighted import RankingSort

RANKING_METRICS = ("AUSE", "AURG", "R-AUROC", "Spearman", "Spearman_within")


def error_auroc_from_ranks(ranks: np.ndarray, m: np.ndarray) -> np.ndarray:
    """R-AUROC (formerly error_AUROC) = P(u_wrong > u_right) + 1/2 P(u_wrong = u_right): how well the
    score separates the wrong queries (m = 0) from the right ones (m = 1), from the mean ranks of u
    (Mann-Whitney: (R_wrong - n_w (n_w + 1) / 2) / (n_w n_r)). Independent of the error rate, unlike
    AUSE and AURG, so it compares methods of different accuracy. NaN unless m is 0/1 with both values
    present."""
    wrong = 1.0 - m
    n_w, n_r = wrong.sum(-1), m.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * wrong).sum(-1) - n_w * (n_w + 1) / 2) / (n_w * n_r)
    return np.where((n_w > 0) & (n_r > 0) & is_binary(m), auc, np.nan)


def ranking_statistics(u: np.ndarray, m: np.ndarray, codes: np.ndarray, axis: int = -1) -> np.ndarray:
    """[5, ...]: AUSE, AURG, R-AUROC, Spearman(u, m) and the within-class mean Spearman of score
    u against the per-query metric m (higher is better), classes `codes` (class_codes), vectorised
    over leading axes. Equal to ause(), aurg(), sklearn's roc_auc_score(1 - m, u), spearman() and
    within_class_spearman() (tested); one stable sort of u serves all five (plus a radix sort of the
    class codes)."""
    lead, (u, m, codes) = as_rows(
        np.asarray(u, np.float64), np.asarray(m, np.float64), np.asarray(codes), axis=axis
    )
    codes = codes.astype(np.int16) if codes.size and codes.max() < 2**15 else codes.astype(np.int64)
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
    err = error_auroc_from_ranks(ranks, m)
    return np.stack([ause, aurg, err, rho, rho_within]).reshape(len(RANKING_METRICS), *lead)


def ranking_metrics(
    u: np.ndarray,
    metric: np.ndarray,
    classes: np.ndarray,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """{AUSE, AURG, R-AUROC, Spearman, Spearman_within: (value, ci_low, ci_high)} of score u [N] against the
    per-query metric [N] (the queries' true classes [N] only for the within-class mean); percentile
    bootstrap over queries, rows (u, metric, class) resampled together (for a 0/1 metric as item
    multiplicities on the data sorted once, `RankingSort`; else by recomputing on each resample)."""
    u, metric = np.asarray(u, np.float64), np.asarray(metric, np.float64)
    if is_binary(metric):  # sorted once (bench.metrics.weighted): no sort per resample
        ci = count_bootstrap_ci(
            (u.shape[0],), RankingSort(u, metric, classes).weighted, n_resamples, level, seed
        )
        return {m: ci.triple(i) for i, m in enumerate(RANKING_METRICS)}
    codes = class_codes(classes).astype(np.float64)

    def stat(uu, mm, cc, axis=-1):
        return ranking_statistics(uu, mm, cc.astype(np.int64), axis)

    ci = bootstrap_ci((u, metric, codes), stat, n_resamples, level, seed, paired=True)
    return {m: ci.triple(i) for i, m in enumerate(RANKING_METRICS)}
