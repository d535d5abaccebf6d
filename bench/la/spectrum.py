"""Spectra of a curvature H for log det(H + delta I): exact eigenvalues, or stochastic Lanczos
quadrature (SLQ) when an eigendecomposition of a large full H would take minutes on a CPU.

Exact eigenvalues of a full H (`full_spectrum`) come from LAPACK in H's own dtype: float32 for a float32 H
(the default hessian_dtype; `psd_eigenvalues`), float64 for a float64 one (the user asked for float64
curvature). A float32 H was accumulated in float32, so its entries already carry float32 rounding; float64
eigenvalues of it cost 1.4-2.3x the time at D = 10,248 on 2 cores (the tridiagonal reduction streams the
matrix from memory: twice the bytes) for an accuracy its entries do not have. float32 eigenvalues are off
by about eps32 x lambda_max, which moves log det(H + delta I) only where delta is not far above that: the
full posterior and laplace_torch check it at their chosen delta (`EIG_LOGDET_TOL`;
`bench.la.posterior.FullPosterior._fit_exact`, `methods.laplace_torch.logdet_error`) and redo the spectrum
in float64 when it fails. The online Laplace's in-training marglik (`bench.la.online.marglik_prior`)
takes the float32 spectrum unchecked. SLQ (D > EXACT_EIGVALS_MAX_D) runs its Lanczos recurrence in
float64 whatever H's dtype."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EXACT_EIG_MAX_D = 4000
# eigenvalues alone (eigvalsh, ~4/3 D^3 flops), in H's dtype: float32 for the default float32 H (its entries
# carry float32 rounding already; checked at the prior's delta, EIG_LOGDET_TOL), float64 for a float64 H.
# On 2 cores ~1 min at D = 13,410 in float64; at D = 10,248 (a J^T J) 23 s in float32 against 54 s in
# float64 (eigvalsh(H.double()), the copy included)
EXACT_EIGVALS_MAX_D = 16384
# the largest |log det (H + delta I)| error, in nats, of a float32 spectrum at the chosen prior precision,
# checked against a Cholesky factor of H + delta I (laplace_torch: float64; the full posterior: its own
# factor, `bench.la.posterior.FullPosterior._fit_exact`); above it the spectrum is recomputed in float64 and
# the prior chosen again
EIG_LOGDET_TOL = 0.5
# the smallest D whose float32 H gets float32 eigenvalues: below it float64 eigvalsh takes under a second on
# 2 cores (0.3 s at D = 2,048), so the float32 route would buy nothing and only move the prior by rounding
FLOAT32_EIG_MIN_D = 2048


@dataclass
class Spectrum:
    """A (possibly approximate) spectrum: log det(H + delta I) ~= sum_k weights_k log(nodes_k + delta)."""

    nodes: np.ndarray
    weights: np.ndarray
    D: int
    method: str  # exact | slq | nystrom
    eig_dtype: str | None = None  # exact eigenvalues: the dtype LAPACK ran in (float32 | float64)

    def logdet(self, delta: float) -> float:
        return float(np.sum(self.weights * np.log(np.clip(self.nodes, 0, None) + delta)))

    def scaled(self, t: float) -> "Spectrum":
        """The spectrum of t H (a likelihood temperature, `bench.la.likelihood`)."""
        return Spectrum(self.nodes * float(t), self.weights, self.D, self.method, self.eig_dtype)

    def effective_params(self, delta: float) -> float:
        lam = np.clip(self.nodes, 0, None)
        return float(np.sum(self.weights * lam / (lam + delta)))


def exact_spectrum(eigenvalues: torch.Tensor, eig_dtype: str | None = None) -> Spectrum:
    ev = eigenvalues.detach().double().cpu().numpy()
    return Spectrum(ev, np.ones_like(ev), ev.size, "exact", eig_dtype)


def psd_eigenvalues(H: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD H [D, D] (ascending, clamped at 0, in H's dtype): float32 LAPACK on
    H / s, s the largest diagonal entry (entries at most 1: no overflow or underflow in the reduction),
    then times s; float64 (on H itself) where float32 LAPACK does not converge. Twice as fast as float64
    at D = 13,410 on 2 cores (the tridiagonal reduction streams the matrix from memory: half the bytes);
    its eigenvalues are off by about eps32 x lambda_max, which only the smallest ones feel and a prior
    precision delta far above eps32 x lambda_max hides (the callers check log det(H + delta I) at their
    delta against a Cholesky factor: `EIG_LOGDET_TOL`)."""
    return _psd_eigenvalues(H)[0]


