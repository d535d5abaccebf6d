"""The four registered Laplace methods fit and predict on the smoke preset (synthetic data)."""
from __future__ import annotations

import pytest
import torch

from bench.config import preset_config
from bench.method import FitContext
from bench.registry import get_dataset, get_method
from bench.timing import StageTimer
from bench.train import train_embedding

LA = ["full_la", "last_layer_la", "diag_la", "kfac_la"]


@pytest.fixture(scope="module")
def setup():
    cfg = preset_config("smoke").replace(dataset="synthetic", quiet=True, n_train=300, n_test=60)
    data = get_dataset("synthetic")(cfg)
    model, _ = train_embedding(cfg, data.train_id, torch.device("cpu"), seed=0)
    return cfg, data, model


def _fit(cfg, data, model, name):
    timer = StageTimer()
    ctx = FitContext(cfg=cfg, data=data, device=torch.device("cpu"), timer=timer, method=name,
                     train_model=lambda seed, dropout: model, seed=0)
    method = get_method(name)(cfg)
    method.fit(ctx)
    return method, timer


@pytest.mark.parametrize("name", LA)
def test_laplace_methods_fit_predict(setup, name):
    cfg, data, model = setup
    method, timer = _fit(cfg, data, model, name)
    assert method.post_hoc
    pred = method.predict(data.test_id.x)
    n, d = len(data.test_id), cfg.embed_dim
    assert pred.mean.shape == (n, d) and pred.var.shape == (n, d) and pred.cov.shape == (n, d, d)
    assert torch.allclose(pred.mean, model(data.test_id.x), atol=1e-6)  # GLM mean is f_MAP
    assert (pred.var > 0).all() and torch.isfinite(pred.cov).all()
    assert torch.linalg.eigvalsh(pred.cov.double()).min() > -1e-6 * pred.var.max()
    st = timer.for_method(name)
    assert set(st) >= {"hessian", "prior", "predict"}
    dg = method.diagnostics
    assert dg["prior_precision"] > 0 and dg["prior_method"] == "marglik" and dg["D"] > 0
    assert 0 <= dg["dropped_curvature_param"] <= 1


def test_mc_predictive_and_grid_prior(setup):
    cfg, data, model = setup
    cfg = cfg.replace(predictive="mc", samples=50, prior_precision="grid")
    method, _ = _fit(cfg, data, model, "diag_la")
    a = method.predict(data.test_id.x)
    b = method.predict(data.test_id.x)
    assert torch.equal(a.var, b.var)  # the S networks are drawn once
    assert a.var.shape == (len(data.test_id), cfg.embed_dim) and (a.var > 0).all()
    assert method.diagnostics["prior_method"] == "grid" and len(method.diagnostics["grid_scores"]) >= 5


def test_fixed_prior_and_jtj(setup):
    cfg, data, model = setup
    cfg = cfg.replace(prior_precision="3.5", hessian="jtj")
    method, _ = _fit(cfg, data, model, "last_layer_la")
    assert method.diagnostics["prior_precision"] == 3.5
    assert method.diagnostics["dropped_curvature_output"] == 0.0
