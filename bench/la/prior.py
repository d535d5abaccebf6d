"""Prior precision: Laplace marginal likelihood (default) or a grid scored on a validation split."""
from __future__ import annotations

import math

import torch
from scipy.optimize import minimize_scalar

from bench.la.spectrum import Spectrum

DEFAULT_GRID = tuple(10.0 ** k for k in range(-3, 6))  # prior_precision=grid: scored by triplet_log_score


def log_marglik(delta: float, spectrum: Spectrum, theta_sq: float) -> float:
    """The delta-dependent part of the Laplace log evidence.

    We read the training objective as a Gibbs likelihood, p(D | theta) = exp(-sum_batches loss_b(theta))
    (temperature 1; a Gaussian on the pair distances would give the same curvature up to that scale),
    with prior N(0, delta^-1 I). Laplace's approximation at theta_MAP with the GGN H of sum_b loss_b
    gives, up to terms that do not depend on delta,

        log p(D | delta) ~= -sum_b loss_b(theta_MAP) - delta/2 ||theta_MAP||^2 + D/2 log delta
                            - 1/2 log det(H + delta I).
    """
    return -0.5 * delta * theta_sq + 0.5 * spectrum.D * math.log(delta) - 0.5 * spectrum.logdet(delta)


def optimize_marglik(spectrum: Spectrum, theta_sq: float, lo: float = 1e-6, hi: float = 1e8) -> tuple[float, dict]:
    """(delta*, info): the maximiser of `log_marglik` over [lo, hi].

    It solves delta = gamma / ||theta_MAP||^2 with gamma = sum_i lam_i / (lam_i + delta) (MacKay's
    effective number of parameters); bounded Brent search on log delta, O(D) per evaluation on the
    spectrum of H.
    """
    f = lambda t: -log_marglik(math.exp(t), spectrum, theta_sq)
    res = minimize_scalar(f, bounds=(math.log(lo), math.log(hi)), method="bounded",
                          options={"xatol": 1e-6, "maxiter": 500})
    delta = float(math.exp(res.x))
    info = {"log_marglik": float(-res.fun), "effective_params": spectrum.effective_params(delta),
            "spectrum": spectrum.method, "theta_sq": theta_sq}
    return delta, info


def triplet_log_score(mean: torch.Tensor, cov: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                      batch: int = 16, samples: int = 256) -> float:
    """Mean over validation triplets (a, p, n) (y_a = y_p != y_n, all triplets within consecutive
    batches of `batch` items) of log P(||e_a - e_p|| < ||e_a - e_n||) with e_i ~ N(mean_i, cov_i)
    drawn independently per item (K `samples`; P estimated as (hits + 1/2) / (K + 1), so finite).
    Overconfident embeddings pay log(1/(2K+2)) for each misordered triplet; very wide ones drift to
    log(1/2): the score peaks at a calibrated spread."""
    n, d = mean.shape
    g = generator
    chol = torch.linalg.cholesky(cov.double() + 1e-12 * torch.eye(d, dtype=torch.float64, device=cov.device))
    z = torch.randn(samples, n, d, generator=g, device=g.device, dtype=torch.float64).to(mean.device)
    e = mean.double()[None] + torch.einsum("nab,snb->sna", chol, z)
    total, count = 0.0, 0
    for s in range(0, n - 1, batch):
        idx = torch.arange(s, min(s + batch, n), device=mean.device)
        yy = y[idx]
        same = yy[:, None] == yy[None, :]
        eye = torch.eye(len(idx), dtype=torch.bool, device=mean.device)
        trip = (same & ~eye)[:, :, None] & (~same)[:, None, :]
        if not bool(trip.any()):
            continue
        E = e[:, idx]
        dist = (E[:, :, None, :] - E[:, None, :, :]).norm(dim=-1)  # [K, m, m]
        hits = (dist[:, :, :, None] < dist[:, :, None, :]).sum(0)  # [a, p, n]
        p = (hits[trip].double() + 0.5) / (samples + 1)
        total += float(p.log().sum())
        count += int(trip.sum())
    return total / max(count, 1)
