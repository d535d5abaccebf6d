"""The four registered Laplace methods fit and predict on the smoke preset (synthetic data)."""

from __future__ import annotations

import pytest
import torch

from bench.config import preset_config
from bench.data import load_benchmark
from bench.errors import BenchError
from bench.la.spectrum import EIG_LOGDET_TOL
from bench.method import FitContext
from bench.registry import METHODS
from bench.timing import StageTimer
from bench.train import train_embedding
from tests.fit_helpers import predict_on, run_device

LA = ["full_la", "last_layer_la", "diag_la", "kfac_la"]


@pytest.fixture(scope="module")
def setup():
    cfg = preset_config("smoke").replace(dataset="synthetic", quiet=True, n_train=300, n_test=60)
    data = load_benchmark(cfg)
    model, _ = train_embedding(cfg, data.train_id, run_device(), seed=0)
    return cfg, data, model


def _fit(cfg, data, model, name):
    timer = StageTimer(run_device())
    ctx = FitContext(
        cfg=cfg,
        data=data,
        device=run_device(),
        timer=timer,
        method=name,
        train_model=lambda seed, dropout: model,
        seed=0,
    )
    method = METHODS.get(name)(cfg)
    method.fit(ctx)
    return method, timer


@pytest.mark.parametrize("name", LA)
def test_laplace_methods_fit_predict(setup, name):
    cfg, data, model = setup
    method, timer = _fit(cfg, data, model, name)
    assert method.reuses_base_model
    pred = predict_on(method, data.test_id.x)
    n, d = len(data.test_id), cfg.embed_dim
    assert pred.mean.shape == (n, d) and pred.var.shape == (n, d) and pred.cov.shape == (n, d, d)
    assert torch.allclose(
        pred.mean, model(data.test_id.x.to(run_device())).cpu(), atol=1e-6
    )  # GLM mean is f_MAP
    assert (pred.var > 0).all() and torch.isfinite(pred.cov).all()
    assert torch.linalg.eigvalsh(pred.cov.double()).min() > -1e-6 * pred.var.max()
    st = timer.for_method(name)
    assert set(st) >= {"hessian", "prior"}  # the runner times "predict"
    dg = method.diagnostics
    assert dg["prior_precision"] > 0 and dg["prior_method"] == "marglik" and dg["D"] > 0
    assert 0 <= dg["dropped_curvature_param"] <= 1
    if name in ("full_la", "last_layer_la"):  # a small float32 H: float64 eigenvalues (FLOAT32_EIG_MIN_D),
        # its posterior's factor agreeing with them at the prior
        assert dg["eig_dtype"] == "float64" and 0 <= dg["eig_logdet_error"] <= EIG_LOGDET_TOL


def test_mc_predictive_and_grid_prior(setup):
    cfg, data, model = setup
    cfg = cfg.replace(predictive="mc", posterior_samples=50, prior_precision="grid")
    method, _ = _fit(cfg, data, model, "diag_la")
    a = predict_on(method, data.test_id.x)
    b = predict_on(method, data.test_id.x)
    assert torch.equal(a.var, b.var)  # the S networks are drawn once
    assert a.var.shape == (len(data.test_id), cfg.embed_dim) and (a.var > 0).all()
    tuning = method.diagnostics["tuning"]
    assert method.diagnostics["prior_method"] == "grid" and len(tuning["points"]) >= 5
    assert (
        tuning["val_source"] == "train_id"
    )  # no val_items: the grid falls back to a calibration split of train_id
    assert (
        method.diagnostics["prior_precision"]
        == max(tuning["points"], key=lambda p: p["objective"])["prior_precision"]
    )


