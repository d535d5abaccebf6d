"""The uncertainty score of a query, u_q = tr(Sigma_q): one number per query from its predicted
embedding distribution, larger = more uncertain; none for a deterministic method."""
from __future__ import annotations

import numpy as np
import torch

from bench.errors import BenchError
from bench.method import EmbeddingPrediction


def score_from_var(var: np.ndarray | torch.Tensor) -> np.ndarray:
    """u [N] = tr(Sigma_q) = sum_j Var[z_qj] from per-dimension variances [N, d] (float64): the total
    variance of the embedding (the seed paper's "variance"); the diagonal suffices.

    Raises BenchError on non-finite or negative variances (a method bug that a silent NaN metric
    would hide).
    """
    v = var.detach().cpu().double().numpy() if isinstance(var, torch.Tensor) else np.asarray(var, np.float64)
    if v.ndim == 1:
        v = v[:, None]
    bad = ~np.isfinite(v).all(axis=-1)
    if bad.any():
        raise BenchError(f"non-finite predicted variance for {int(bad.sum())} of {v.shape[0]} queries")
    if (v < 0).any():
        raise BenchError(f"negative predicted variance (min {float(v.min()):.3g}): a covariance must be PSD")
    return v.sum(axis=-1)


def uncertainty_score(pred: EmbeddingPrediction) -> np.ndarray | None:
    """Uncertainty score [N] of a prediction, or None for a deterministic method (no variance)."""
    if pred.var is None:
        return None
    return score_from_var(pred.var)
