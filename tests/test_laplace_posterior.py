"""Posteriors (Cholesky / diag / Kronecker), the GLM predictive against Monte Carlo, prior tuning."""

from __future__ import annotations

import math

import pytest
import torch

from bench.errors import BenchError
from bench.la import jacobians as jac
from bench.la.posterior import jittered_cholesky
from bench.la.prior import log_marglik, optimize_marglik
from bench.la.spectrum import exact_spectrum, slq_spectrum
from bench.la.structures import STRUCTURES, compute_curvature, make_posterior
from tests.laplace_helpers import kron_to_flat, rel_err, tiny_data, tiny_net


def _mc_var(post, x, S, seed=0):
    params = post.sample_params(S, torch.Generator().manual_seed(seed))
    return post.sampled_embeddings(params, x, chunk=len(x)).var(0)


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_glm_variance_matches_mc_within_sampling_error(structure):
    # smooth net and a narrow posterior: the net is linear over the posterior up to O(var^2)
    # (the last layer is exactly linear in its parameters)
    model, (x, y) = tiny_net(smooth=True), tiny_data(40)
    curv = compute_curvature(model, x, y, structure=structure, hessian="ggn", mining_batch=8)
    post = make_posterior(model, curv, delta=2000.0)
    xq = x[:6]
    glm = torch.diagonal(post.glm_cov(xq, chunk=4), dim1=-2, dim2=-1)  # two chunks
    S = 20000
    mc = _mc_var(post, xq, S)
    # sampling s.e. of a variance is var * sqrt(2/S) (1% here): allow 4 s.e.
    assert ((mc - glm).abs() <= 4 * math.sqrt(2 / S) * glm).all(), mc / glm


def test_full_samples_have_the_posterior_covariance():
    model, (x, y) = tiny_net(), tiny_data(30)
    curv = compute_curvature(model, x, y, structure="full", hessian="jtj", mining_batch=8)
    post = make_posterior(model, curv, delta=3.0)
    eps = post.sample_flat(40000, torch.Generator().manual_seed(1))
    Sigma = torch.linalg.inv(curv.H + 3.0 * torch.eye(curv.D, dtype=torch.float64))
    S = eps.shape[0]
    emp = eps.T @ eps / S
    # each variance has sampling s.e. var * sqrt(2/S); a random direction's variance likewise
    assert ((emp.diagonal() - Sigma.diagonal()).abs() <= 5 * math.sqrt(2 / S) * Sigma.diagonal()).all()
    v = torch.randn(curv.D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert abs(float(v @ emp @ v - v @ Sigma @ v)) <= 5 * math.sqrt(2 / S) * float(v @ Sigma @ v)
    assert (
        abs(post.logdet_precision() - torch.logdet(curv.H + 3.0 * torch.eye(curv.D, dtype=torch.float64)))
        < 1e-8
    )
    # GLM covariance by triangular solves equals J Sigma J^T with an explicit inverse
    J = jac.embedding_jacobian(model, x[:4], curv.names)
    assert rel_err(post.glm_cov(x[:4]), J @ Sigma @ J.transpose(1, 2)) < 1e-10
    # the spectrum the prior is tuned on gives the same log det
    spec = type(post).spectrum(curv)
    assert abs(spec.logdet(3.0) - post.logdet_precision()) < 1e-8 * abs(post.logdet_precision())


def test_kron_logdet_and_glm_match_dense():
    model, (x, y) = tiny_net(), tiny_data(30)
    curv = compute_curvature(model, x, y, structure="kron", hessian="ggn", mining_batch=8)
    post = make_posterior(model, curv, delta=2.0)
    Hd = kron_to_flat(model, curv)
    P = Hd + 2.0 * torch.eye(Hd.shape[0], dtype=torch.float64)
    assert abs(post.logdet_precision() - float(torch.logdet(P))) < 1e-8
    assert abs(type(post).spectrum(curv).logdet(2.0) - float(torch.logdet(P))) < 1e-8
    J = jac.embedding_jacobian(model, x[:3], jac.subset_names(model, "all"))
    assert rel_err(post.glm_cov(x[:3]), J @ torch.linalg.inv(P) @ J.transpose(1, 2)) < 1e-10


def test_cholesky_refuses_indefinite_precision():
    with pytest.raises(BenchError, match="not positive definite"):
        jittered_cholesky(-torch.eye(4, dtype=torch.float64))
    L, jit = jittered_cholesky(torch.eye(3, dtype=torch.float64))
    assert jit == 0.0 and torch.allclose(L, torch.eye(3, dtype=torch.float64))


def test_marglik_optimum_is_mackay_fixed_point():
    g = torch.Generator().manual_seed(0)
    lam = torch.rand(300, generator=g, dtype=torch.float64) ** 4 * 1e3
    spec = exact_spectrum(lam)
    theta_sq = 25.0
    delta, info = optimize_marglik(spec, theta_sq)
    gamma = spec.effective_params(delta)
    assert abs(delta - gamma / theta_sq) < 1e-4 * delta
    assert log_marglik(delta, spec, theta_sq) >= log_marglik(delta * 1.1, spec, theta_sq)
    assert log_marglik(delta, spec, theta_sq) >= log_marglik(delta / 1.1, spec, theta_sq)


def test_slq_logdet_close_to_exact():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))
    lam = torch.rand(400, generator=g, dtype=torch.float64) ** 6 * 1e4
    H = (Q * lam) @ Q.T
    slq = slq_spectrum(H, generator=torch.Generator().manual_seed(1))  # defaults: 40 steps, 16 probes
    ex = exact_spectrum(lam)
    for delta in (1.0, 10.0, 100.0):  # (at delta << the small-eigenvalue cluster, 40 steps lose accuracy)
        assert abs(slq.logdet(delta) - ex.logdet(delta)) < 0.03 * abs(ex.logdet(delta))
    d1, _ = optimize_marglik(slq, 40.0)
    d2, _ = optimize_marglik(ex, 40.0)
    assert abs(math.log(d1 / d2)) < 0.1


