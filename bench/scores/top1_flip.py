"""u_q = P_s[ y(r_1^s(q)) != y(r_1^mu(q)) ]: the probability, under the method's predictive, that
the label of the top-1 retrieved item differs from the label retrieved by the mean embeddings.

r_1^mu(q) is the gallery item nearest to q under the mean embeddings; r_1^s(q) the nearest under
draw s (query and gallery drawn jointly when the method has joint samples), searched among q's K_c
candidates (exact when K_c covers the gallery). Estimated as (1/S) sum_s 1[...]. Gallery labels
only: the score asks whether the *retrieved* label is stable, not whether it is right."""
from __future__ import annotations

import numpy as np
import torch

from bench.metrics.uncertainty import ScoreInputs
from bench.registry import register_score


@register_score("top1_flip")
def top1_flip(inputs: ScoreInputs) -> np.ndarray:
    """Probability that the top-1 retrieved label changes under the predictive."""
    out = np.empty(inputs.n)
    for ch in inputs.candidate_chunks():
        best = ch.dist.argmin(dim=-1)  # [S, n]: candidate retrieved under each draw
        lab = torch.gather(ch.labels.expand(best.shape[0], *ch.labels.shape), 2, best[..., None])[..., 0]
        out[ch.rows] = (lab != ch.labels[None, :, 0]).double().mean(0).numpy()
    return out
