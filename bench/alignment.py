"""Aligning embedding spaces of independently trained nets (orthogonal Procrustes).

A metric-learning loss on plain Euclidean distances, such as the shared contrastive loss, depends on
the embeddings only through pairwise distances ||f(x_i) - f(x_j)||. Those are invariant under every
Euclidean isometry z -> z R + t with R orthogonal (a rotation or a reflection) and t a translation.
Two nets trained from different seeds therefore learn embeddings that agree, at best, up to such an
isometry, and averaging their raw coordinates is meaningless. The scale is *not* free: the margins of
the loss (pos_margin, neg_margin) fix it, so no scaling factor is fitted.

`fit_procrustes(source, target)` finds the isometry that maps `source` points closest to their
`target` counterparts in the least-squares sense (with optional centring):

    mu_s = mean(source), mu_t = mean(target)
    R*   = argmin_{R^T R = I} || (S - mu_s) R - (T - mu_t) ||_F^2
         = U V^T  where  U diag(s) V^T = svd((S - mu_s)^T (T - mu_t))      (Schoenemann 1966)
    align(z) = (z - mu_s) R* + mu_t

R* may be a reflection (det -1) on purpose: reflections are symmetries of the loss too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.errors import BenchError


@dataclass
class Alignment:
    """An isometry z -> (z - source_mean) @ rotation + target_mean of d-dimensional embeddings.

    rotation [d, d] is orthogonal (det +-1); source_mean, target_mean [d]; residual is the RMS
    distance between the aligned fitting points and their targets, sqrt(mean_i ||a(s_i) - t_i||^2),
    and relative_residual that RMS divided by the RMS spread of the targets around their mean
    (0: a perfect isometry, about sqrt(2) for unrelated point clouds).
    """

    rotation: torch.Tensor
    source_mean: torch.Tensor
    target_mean: torch.Tensor
    residual: float = 0.0
    relative_residual: float = 0.0

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Map embeddings z [..., d] of the source space into the target space."""
        r = self.rotation.to(device=z.device, dtype=z.dtype)
        return (z - self.source_mean.to(z)) @ r + self.target_mean.to(z)

    @staticmethod
    def identity(d: int) -> "Alignment":
        """The identity map of R^d (used for the reference member)."""
        return Alignment(torch.eye(d), torch.zeros(d), torch.zeros(d))


def fit_procrustes(source: torch.Tensor, target: torch.Tensor, center: bool = True) -> Alignment:
    """The orthogonal Procrustes isometry mapping source [n, d] onto target [n, d] (paired rows).

    Solved in float64 by one SVD of the d x d cross-covariance (formula in the module docstring);
    with `center=False` no translation is fitted (means fixed at 0). Raises BenchError on mismatched
    shapes, fewer than 2 points, or non-finite inputs.
    """
    if source.ndim != 2 or source.shape != target.shape:
        raise BenchError(
            f"procrustes needs two [n, d] arrays of the same shape, got {tuple(source.shape)} "
            f"and {tuple(target.shape)}"
        )
    if source.shape[0] < 2:
        raise BenchError(f"procrustes needs at least 2 paired points, got {source.shape[0]}")
    s = source.detach().to("cpu", torch.float64)
    t = target.detach().to("cpu", torch.float64)
    if not (torch.isfinite(s).all() and torch.isfinite(t).all()):
        raise BenchError("procrustes got non-finite embeddings (a member diverged?)")
    d = s.shape[1]
    mu_s = s.mean(0) if center else torch.zeros(d, dtype=torch.float64)
    mu_t = t.mean(0) if center else torch.zeros(d, dtype=torch.float64)
    sc, tc = s - mu_s, t - mu_t
    u, _, vh = torch.linalg.svd(sc.T @ tc)
    r = u @ vh
    aligned = sc @ r + mu_t
    rms = float(((aligned - t) ** 2).sum(1).mean().sqrt())
    spread = float((tc**2).sum(1).mean().sqrt())
    dtype = source.dtype if source.is_floating_point() else torch.float32
    return Alignment(r.to(dtype), mu_s.to(dtype), mu_t.to(dtype), rms, rms / spread if spread > 0 else 0.0)
