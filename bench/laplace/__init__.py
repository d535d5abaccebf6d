"""Laplace approximations of the contrastive-loss posterior of an embedding net.

Modules: `pairs` (mined pairs, analytic pair Hessians, block Laplacian, PSD clamp), `jacobians`
(torch.func Jacobians, last-layer closed form, per-layer KFAC quantities), `curvature` (the hot
path: full / diag / Kronecker GGN or JtJ), `posterior` (Cholesky / diagonal / Kronecker Gaussians,
sampling, GLM covariance), `prior` (marginal likelihood and validation grid).
"""
from bench.laplace.curvature import Curvature, PairLoss, SymmetricAccumulator, check_full_memory, compute_curvature
from bench.laplace.posterior import DiagPosterior, FullPosterior, KronPosterior, Posterior, make_posterior

__all__ = ["Curvature", "PairLoss", "SymmetricAccumulator", "check_full_memory", "compute_curvature",
           "DiagPosterior", "FullPosterior", "KronPosterior", "Posterior", "make_posterior"]