def test_fixed_prior_and_jtj(setup):
    cfg, data, model = setup
    cfg = cfg.replace(prior_precision="3.5", hessian="jtj")
    method, _ = _fit(cfg, data, model, "last_layer_la")
    assert method.diagnostics["prior_precision"] == 3.5
    assert method.diagnostics["dropped_curvature_output"] == 0.0


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hessian", "exact", "hessian must be ggn or jtj"),
        ("predictive", "laplace", "predictive must be one of glm, lmc, mc"),
        ("hessian_dtype", "float16", "hessian_dtype must be float32 or float64"),
        ("prior_precision", "-1", "prior_precision must be a positive number, marglik or grid"),
        ("prior_precision", "often", "prior_precision must be a positive number"),
        ("posterior_samples", 1, "posterior_samples must be >= 2"),
        ("hessian_items", 1, "hessian_items must be >= 2"),
    ],
)
def test_options_validated_by_the_method(field, value, message):
    cfg = preset_config("smoke").replace(**{field: value})  # the generic config accepts them
    for name in LA:
        with pytest.raises(BenchError, match=message):
            METHODS.get(name).validate(cfg)
    METHODS.get("diag_la").validate(preset_config("smoke").replace(prior_precision="0.5", hessian_items=None))


def test_predict_before_fit_is_one_line():
    with pytest.raises(BenchError, match="predict called before fit"):
        METHODS.get("diag_la")(preset_config("smoke")).predict(torch.zeros(3, 32))


def test_full_la_low_rank_option(setup, monkeypatch):
    """Above EXACT_EIG_MAX_D full_la's posterior is low rank; its covariances stay within the bound
    of the exact (posterior_rank_tol=0) ones at the same prior precision."""
    from bench.la import lowrank, posterior

    monkeypatch.setattr(posterior, "EXACT_EIG_MAX_D", 10)
    monkeypatch.setattr(lowrank, "MAX_RANK_FRACTION", 1.0)
    cfg, data, model = setup
    cfg = cfg.replace(prior_precision="3.0")
    preds = {}
    for tol in (0.3, 0.0):
        method, _ = _fit(cfg.replace(method_options=(("posterior_rank_tol", tol),)), data, model, "full_la")
        preds[tol] = predict_on(method, data.test_id.x).cov.double()
        assert method.diagnostics["posterior"] == ("lowrank" if tol else "cholesky")
    L = torch.linalg.cholesky(preds[0.0])
    M = torch.linalg.solve_triangular(
        L, torch.linalg.solve_triangular(L, preds[0.3], upper=False).mT, upper=False
    )
    ratio = torch.linalg.eigvalsh((M + M.mT) / 2)
    assert ratio.min() > 1 - 1e-4 and ratio.max() <= 1.3  # the tolerance bounds Sigma_k / Sigma
    with pytest.raises(BenchError, match="posterior_rank_tol must be"):
        METHODS.get("full_la").validate(cfg.replace(method_options=(("posterior_rank_tol", -1.0),)))


def test_predictives_share_draws_across_query_sets_and_lmc_moments_approach_glm(tmp_path):
    from bench.config import preset_config
    from bench.data import load_benchmark
    from tests.fit_helpers import fit_method, predict_on

    cfg = preset_config("smoke").replace(dataset="synthetic", quiet=True, posterior_samples=4000)
    data = load_benchmark(cfg)
    glm, _, _ = fit_method("diag_la", cfg, data, tmp_path)
    lmc, _, _ = fit_method("diag_la", cfg.replace(predictive="lmc"), data, tmp_path)
    x = data.test_id.x[:20]
    with torch.no_grad():
        pg, pl = predict_on(glm, x), predict_on(lmc, x)
        # the same items in a second call (another query set, another chunk) get the same draws
        assert torch.allclose(predict_on(glm, x[10:]).samples, pg.samples[:, 10:], atol=1e-6)
    assert pg.samples.shape == (4000, 20, cfg.embed_dim) and torch.equal(pg.samples, pl.samples)
    # 4000 Gaussian draws: a sample variance's relative s.e. is sqrt(2 / 3999) = 2.2%; as z-scores the
    # 40 entries stay within 4 (a 10% bias in the LMC variance puts every entry near 4.5) and average near 0
    z = (pl.var / pg.var - 1) / (2 / 3999) ** 0.5
    assert z.abs().max() < 4 and z.mean().abs() < 2, z
    assert torch.allclose(pl.mean, pg.mean, atol=float(3 * (pg.var / 4000).sqrt().max()))