def _psd_eigenvalues(H: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(`psd_eigenvalues`, the dtype LAPACK ran in: float32, or float64 where float32 did not converge)."""
    scale = H.diagonal().max().clamp_min(torch.finfo(torch.float32).tiny)
    try:
        ev, dtype = torch.linalg.eigvalsh((H / scale).float()).double() * float(scale), "float32"
    except torch.linalg.LinAlgError:
        ev, dtype = torch.linalg.eigvalsh(H.double()), "float64"
    return ev.clamp_min(0).to(H.dtype), dtype


def slq_spectrum(
    H: torch.Tensor, steps: int = 40, probes: int = 16, generator: torch.Generator | None = None
) -> Spectrum:
    """Stochastic Lanczos quadrature of symmetric H [D, D]: for Rademacher probes z (||z||^2 = D),
    z^T g(H) z ~= D * sum_j tau_j^2 g(theta_j) with (theta, tau) the Ritz values and first
    eigenvector components of the Lanczos tridiagonal matrix; averaged over probes. Few steps bias the
    marglik optimum (Gauss quadrature misses the eigenvalues near delta): on the paper preset's H (D = 13,410)
    delta came out +85% off with 10 steps, +24% with 20 (alike for 16, 32, 64 probes), +0.8..1.6% with
    40 steps x 16 probes (4 seeds);
    full posteriors use the Krylov basis of `bench.la.lowrank` instead and keep SLQ as a fallback."""
    D = H.shape[0]
    steps = min(steps, D)
    g = generator
    Z = torch.randint(0, 2, (D, probes), generator=g, device=g.device if g is not None else "cpu")
    Z = (2.0 * Z - 1.0).to(device=H.device, dtype=torch.float64)
    Q = torch.zeros(probes, steps, D, dtype=torch.float64, device=H.device)  # Lanczos vectors per probe
    alpha = torch.zeros(steps, probes, dtype=torch.float64, device=H.device)
    beta = torch.zeros(steps, probes, dtype=torch.float64, device=H.device)
    q = Z / Z.norm(dim=0, keepdim=True)  # [D, p]
    hnorm = float(H.diagonal().abs().max()) or 1.0
    k_used = steps
    for k in range(steps):
        Q[:, k] = q.T
        w = (H @ q.to(H.dtype)).to(torch.float64)  # one pass over H serves all probes
        alpha[k] = (q * w).sum(0)
        # full reorthogonalisation against all previous Lanczos vectors (twice is enough)
        wt = w.T[:, :, None]  # [p, D, 1]
        for _ in range(2):
            wt = wt - torch.bmm(Q[:, : k + 1].transpose(1, 2), torch.bmm(Q[:, : k + 1], wt))
        w = wt[:, :, 0].T
        b = w.norm(dim=0)
        if k + 1 < steps:
            beta[k] = b
            if bool((b < 1e-10 * hnorm).any()):  # invariant subspace reached (H has low rank)
                k_used = k + 1
                break
            q = w / b
    a, bt = alpha[:k_used].T, beta[: k_used - 1].T  # [p, k]
    T = torch.diag_embed(a) + torch.diag_embed(bt, 1) + torch.diag_embed(bt, -1)
    theta, U = torch.linalg.eigh(T)
    tau2 = U[:, 0, :].pow(2)  # [p, k]
    nodes = theta.reshape(-1).cpu().numpy()
    weights = (D * tau2 / probes).reshape(-1).cpu().numpy()
    return Spectrum(nodes, weights, D, "slq")


def full_spectrum(
    H: torch.Tensor, generator: torch.Generator | None = None, float64: bool = False
) -> Spectrum:
    """Exact eigenvalues (eigvalsh, no eigenvectors) when D <= EXACT_EIGVALS_MAX_D, else SLQ. The exact
    eigenvalues of a float32 H of D >= FLOAT32_EIG_MIN_D in float32 (`psd_eigenvalues`; the module docstring
    says why); of a smaller or a float64 H, or with float64=True (the fallback when the float32 spectrum
    fails its check), in float64."""
    if H.shape[0] <= EXACT_EIGVALS_MAX_D:
        if H.dtype == torch.float32 and not float64 and H.shape[0] >= FLOAT32_EIG_MIN_D:
            return exact_spectrum(*_psd_eigenvalues(H))
        return exact_spectrum(torch.linalg.eigvalsh(H.double()), "float64")
    return slq_spectrum(H, generator=generator)
