"""Uncertainty scores: one number per query from a predicted embedding distribution.

The default score is the trace of the query's predicted embedding covariance,

    u_q = tr(Sigma_q) = sum_j Var[z_qj],

i.e. the total variance of the embedding (the seed paper's "variance"). It depends only on the
diagonal, so `EmbeddingPrediction.var` [N, d] suffices. Other scores are registered in `SCORES` and
chosen by name; every score is "larger = more uncertain". Methods without uncertainty
(`var is None`) have no score: the functions return None and every uncertainty metric is n/a (NaN).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from bench.conventions import DEFAULT_SCORE
from bench.errors import BenchError
from bench.method import EmbeddingPrediction


def _trace(var: np.ndarray) -> np.ndarray:
    """tr(Sigma) = sum_j var_j."""
    return var.sum(axis=-1)


def _max_var(var: np.ndarray) -> np.ndarray:
    """max_j var_j: the largest marginal variance."""
    return var.max(axis=-1)


def _log_det_diag(var: np.ndarray) -> np.ndarray:
    """sum_j log var_j: log-determinant of the diagonal covariance (log-volume; floor 1e-30)."""
    return np.log(np.maximum(var, 1e-30)).sum(axis=-1)


SCORES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "trace": _trace,
    "max_var": _max_var,
    "logdet_diag": _log_det_diag,
}


def score_from_var(var: np.ndarray | torch.Tensor, score: str = DEFAULT_SCORE) -> np.ndarray:
    """Uncertainty score [N] from per-dimension variances [N, d] (float64).

    Raises BenchError on an unknown score name or on non-finite / negative variances (a method bug
    that a silent NaN metric would hide).
    """
    if score not in SCORES:
        raise BenchError(f"unknown uncertainty score {score!r}; known scores: {', '.join(SCORES)}")
    v = var.detach().cpu().double().numpy() if isinstance(var, torch.Tensor) else np.asarray(var, np.float64)
    if v.ndim == 1:
        v = v[:, None]
    bad = ~np.isfinite(v).all(axis=-1)
    if bad.any():
        raise BenchError(f"non-finite predicted variance for {int(bad.sum())} of {v.shape[0]} queries")
    if (v < 0).any():
        raise BenchError(f"negative predicted variance (min {float(v.min()):.3g}): a covariance must be PSD")
    return SCORES[score](v)


def uncertainty_score(pred: EmbeddingPrediction, score: str = DEFAULT_SCORE) -> np.ndarray | None:
    """Uncertainty score [N] of a prediction, or None for a deterministic method (no variance)."""
    if pred.var is None:
        return None
    return score_from_var(pred.var, score)
