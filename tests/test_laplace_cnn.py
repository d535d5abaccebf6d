"""Laplace on a CNN backbone (Conv2d, BatchNorm in eval mode, a `head`): every posterior (Cholesky,
low-rank, diagonal, Kronecker) on parameter subsets against dense references, sampling and the GLM
predictive against Monte Carlo, and the four registered methods fitting and predicting with la_subset."""

from __future__ import annotations

import math

import pytest
import torch

from bench.config import preset_config
from bench.data import Dataset, Split
from bench.la import jacobians as jac
from bench.la.lowrank import Eigenbasis
from bench.la.posterior import LowRankPosterior
from bench.la.structures import compute_curvature, make_posterior
from bench.method import FitContext
from bench.registry import METHODS
from bench.timing import StageTimer
from tests.laplace_helpers import TinyConvNet, full_jacobian, kron_to_flat, rel_err, tiny_images

LA = ["full_la", "last_layer_la", "diag_la", "kfac_la"]
DELTA = 2.0


def _dense_sigma(model, curv):
    """The posterior covariance [D, D] over the curvature's names, from its H (dense) or factors."""
    if curv.kron is not None:
        H = kron_to_flat(model, curv)
    else:
        H = curv.H if curv.H.dim() == 2 else torch.diag(curv.H)
    return torch.linalg.inv(H + DELTA * torch.eye(curv.D, dtype=torch.float64))


@pytest.mark.parametrize(
    "structure,subset",
    [
        ("full", "all"),
        ("full", "last_k:2"),
        ("full", "head"),
        ("diag", "all"),
        ("diag", "last_k:2"),
        ("kron", "all"),
        ("kron", "last_k:2"),
        ("last_layer", None),
    ],
)
def test_glm_covariance_on_a_cnn_subset_is_j_sigma_jt(structure, subset):
    model, (x, y) = TinyConvNet(), tiny_images(32)
    curv = compute_curvature(model, x, y, structure=structure, subset=subset, hessian="ggn", mining_batch=8)
    post = make_posterior(model, curv, DELTA)
    J = full_jacobian(model, x[:5], curv.names).reshape(5, 2, -1)  # jacrev of the whole net, subset columns
    ref = J @ _dense_sigma(model, curv) @ J.transpose(1, 2)
    assert rel_err(post.glm_cov(x[:5], chunk=2), ref) < 1e-9
    assert set(post.sample_params(3, torch.Generator().manual_seed(0))) == set(curv.names)


@pytest.mark.parametrize("structure,subset", [("full", "last_k:2"), ("diag", "all"), ("kron", "all")])
def test_linearized_samples_on_a_cnn_subset(structure, subset):
    """f_MAP(x) + J(x)(theta_s - theta_MAP) by jvp over the subset, against jacrev columns of the
    whole net."""
    model, (x, y) = TinyConvNet(), tiny_images(32)
    curv = compute_curvature(model, x, y, structure=structure, subset=subset, mining_batch=8)
    post = make_posterior(model, curv, DELTA)
    params = post.sample_params(5, torch.Generator().manual_seed(2))
    E = post.linearized_embeddings(params, x[:4], chunk=3)
    J = full_jacobian(model, x[:4], curv.names).reshape(4, 2, -1)
    dev = torch.cat([params[k].reshape(5, -1) for k in curv.names], 1) - jac.flat_params(model, curv.names)
    with torch.no_grad():
        ref = model(x[:4])[None] + torch.einsum("nad,sd->sna", J, dev)
    assert E.shape == (5, 4, 2) and rel_err(E, ref) < 1e-10


