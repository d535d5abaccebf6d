"""u_q = H(pbar_q) = -sum_c pbar_q(c) log pbar_q(c), the entropy (nats) of the predictive label
distribution of q's top-K retrieval, K = TOPK:

    pbar_q(c) = (1/S) sum_s (1/K) sum_{k<=K} 1[ y(r_k^s(q)) = c ],

r_k^s(q) the k-th nearest gallery item under draw s (joint draws when the method has them). A rank-level
score: high when the retrieved neighbourhood mixes labels, or when draws retrieve different
labels. With a single draw at the mean it is the entropy of the mean embedding's K-NN labels (the
Bayesian counterpart of `knn_disagreement`)."""

from __future__ import annotations

import numpy as np
import torch

from bench.metrics.uncertainty import ScoreInputs
from bench.registry import register_score

TOPK = 10


@register_score("topk_entropy")
def topk_entropy(inputs: ScoreInputs) -> np.ndarray:
    """Entropy of the predictive top-K label distribution."""
    lab = inputs.sampled().labels[:, :, :TOPK]  # [S, N, k]
    S, n, k = lab.shape
    classes, codes = torch.unique(lab, return_inverse=True)  # labels as 0..C-1
    C = len(classes)
    flat = (codes + C * torch.arange(n)[None, :, None]).reshape(-1)
    p = torch.bincount(flat, minlength=n * C).reshape(n, C).double() / (S * k)  # [N, C]
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).numpy()
