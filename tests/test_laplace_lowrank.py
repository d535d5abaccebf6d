"""The low-rank (block Krylov Nyström) basis against brute force: its Loewner error bound, the GLM
covariance, samples and log det of the low-rank posterior, and the marglik optimum within 1%."""

from __future__ import annotations

import math

import pytest
import torch

from bench.la import jacobians as jac
from bench.la import lowrank
from bench.la import posterior as posterior_module
from bench.la import spectrum as spectrum_module
from bench.la.lowrank import krylov_nystrom
from bench.la.posterior import PRIOR_TOL, FullPosterior, LowRankPosterior
from bench.la.prior import optimize_marglik
from bench.la.spectrum import exact_spectrum
from bench.la.structures import compute_curvature
from methods.laplace import FullLaplace
from tests.laplace_helpers import (
    PAPER_D,
    PAPER_THETA_SQ,
    full_jacobian,
    paper_like_spectrum,
    psd_with_spectrum,
    rel_err,
    tiny_data,
    tiny_net,
)

DEFAULT_TOL = FullLaplace.options["posterior_rank_tol"].default


def _dense(basis) -> torch.Tensor:
    U = basis.eigenvectors().double()
    return (U * basis.lam) @ U.T


def _gen_eigs(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of B^-1/2 A B^-1/2 (A / B in Loewner order) for SPD B."""
    L = torch.linalg.cholesky(B)
    M = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, A, upper=False).mT, upper=False)
    return torch.linalg.eigvalsh((M + M.transpose(-1, -2)) / 2)


@pytest.fixture(scope="module")
def paper_like():
    D = 1500
    lam = paper_like_spectrum(D)
    theta_sq = PAPER_THETA_SQ * D / PAPER_D
    delta, _ = optimize_marglik(exact_spectrum(lam), theta_sq)
    return psd_with_spectrum(lam), lam, theta_sq, delta


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tol", sorted({0.1, DEFAULT_TOL, PRIOR_TOL}))
def test_marglik_from_the_basis_within_one_percent(paper_like, seed, tol):
    H, lam, theta_sq, exact_delta = paper_like

    def marglik(b):
        return optimize_marglik(b.spectrum(), theta_sq)[0]

    basis, delta = krylov_nystrom(H, marglik, tol, generator=torch.Generator().manual_seed(seed))
    assert basis is not None and basis.rank < len(lam) / 3
    assert abs(delta / exact_delta - 1) < 0.01, (delta, exact_delta)


def test_bound_holds_and_residual_estimate_is_tight(paper_like):
    H, lam, theta_sq, delta = paper_like
    basis, _ = krylov_nystrom(H, lambda b: delta, DEFAULT_TOL, generator=torch.Generator().manual_seed(0))
    Hk = _dense(basis)
    e = float(torch.linalg.eigvalsh(H - Hk).abs().max())
    assert 0.8 * e <= basis.residual <= e * (1 + 1e-6)  # the estimate approaches ||H - H_k|| from below
    assert basis.rel_bound(delta) <= DEFAULT_TOL
    eye = torch.eye(len(lam), dtype=torch.float64)
    ratio = _gen_eigs(
        torch.linalg.inv(Hk + delta * eye), torch.linalg.inv(H + delta * eye)
    )  # Sigma_k / Sigma
    assert ratio.min() >= 1 / (1 + basis.nu / delta) - 1e-9
    assert ratio.max() <= 1 + e / delta + 1e-9


def test_lowrank_posterior_against_brute_force():
    torch.manual_seed(0)
    model = tiny_net(in_dim=12, hidden=(10, 8), smooth=True)
    x, y = tiny_data(400, in_dim=12)
    curv = compute_curvature(model, x, y, structure="full", hessian="ggn", mining_batch=16)
    H, D, delta = curv.H, curv.D, 1.0
    basis, _ = krylov_nystrom(H, lambda b: delta, 0.3, block=8, generator=torch.Generator().manual_seed(0))
    assert basis is not None and basis.rank < D
    Hk = _dense(basis)
    e = float(torch.linalg.eigvalsh(H - Hk).abs().max())
    post = LowRankPosterior(model, curv, delta, basis)
    eye = torch.eye(D, dtype=torch.float64)
    Sigma_k, Sigma = torch.linalg.inv(Hk + delta * eye), torch.linalg.inv(H + delta * eye)
    xq = x[:5]
    J = full_jacobian(model, xq).reshape(5, 2, D)
    cov = post.glm_cov(xq, chunk=2)
    assert rel_err(cov, J @ Sigma_k @ J.transpose(1, 2)) < 1e-9  # the Linear-layer factor path
    ratio = _gen_eigs(cov, J @ Sigma @ J.transpose(1, 2))  # per query, within the bound
    assert ratio.min() >= 1 / (1 + basis.nu / delta) - 1e-9 and ratio.max() <= 1 + e / delta + 1e-9
    assert abs(post.logdet_precision() - float(torch.logdet(Hk + delta * eye))) < 1e-8
    eps = post.sample_flat(40000, torch.Generator().manual_seed(1))
    v = torch.randn(D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    emp, ref = float((eps @ v).pow(2).mean()), float(v @ Sigma_k @ v)
    assert abs(emp - ref) <= 5 * math.sqrt(2 / 40000) * ref


def test_lowrank_generic_jacobian_path_matches_linear_factors(monkeypatch):
    model, (x, y) = tiny_net(), tiny_data(60)
    curv = compute_curvature(model, x, y, structure="full", hessian="jtj", mining_batch=8)
    basis, _ = krylov_nystrom(
        curv.H, lambda b: 1.0, 0.5, block=4, max_rank=curv.D, generator=torch.Generator().manual_seed(0)
    )
    post = LowRankPosterior(model, curv, 1.0, basis)
    fast = post.glm_cov(x[:7])
    monkeypatch.setattr(jac, "linear_factors", lambda *a: None)
    assert rel_err(post.glm_cov(x[:7]), fast) < 1e-10


def test_full_posterior_fit_dispatch(monkeypatch):
    """Above EXACT_EIG_MAX_D: low rank when rank_tol > 0, else Cholesky with its prior from the exact
    eigenvalues up to EXACT_EIGVALS_MAX_D (checked first), above it from the Krylov basis (or SLQ)."""
    monkeypatch.setattr(posterior_module, "EXACT_EIG_MAX_D", 10)
    model, (x, y) = tiny_net(in_dim=12, hidden=(10, 8)), tiny_data(400, in_dim=12)
    curv = compute_curvature(model, x, y, structure="full", hessian="ggn", mining_batch=16)
    theta_sq = float(jac.flat_params(model, curv.names).pow(2).sum())

    def marglik(spec):
        return optimize_marglik(spec, theta_sq)

    exact_delta, _ = optimize_marglik(exact_spectrum(torch.linalg.eigvalsh(curv.H)), theta_sq)
    post, delta, info = FullPosterior.fit(model, curv, marglik, rank_tol=0.0)
    assert (
        type(post) is FullPosterior
        and info["spectrum"] == "exact"
        and delta == pytest.approx(exact_delta, rel=1e-9)
    )
    monkeypatch.setattr(spectrum_module, "EXACT_EIGVALS_MAX_D", 10)
    monkeypatch.setattr(posterior_module, "EXACT_EIGVALS_MAX_D", 10)
    monkeypatch.setattr(lowrank, "MAX_RANK_FRACTION", 1.0)  # a tiny net needs a large share of its D
    model, (x, y) = tiny_net(in_dim=12, hidden=(10, 8)), tiny_data(400, in_dim=12)
    curv = compute_curvature(model, x, y, structure="full", hessian="ggn", mining_batch=16)
    theta_sq = float(jac.flat_params(model, curv.names).pow(2).sum())

    def marglik(spec):
        return optimize_marglik(spec, theta_sq)

    exact_delta, _ = optimize_marglik(exact_spectrum(torch.linalg.eigvalsh(curv.H)), theta_sq)
    post, delta, info = FullPosterior.fit(
        model, curv, marglik, torch.Generator().manual_seed(0), rank_tol=0.3
    )
    assert isinstance(post, LowRankPosterior) and info["posterior"] == "lowrank" and info["rank_bound"] <= 0.3
    assert abs(delta / exact_delta - 1) < 0.01
    exact, delta0, info0 = FullPosterior.fit(
        model, curv, marglik, torch.Generator().manual_seed(0), rank_tol=0.0
    )
    assert (
        type(exact) is FullPosterior
        and info0["spectrum"] == "nystrom"
        and abs(delta0 / exact_delta - 1) < 0.01
    )
    fixed, d, _ = FullPosterior.fit(model, curv, 2.0, rank_tol=0.0)
    assert type(fixed) is FullPosterior and d == 2.0
    # a rank beyond D * MAX_RANK_FRACTION does not pay: the exact factor instead (its prior from SLQ)
    monkeypatch.setattr(lowrank, "MAX_RANK_FRACTION", 0.2)
    post, _, info = FullPosterior.fit(model, curv, marglik, rank_tol=1e-9)
    assert type(post) is FullPosterior and info["spectrum"] == "slq"
