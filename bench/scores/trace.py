"""u_q = tr Sigma_q = sum_j Var[z_qj]: the total variance of the query's embedding (the seed paper's
score). Blind to retrieval: it does not look at the gallery, so it is confounded with where a class
sits in the embedding (outlying classes have the largest variance); a strong OOD score."""

from __future__ import annotations

import numpy as np

from bench.metrics.uncertainty import ScoreInputs, score_from_var, uncertainty_score
from bench.registry import register_score


@register_score("trace")
def trace(inputs: ScoreInputs) -> np.ndarray:
    """Trace of the query's predicted embedding covariance, tr Sigma_q."""
    q = inputs.query
    return uncertainty_score(q) if q.var is not None else score_from_var(q.samples.var(0, unbiased=True))
