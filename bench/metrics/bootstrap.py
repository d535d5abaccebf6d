"""Bootstrap confidence intervals over queries (scipy.stats.bootstrap, fixed seed, vectorised)."""
from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def bootstrap_mean_ci(values: np.ndarray, n_resamples: int = 1000, level: float = 0.95,
                      seed: int = 0, method: str = "percentile") -> tuple[float, float, float]:
    """(mean, ci_low, ci_high) of a per-query vector; the gallery stays fixed, queries are resampled.

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
        res = stats.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=level,
                              method=method, vectorized=True, random_state=np.random.default_rng(seed))
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)
