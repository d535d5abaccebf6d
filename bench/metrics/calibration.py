"""Retrieval calibration: expected calibration error (ECE) of an uncertainty score against
retrieval correctness (precision@1 in {0, 1}), with the data of a reliability diagram."""

from __future__ import annotations

import numpy as np

from bench.metrics.bootstrap import count_bootstrap_ci
from bench.metrics.correlation import tie_runs
from bench.metrics.weighted import CalibrationSort

DEFAULT_BINS = 10
CV_FOLDS = 2


def confidence_map(u: np.ndarray, correct: np.ndarray, seed: int = 0, folds: int = CV_FOLDS) -> np.ndarray:
    """Confidence p [N] in [0, 1] estimating P(correct) from uncertainty u [N] >= 0 (not a probability).

    A non-increasing isotonic regression g of correctness on u (more uncertain never means more
    confident), **cross-fitted**: the queries are split at random (numpy Generator(seed)) into
    `folds` folds and p_q = g_{-k}(u_q), g_{-k} fitted on the other folds, clipped to [0, 1] outside
    the fitted range. Fitting and scoring on disjoint queries keeps the ECE honest (an in-sample
    isotonic fit is calibrated by construction). ECE measures calibration, not discrimination: an
    uninformative score maps to p ~ base accuracy and is calibrated too; AUSE measures the ranking.
    """
    u = np.asarray(u, np.float64)
    c = np.asarray(correct, np.float64)
    n = u.shape[0]
    from sklearn.isotonic import IsotonicRegression

    if n < 2 * folds:  # too few queries to cross-fit: the base rate is the only honest guess
        return np.full(n, c.mean() if n else np.nan)
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    p = np.empty(n)
    for k in range(folds):
        test = fold == k
        iso = IsotonicRegression(increasing=False, y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(u[~test], c[~test])
        p[test] = iso.predict(u[test])
    return np.clip(p, 0.0, 1.0)


def _binned_sums(
    conf: np.ndarray, correct: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin sums of confidence and of correctness, and counts, along the last axis ([..., B]).

    Sorted by confidence, a query at position i of a run of tied confidences starting at position
    s goes to bin floor(s B / N): bins of N/B queries that never split tied confidences (frequent:
    the isotonic map is a step function), so a tie run can fill a larger bin and leave others empty.
    """
    conf = np.asarray(conf, np.float64)
    correct = np.broadcast_to(np.asarray(correct, np.float64), conf.shape)
    n = conf.shape[-1]
    b = max(1, min(n_bins, n))
    order = np.argsort(conf, axis=-1)  # the order within a tie run does not matter
    cs = np.take_along_axis(conf, order, axis=-1)
    ys = np.take_along_axis(correct, order, axis=-1)
    start, _ = tie_runs(cs)
    rows = int(np.prod(cs.shape[:-1], dtype=np.int64))
    flat = (start * b // n).reshape(rows, n) + (np.arange(rows) * n_bins)[:, None]
    out_shape = (*cs.shape[:-1], n_bins)

    def sums(w: np.ndarray) -> np.ndarray:
        return np.bincount(flat.ravel(), w.reshape(-1), minlength=rows * n_bins).reshape(out_shape)

    return (
        sums(cs),
        sums(ys),
        np.bincount(flat.ravel(), minlength=rows * n_bins).reshape(out_shape).astype(np.float64),
    )


def ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_BINS, axis: int = -1) -> np.ndarray:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| with equal-mass bins (see _binned_sums) along `axis`
    (vectorised over the other axes); n_b queries, mean confidence conf_b, mean correctness acc_b."""
    conf = np.moveaxis(np.asarray(conf, np.float64), axis, -1)
    correct = np.moveaxis(np.asarray(correct, np.float64), axis, -1)
    sc, sy, _ = _binned_sums(conf, correct, n_bins)
    return np.abs(sy - sc).sum(axis=-1) / conf.shape[-1]


def reliability_bins(
    conf: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence [B], mean correctness [B], count [B]) per equal-mass bin; an empty bin
    (possible when tied confidences fill more than one bin) has count 0 and NaN means."""
    sc, sy, cnt = _binned_sums(conf, correct, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sc / cnt, sy / cnt, cnt


def calibration_metrics(
    u: np.ndarray,
    correct: np.ndarray,
    n_bins: int = DEFAULT_BINS,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[tuple[float, float, float], dict[str, np.ndarray]]:
    """((ECE, ci_low, ci_high), extras) for uncertainties u [N] and correctness [N] in {0, 1}.

    The bootstrap CI (paired (p, c) rows resampled; sorted once, bench.metrics.weighted) is conditional
    on the fitted confidence map: each resample is re-binned, g is not refitted.

    extras: reliability_conf, reliability_acc, reliability_count [B] and confidence [N] (the mapped
    confidence per query, so the ECE can be recomputed or paired from the run folder alone).
    """
    u = np.asarray(u, np.float64)
    c = np.asarray(correct, np.float64)
    p = confidence_map(u, c, seed)
    conf_b, acc_b, cnt_b = reliability_bins(p, c, n_bins)

    ci = count_bootstrap_ci((p.shape[0],), CalibrationSort(p, c, n_bins).weighted, n_resamples, level, seed)
    extras = {
        "reliability_conf": conf_b,
        "reliability_acc": acc_b,
        "reliability_count": cnt_b,
        "confidence": p,
    }
    return ci.triple(0), extras
