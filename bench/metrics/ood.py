"""OOD separation by an uncertainty score (OOD positive, larger = more likely OOD): AUROC, AUPR,
FPR at 95% TPR and the variance ratio, vectorised over leading axes so a bootstrap is one call."""

from __future__ import annotations

import numpy as np

from bench.metrics.bootstrap import BootstrapCI, count_bootstrap_ci
from bench.metrics.correlation import tie_runs
from bench.metrics.weighted import OODSort

OOD_METRICS = ("AUROC", "AUPR", "FPR95", "var_ratio")
TPR_LEVEL = 0.95


def _pooled(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)
    lead = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    a = np.broadcast_to(a, lead + a.shape[-1:])
    b = np.broadcast_to(b, lead + b.shape[-1:])
    s = np.concatenate([a, b], axis=-1)
    y = np.concatenate([np.zeros(a.shape[-1]), np.ones(b.shape[-1])])
    return s, np.broadcast_to(y, s.shape)


def _moved(id_scores: np.ndarray, ood_scores: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.moveaxis(np.asarray(id_scores, np.float64), axis, -1),
        np.moveaxis(np.asarray(ood_scores, np.float64), axis, -1),
    )


def _threshold_stats(
    a: np.ndarray, b: np.ndarray, tpr_level: float = TPR_LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AUROC, AUPR, FPR at tpr_level) from one descending sort of the pooled scores [..., n0 + n1].

    After sorting, tp_i / fp_i count the OOD / ID items at positions <= i. A run of tied scores
    spans positions start..end; the threshold "score >= t" is evaluated at run ends.
    * AUROC: each ID item contributes (#OOD strictly above + 1/2 #OOD tied) = (tp_{start-1} + tp_end)/2.
    * AUPR: each OOD item contributes precision tp_end / (tp_end + fp_end) of its run, / n1.
    * FPR: fp / n0 at the first run end with tp / n1 >= tpr_level.
    """
    n0, n1 = a.shape[-1], b.shape[-1]
    s, y = _pooled(a, b)
    n = s.shape[-1]
    order = np.argsort(-s, axis=-1)  # order within a tie run is irrelevant
    s_sorted = np.take_along_axis(s, order, axis=-1)
    y = np.take_along_axis(y, order, axis=-1)
    del order, s
    tp = np.cumsum(y, axis=-1)
    start, end = tie_runs(s_sorted)
    last = end == np.arange(n)
    del s_sorted
    tp_end = np.take_along_axis(tp, end, axis=-1)
    tp_before = np.where(start > 0, np.take_along_axis(tp, np.maximum(start - 1, 0), axis=-1), 0.0)
    auroc = ((1.0 - y) * (tp_before + tp_end)).sum(axis=-1) / (2.0 * n0 * n1)
    fp_end = (end + 1) - tp_end
    aupr = (y * (tp_end / (tp_end + fp_end))).sum(axis=-1) / n1
    hit = last & (tp >= tpr_level * n1 - 1e-9)
    k = np.argmax(hit, axis=-1)  # the last position has tp = n1, so a hit exists
    fpr = ((k + 1) - np.take_along_axis(tp, k[..., None], axis=-1)[..., 0]) / n0
    return auroc, aupr, fpr


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC = P(b > a) + 1/2 P(b = a) for ID scores a [..., n0] and OOD scores b [..., n1]: the
    Mann-Whitney form (OOD rank sum - n1(n1+1)/2) / (n0 n1), equal to sklearn's roc_auc_score."""
    return _threshold_stats(*_moved(id_scores, ood_scores, axis))[0]


def aupr(id_scores: np.ndarray, ood_scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUPR-Out = average precision sum_t (R_t - R_{t-1}) P_t over the distinct thresholds t in
    decreasing order, P_t / R_t the precision / recall of "score >= t" with OOD positive (equals
    sklearn's average_precision_score; chance level n1 / (n0 + n1))."""
    return _threshold_stats(*_moved(id_scores, ood_scores, axis))[1]


def fpr_at_tpr(
    id_scores: np.ndarray, ood_scores: np.ndarray, axis: int = -1, tpr_level: float = TPR_LEVEL
) -> np.ndarray:
    """FPR at the largest threshold whose TPR is >= tpr_level: the share of ID queries flagged when
    95% of the OOD queries are caught (sklearn: fpr[argmax(tpr >= 0.95)])."""
    return _threshold_stats(*_moved(id_scores, ood_scores, axis), tpr_level)[2]


def var_ratio(id_scores: np.ndarray, ood_scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """mean OOD score / mean ID score, e.g. OOD over ID variance (NaN when the ID mean is 0)."""
    num = np.asarray(ood_scores, np.float64).mean(axis=axis)
    den = np.asarray(id_scores, np.float64).mean(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def ood_statistics(id_scores: np.ndarray, ood_scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """[4, ...]: AUROC, AUPR, FPR95, var_ratio (the order of OOD_METRICS)."""
    a, b = _moved(id_scores, ood_scores, axis)
    return np.stack([*_threshold_stats(a, b), var_ratio(a, b)])


def ood_metrics_ci(
    id_scores: np.ndarray, ood_scores: np.ndarray, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """{metric: (value, ci_low, ci_high)} for OOD_METRICS; stratified bootstrap (ID and OOD
    queries resampled separately, group sizes kept), see bench.metrics.bootstrap; the scores sorted once
    (bench.metrics.weighted.OODSort)."""
    a, b = np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)
    ci: BootstrapCI = count_bootstrap_ci(
        (a.shape[-1], b.shape[-1]), OODSort(a, b).weighted, n_resamples, level, seed
    )
    return {m: ci.triple(i) for i, m in enumerate(OOD_METRICS)}
