"""The method contract, checked for every registered method (a new plugin is tested the day it lands):
it validates the default config, fits on the smoke preset, predicts well-formed finite moments for
every query set, reports JSON-safe diagnostics, and is deterministic under a seed."""
from __future__ import annotations

import json

import pytest
import torch

from bench.config import preset_config
from bench.data import load_benchmark
from bench.method import EmbeddingPrediction
from bench.registry import METHODS
from bench.runner import predict_split
from tests.fit_helpers import fit_method, run_device


@pytest.fixture(scope="module")
def smoke():
    cfg = preset_config("smoke").replace(dataset="synthetic", quiet=True)
    return cfg, load_benchmark(cfg)


def _predict_all(method, data) -> dict[str, EmbeddingPrediction]:
    sets = {"id": data.test_id, **data.test_ood}
    with torch.no_grad():
        return {k: predict_split(method, s, run_device()) for k, s in sets.items()}


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name, smoke, tmp_path):
    cfg, data = smoke
    cls = METHODS.get(name)
    cls.validate(cfg)
    assert cls.name == name and (cls.__doc__ or "").strip(), "registered with a one-line description"
    method, _, timer = fit_method(name, cfg, data, tmp_path / "models")
    json.dumps(method.diagnostics)  # saved in config.json
    preds = _predict_all(method, data)
    for k, p in preds.items():
        n = len(data.test_id) if k == "id" else len(data.test_ood[k])
        assert p.mean.shape == (n, cfg.embed_dim) and torch.isfinite(p.mean).all(), k
        if p.var is not None:
            assert p.var.shape == (n, cfg.embed_dim) and torch.isfinite(p.var).all() and (p.var >= 0).all(), k
        if p.cov is not None:
            assert p.cov.shape == (n, cfg.embed_dim, cfg.embed_dim) and torch.isfinite(p.cov).all(), k
            assert torch.allclose(torch.diagonal(p.cov, dim1=-2, dim2=-1), p.var, atol=1e-5), k
        if p.samples is not None:  # joint draws [S, n, d], as many for every query set
            assert p.samples.dim() == 3 and p.samples.shape[1:] == (n, cfg.embed_dim), k
            assert p.samples.shape[0] == preds["id"].samples.shape[0] >= 2 and torch.isfinite(p.samples).all(), k
    again, _, _ = fit_method(name, cfg, data, tmp_path / "models")  # cached nets, same seed
    for k, p in _predict_all(again, data).items():
        assert torch.equal(p.mean, preds[k].mean), f"{name}: mean not deterministic on {k}"
        if p.var is not None:
            assert torch.equal(p.var, preds[k].var), f"{name}: variance not deterministic on {k}"
        if p.samples is not None:
            assert torch.equal(p.samples, preds[k].samples), f"{name}: samples not deterministic on {k}"
