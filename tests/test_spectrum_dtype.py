"""The exact spectrum of a full H runs in H's dtype (float32 for the default float32 curvature), checked at
the marglik prior against the posterior's Cholesky factor and redone in float64 when the check fails."""

from __future__ import annotations

import pytest
import torch

import bench.la.posterior as posterior_mod
import bench.la.spectrum as spectrum_mod
from bench.la import jacobians as jac
from bench.la.curvature import Curvature
from bench.la.posterior import FullPosterior
from bench.la.prior import optimize_marglik
from bench.la.spectrum import EIG_LOGDET_TOL, full_spectrum
from bench.la.structures import compute_curvature
from tests.laplace_helpers import tiny_data, tiny_net


@pytest.fixture(autouse=True)
def _float32_from_any_size(monkeypatch):
    """The tiny H takes the float32 route that only D >= FLOAT32_EIG_MIN_D takes in a run."""
    monkeypatch.setattr(spectrum_mod, "FLOAT32_EIG_MIN_D", 1)


@pytest.fixture(scope="module")
def fitted():
    """A float32 net (D = 352) and its float32 J^T J over 40 items (rank <= 160: a null space, whose
    float32 eigenvalues are rounding noise), with its ||theta_MAP||^2."""
    model = tiny_net(in_dim=5, hidden=(16, 12), d=4, seed=3).float()
    x, y = tiny_data(40, in_dim=5)
    curv = compute_curvature(model, x.float(), y, structure="full", hessian="jtj", mining_batch=8)
    assert curv.H.dtype == torch.float32 and curv.D == 352
    theta_sq = float(jac.flat_params(model, curv.names).double().pow(2).sum())
    return model, curv, theta_sq


def _prior(theta_sq):
    return lambda spec: optimize_marglik(spec, theta_sq)


def _float64_delta(curv, theta_sq):
    """The marglik delta from float64 eigenvalues of the same (float32-accumulated) H."""
    spec = full_spectrum(curv.H, float64=True)
    assert spec.eig_dtype == "float64"
    return optimize_marglik(spec, theta_sq)[0]


def _with_H(curv, H):
    return Curvature(curv.structure, curv.subset, curv.names, curv.D, H=H)


def test_float32_h_gets_float32_eigenvalues_and_the_float64_prior(fitted):
    model, curv, theta_sq = fitted
    assert full_spectrum(curv.H).eig_dtype == "float32"
    post, delta, info = FullPosterior.fit(model, curv, _prior(theta_sq))
    assert info["eig_dtype"] == "float32" and info["posterior"] == "cholesky"
    assert 0 <= info["eig_logdet_error"] <= EIG_LOGDET_TOL
    assert post.L.dtype == torch.float32 and post.delta == delta
    assert delta == pytest.approx(_float64_delta(curv, theta_sq), rel=1e-3)


def test_a_failed_check_redoes_the_spectrum_in_float64(fitted, monkeypatch):
    """EIG_LOGDET_TOL below any error: the float32 spectrum fails, the prior comes from float64
    eigenvalues (the float64 route's delta exactly) and the posterior is rebuilt at it."""
    model, curv, theta_sq = fitted
    monkeypatch.setattr(posterior_mod, "EIG_LOGDET_TOL", -1.0)
    post, delta, info = FullPosterior.fit(model, curv, _prior(theta_sq))
    assert info["eig_dtype"] == "float64" and info["eig_logdet_error"] >= 0
    assert delta == _float64_delta(curv, theta_sq) and post.delta == delta


def test_jitter_counts_as_a_failed_check(fitted, monkeypatch):
    """A posterior that needed jitter (H + delta I not positive definite in float32): float64 eigenvalues."""
    model, curv, theta_sq = fitted
    real = posterior_mod.jittered_cholesky
    monkeypatch.setattr(posterior_mod, "jittered_cholesky", lambda P: (real(P)[0], 1e-12))
    _, delta, info = FullPosterior.fit(model, curv, _prior(theta_sq))
    assert info["eig_dtype"] == "float64" and delta == _float64_delta(curv, theta_sq)


def test_float64_h_stays_float64_and_is_never_redone(fitted, monkeypatch):
    model, curv, theta_sq = fitted
    curv64 = _with_H(curv, curv.H.double())
    calls = []
    monkeypatch.setattr(
        posterior_mod, "full_spectrum", lambda H, **kw: calls.append(kw) or full_spectrum(H, **kw)
    )
    monkeypatch.setattr(posterior_mod, "EIG_LOGDET_TOL", -1.0)  # nothing to fall back to
    post, delta, info = FullPosterior.fit(model, curv64, _prior(theta_sq))
    assert len(calls) == 1 and info["eig_dtype"] == "float64" and post.L.dtype == torch.float64
    assert delta == _float64_delta(curv, theta_sq)


def test_a_small_float32_h_keeps_float64_eigenvalues(fitted, monkeypatch):
    """Below FLOAT32_EIG_MIN_D float64 eigvalsh is cheap: the prior stays what it was (float64)."""
    model, curv, theta_sq = fitted
    monkeypatch.setattr(spectrum_mod, "FLOAT32_EIG_MIN_D", curv.D + 1)
    assert full_spectrum(curv.H).eig_dtype == "float64"
    _, delta, info = FullPosterior.fit(model, curv, _prior(theta_sq))
    assert info["eig_dtype"] == "float64" and delta == _float64_delta(curv, theta_sq)
