"""u_q = (1/(K-1)) sum_{k=2..K} 1[ y(r_k^mu(q)) != y(r_1^mu(q)) ], K = TOPK: the share of the 2nd..K-th
nearest gallery items (under the mean embeddings) whose label differs from the top-1's.

Needs no predictive at all (plain gets it too): the baseline any Bayesian score must beat. A
retrieved label that its neighbourhood contradicts is likely wrong, whatever the method's
variance says; a benchmark without this row cannot tell whether a predictive adds anything."""

from __future__ import annotations

import numpy as np

from bench.metrics.uncertainty import ScoreInputs
from bench.registry import register_score

TOPK = 10


@register_score("knn_disagreement", predictive=False)
def knn_disagreement(inputs: ScoreInputs) -> np.ndarray:
    """Share of the K nearest neighbours (mean embedding) that disagree with the top-1 label."""
    lab = inputs.neighbours.labels
    k = min(TOPK, lab.shape[1])
    if k < 2:
        return np.zeros(inputs.n)
    return (lab[:, 1:k] != lab[:, :1]).double().mean(1).numpy()
