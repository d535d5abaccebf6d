"""u_q = P_s[ y(r_1^s(q)) != y(r_1^mu(q)) ]: the probability, under the method's predictive, that
the label of the top-1 retrieved item differs from the label retrieved by the mean embeddings.

r_1^mu(q) is the gallery item nearest to q under the mean embeddings; r_1^s(q) the nearest under
draw s (query and gallery drawn jointly when the method has joint samples; the whole gallery is
searched unless `score_candidates` > 0). Estimated as (1/S) sum_s 1[...]. Gallery labels only: the
score asks whether the *retrieved* label is stable, not whether it is right."""

from __future__ import annotations

import numpy as np

from bench.metrics.uncertainty import ScoreInputs
from bench.registry import register_score


@register_score("top1_flip")
def top1_flip(inputs: ScoreInputs) -> np.ndarray:
    """Probability that the top-1 retrieved label changes under the predictive."""
    top1 = inputs.sampled().labels[:, :, 0]  # [S, N]: label retrieved under each draw
    return (top1 != inputs.neighbours.labels[None, :, 0]).double().mean(0).numpy()
