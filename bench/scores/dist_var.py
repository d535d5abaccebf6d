"""u_q = Var_s[ d(z_q^s, z_n^s) ]: the variance, under the predictive, of the distance from the
query to its retrieved neighbour n = r_1^mu(q) (nearest gallery item under the mean embeddings),

    d(a, b) = ||rho(a) - rho(b)||   (rho = bench.metrics.retrieval.retrieval_space)

with query and neighbour drawn jointly (so the query-gallery cross-covariance counts) when the method
has joint samples; unbiased sample variance (1/(S-1)) sum_s (d_s - mean d)^2."""

from __future__ import annotations

import numpy as np

from bench.loss import space_distance
from bench.metrics.uncertainty import ScoreInputs
from bench.registry import register_score


@register_score("dist_var")
def dist_var(inputs: ScoreInputs) -> np.ndarray:
    """Variance of the distance to the retrieved neighbour under the predictive (Monte Carlo)."""
    zq, zg = inputs.draws()
    d = space_distance(zq, zg[:, inputs.neighbours.index[:, 0]], inputs.settings.distance)  # [S, N]
    return d.double().var(dim=0, unbiased=True).numpy()