def test_cholesky_jitter_on_a_singular_precision_is_logged(caplog):
    P = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))  # PSD, singular
    with caplog.at_level("WARNING", logger="bench"):
        L, jit = jittered_cholesky(P.clone())
    assert jit > 0 and torch.allclose(L @ L.T, P + jit * torch.eye(3, dtype=torch.float64))
    assert "not positive definite" in caplog.text and "jitter" in caplog.text


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_linearized_samples_are_f_map_plus_jacobian_times_deviation(structure):
    # brute force: J(x) from jacrev of the whole net, deviations from the drawn parameter sets
    model, (x, y) = tiny_net(), tiny_data(30)
    curv = compute_curvature(model, x, y, structure=structure, hessian="ggn", mining_batch=8)
    post = make_posterior(model, curv, delta=5.0)
    params = post.sample_params(7, torch.Generator().manual_seed(3))
    xq = x[:9]
    E = post.linearized_embeddings(params, xq, chunk=4)  # three chunks
    names = list(params)
    J = jac.embedding_jacobian(model, xq, names)  # [n, d, D_subset]
    theta = jac.flat_params(model, names)
    dev = torch.cat([params[k].reshape(7, -1) for k in names], dim=1) - theta[None]
    with torch.no_grad():
        f = model(xq)
    ref = f[None] + torch.einsum("nad,sd->sna", J, dev)
    assert E.shape == (7, 9, 2) and rel_err(E, ref) < 1e-10


def test_linearized_sample_moments_match_the_glm_predictive():
    # joint over items: the sample cross-covariance of two items is J_a Sigma J_b^T
    model, (x, y) = tiny_net(), tiny_data(30)
    curv = compute_curvature(model, x, y, structure="full", hessian="ggn", mining_batch=8)
    post = make_posterior(model, curv, delta=3.0)
    S = 20000
    E = post.linearized_embeddings(post.sample_params(S, torch.Generator().manual_seed(4)), x[:3], chunk=3)
    glm = post.glm_cov(x[:3])
    emp = torch.einsum("sna,snb->nab", E - E.mean(0), E - E.mean(0)) / (S - 1)
    var = torch.diagonal(glm, dim1=-2, dim2=-1)
    assert ((torch.diagonal(emp, dim1=-2, dim2=-1) - var).abs() <= 5 * math.sqrt(2 / S) * var).all()
    Sigma = torch.linalg.inv(curv.H + 3.0 * torch.eye(curv.D, dtype=torch.float64))
    J = jac.embedding_jacobian(model, x[:2], curv.names)
    cross = J[0] @ Sigma @ J[1].T  # [d, d] cross-covariance of items 0 and 1
    emp_cross = (E[:, 0] - E[:, 0].mean(0)).T @ (E[:, 1] - E[:, 1].mean(0)) / (S - 1)
    scale = (var[0][:, None] * var[1][None, :]).sqrt()
    assert ((emp_cross - cross).abs() <= 5 * scale / math.sqrt(S)).all()


def test_kron_factor_eigh_splits_off_zero_rows():
    """A conv patch factor with exactly-zero rows (padding taps) decomposes exactly: the zero rows become
    eigenvalue-0 unit vectors and the rest is the eigendecomposition of the live block."""
    from bench.la.posterior import _eigh

    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 8, generator=g, dtype=torch.float64)
    live = torch.tensor([0, 3, 4, 7, 8, 9, 10, 11])
    M = torch.zeros(12, 12, dtype=torch.float64)
    M[live[:, None], live[None, :]] = X.T @ X
    lam, Q = _eigh(M)
    torch.testing.assert_close(Q @ torch.diag(lam) @ Q.T, M)
    torch.testing.assert_close(Q.T @ Q, torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(lam.sort().values[4:], torch.linalg.eigvalsh(X.T @ X))
    assert (lam.sort().values[:4] == 0).all()


def test_glm_covariance_from_linear_factors_equals_the_solves_and_the_explicit_inverse():
    """Many queries on Linear layers take the factor route (Sigma formed once, B_p T_pq B_q^T per block,
    biases as a_p = 1); it must equal both the triangular solves and J Sigma J^T with an explicit inverse,
    for every layer of the net and for the last layer alone (B = I)."""
    model, (x, y) = tiny_net(), tiny_data(60)
    for structure in ("full", "last_layer"):
        curv = compute_curvature(model, x, y, structure=structure, hessian="jtj", mining_batch=8)
        post = make_posterior(model, curv, delta=2.0)
        assert len(x) * 2 >= curv.D or structure == "full"
        Sigma = torch.linalg.inv(curv.H + 2.0 * torch.eye(curv.D, dtype=torch.float64))
        J = jac.embedding_jacobian(model, x, curv.names)
        explicit = J @ Sigma @ J.transpose(1, 2)
        factors = post._glm_cov_factors(x, chunk=7)  # several chunks
        assert factors is not None and post._sigma is not None
        assert rel_err(factors, explicit) < 1e-10
        assert rel_err(post._glm_cov_solve(x, 16), explicit) < 1e-10
        assert torch.equal(post.glm_cov(x), post._glm_cov_factors(x, 256))  # formed: the route glm_cov takes