def test_low_rank_posterior_on_conv_layers():
    """Sigma_k = (I - U diag(w) U^T) / delta on a subset with Conv2d weights (J from torch.func)."""
    model, (x, y) = TinyConvNet(), tiny_images(32)
    curv = compute_curvature(model, x, y, structure="full", subset="last_k:2", mining_batch=8)
    lam, U = torch.linalg.eigh(curv.H)
    lam, U = lam.flip(0)[:6], U.flip(1)[:, :6]
    post = LowRankPosterior(model, curv, DELTA, Eigenbasis(lam=lam, Z=U, V=None, trace=float(curv.H.trace())))
    Sk = (U / (lam + DELTA)) @ U.T + (torch.eye(curv.D, dtype=torch.float64) - U @ U.T) / DELTA
    J = full_jacobian(model, x[:4], curv.names).reshape(4, 2, -1)
    assert rel_err(post.glm_cov(x[:4]), J @ Sk @ J.transpose(1, 2)) < 1e-9
    eps = post.sample_flat(20000, torch.Generator().manual_seed(0)).double()
    v = torch.randn(curv.D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(float((eps @ v).var() / (v @ Sk @ v)) - 1) < 5 * math.sqrt(2 / 20000)


@pytest.mark.parametrize("structure,subset", [("full", "last_k:2"), ("kron", "all")])
def test_glm_variance_matches_mc_on_a_cnn(structure, subset):
    """Sampled networks (`sample_params` + `sampled_embeddings`, BatchNorm statistics at MAP) against the
    GLM predictive: a smooth net and a narrow posterior, so linear up to O(var^2). float32 net (CPU
    convolutions with S batched float64 weights take the slow reference path), float64 curvature."""
    model, (x, y) = TinyConvNet(smooth=True).float(), tiny_images(32)
    x = x.float()
    curv = compute_curvature(
        model, x, y, structure=structure, subset=subset, mining_batch=8, dtype=torch.float64
    )
    post = make_posterior(model, curv, 4000.0)
    glm = torch.diagonal(post.glm_cov(x[:2]), dim1=-2, dim2=-1)
    S = 4000
    mc = post.sampled_embeddings(post.sample_params(S, torch.Generator().manual_seed(0)), x[:2], chunk=2).var(
        0
    )
    assert ((mc - glm).abs() <= 4 * math.sqrt(2 / S) * glm).all(), mc / glm


def test_sampled_embeddings_chunk_under_a_memory_budget(monkeypatch):
    """A budget far below S networks' activations: chunks of one item, the same embeddings."""
    from bench.la import posterior as post_mod

    model, (x, y) = TinyConvNet(), tiny_images(16)
    post = make_posterior(model, compute_curvature(model, x, y, structure="diag", mining_batch=8), DELTA)
    params = post.sample_params(7, torch.Generator().manual_seed(0))
    ref, ref_cov = post.sampled_embeddings(params, x[:4], chunk=4), post.glm_cov(x[:4], chunk=4)
    monkeypatch.setattr(post_mod, "chunk_budget", lambda device: 1)
    assert torch.allclose(post.sampled_embeddings(params, x[:4], chunk=4), ref, atol=1e-12)
    assert torch.allclose(post.glm_cov(x[:4], chunk=4), ref_cov, atol=1e-12)


def test_curvature_is_the_same_under_a_tiny_chunk_budget(monkeypatch):
    from bench.la import curvature

    model, (x, y) = TinyConvNet(), tiny_images(32)
    ref = compute_curvature(model, x, y, structure="kron", mining_batch=8)
    monkeypatch.setattr(curvature, "chunk_budget", lambda device: 1)  # one mining batch per chunk
    small = compute_curvature(model, x, y, structure="kron", mining_batch=8)
    for a, b in zip(ref.kron, small.kron):
        assert rel_err(a.G, b.G) < 1e-12 and rel_err(a.A, b.A) < 1e-12


# -- the registered methods on a CNN backbone ----------------------------------------------------


@pytest.fixture(scope="module")
def cnn_setup():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 4
    x = (torch.randn(96, 2, 5, 5, generator=g) + y[:, None, None, None] * 0.5).float()
    data = Dataset("tiny_images", Split(x[:64], y[:64]), Split(x[64:], y[64:]))
    model = TinyConvNet().float()
    cfg = preset_config("smoke").replace(quiet=True, batch_size=16, jacobian_chunk=32, posterior_samples=20)
    return cfg, data, model


def _fit(cfg, data, model, name):
    ctx = FitContext(
        cfg=cfg,
        data=data,
        device=torch.device("cpu"),
        timer=StageTimer(),
        method=name,
        train_model=lambda seed, dropout: model,
        seed=0,
    )
    method = METHODS.get(name)(cfg)
    method.fit(ctx)
    return method


@pytest.mark.parametrize("name", LA)
@pytest.mark.parametrize("la_subset", ["auto", "all", "last_k:2"])
def test_laplace_methods_on_a_cnn(cnn_setup, name, la_subset):
    cfg, data, model = cnn_setup
    method = _fit(cfg.replace(la_subset=la_subset), data, model, name)
    dg = method.diagnostics
    want = {
        "full_la": {"auto": "head"},
        "last_layer_la": {"auto": "last_layer", "all": "last_layer", "last_k:2": "last_layer"},
    }.get(name, {})
    assert dg["subset"] == want.get(la_subset, "all" if la_subset == "auto" else la_subset)
    assert dg["la_subset"] == la_subset and dg["D_model"] == sum(p.numel() for p in model.parameters())
    names = jac.subset_names(model, dg["subset"])
    params = dict(model.named_parameters())
    D_subset = sum(params[n].numel() for n in names)
    assert dg["D"] == D_subset - dg.get("excluded_params", 0)
    if name == "kfac_la" and dg["subset"] == "all":
        assert dg["excluded_params"] == 6  # BatchNorm's affine parameters stay at theta_MAP
    pred = method.predict(data.test_id.x)
    n = len(data.test_id)
    assert pred.mean.shape == (n, 2) and pred.cov.shape == (n, 2, 2)
    assert torch.allclose(pred.mean, model(data.test_id.x), atol=1e-6)
    assert (pred.var > 0).all() and torch.isfinite(pred.cov).all()
    assert pred.samples.shape == (cfg.posterior_samples, n, 2)  # linearised joint samples


@pytest.mark.parametrize("name", ["full_la", "kfac_la"])
@pytest.mark.parametrize("predictive", ["mc", "lmc"])
def test_sampled_predictives_on_a_cnn(cnn_setup, name, predictive):
    cfg, data, model = cnn_setup
    cfg = cfg.replace(
        predictive=predictive,
        la_subset="last_k:2",
        method_options=(("kfac_conv", "reduce"),) if name == "kfac_la" else (),
    )
    method = _fit(cfg, data, model, name)
    pred = method.predict(data.test_id.x)
    assert pred.var.shape == (len(data.test_id), 2) and (pred.var > 0).all()
