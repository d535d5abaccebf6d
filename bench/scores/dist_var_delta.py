"""u_q = Var[d(z_q, z_n)] by the delta method on the Gaussian joint of query and retrieved neighbour
n = r_1^mu(q): with d(a, b) = ||rho(a) - rho(b)||, g_q = grad_a d and g_n = grad_b d at the means
(autograd, so the cosine geometry's normalisation is differentiated too),

    Var d ~= g_q^T Sigma_qq g_q + g_n^T Sigma_nn g_n + 2 g_q^T Sigma_qn g_n.

The joint covariance is the method's: with joint samples, their sample covariance (so Sigma_qn, the
query-gallery cross-covariance, is estimated from the same draws: the linearised Laplace samples
f_MAP + J(theta_s - theta_MAP) have Sigma_qn -> J_q Sigma J_n^T); the formula is then evaluated
exactly as (1/(S-1)) sum_s (g_q.(z_q^s - zbar_q) + g_n.(z_n^s - zbar_n))^2. Without samples the
items are independent (Sigma_qn = 0) and Sigma_qq, Sigma_nn are the predicted cov (or diag var).
Differs from `dist_var` only by the curvature of d (first order; at mu_q = mu_n the gradient is 0)."""

from __future__ import annotations

import numpy as np
import torch

from bench.loss import space_distance
from bench.metrics.uncertainty import ScoreInputs
from bench.registry import register_score


def distance_gradients(a: torch.Tensor, b: torch.Tensor, distance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_a d, grad_b d) [N, d] of d(a, b) = ||rho(a) - rho(b)|| at rows of a, b [N, d] (row i of
    the distances depends on row i only, so one backward pass of their sum gives every row's gradient)."""
    a, b = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        ga, gb = torch.autograd.grad(space_distance(a, b, distance).sum(), (a, b))
    return ga, gb


def _quadratic(g: torch.Tensor, pred_cov: torch.Tensor | None, pred_var: torch.Tensor) -> torch.Tensor:
    """g^T Sigma g per row, Sigma = cov [N, d, d] or diag(var [N, d])."""
    if pred_cov is not None:
        return torch.einsum("ni,nij,nj->n", g, pred_cov.double(), g)
    return (g * g * pred_var.double()).sum(-1)


@register_score("dist_var_delta")
def dist_var_delta(inputs: ScoreInputs) -> np.ndarray:
    """Variance of the distance to the retrieved neighbour, delta method on the joint Gaussian."""
    n_idx = inputs.neighbours.index[:, 0]
    mq = inputs.query.mean.detach().cpu().double()
    mn = inputs.gallery.mean.detach().cpu().double()[n_idx]
    gq, gn = distance_gradients(mq, mn, inputs.settings.distance)
    if inputs.joint:
        zq, zg = inputs.draws()
        zq, zn = zq.double(), zg.double()[:, n_idx]
        lin = ((zq - zq.mean(0)) * gq).sum(-1) + ((zn - zn.mean(0)) * gn).sum(-1)  # [S, N]
        return ((lin**2).sum(0) / max(lin.shape[0] - 1, 1)).numpy()
    q, g = inputs.query, inputs.gallery
    cov_n = None if g.cov is None else g.cov[n_idx]
    return (_quadratic(gq, q.cov, q.var) + _quadratic(gn, cov_n, g.var[n_idx])).numpy()
