"""The method contract, checked for every registered method (a new plugin is tested the day it lands):
it validates the default config, fits on the smoke preset without reading any test item (ID or OOD),
predicts well-formed finite moments for every query set (a variance, when it has one, that is not all
zero and varies across queries), reports JSON-safe diagnostics, and is deterministic under a seed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from bench.config import preset_config
from bench.data import load_benchmark
from bench.method import EmbeddingPrediction
from bench.recipes import method_config
from bench.registry import METHODS
from bench.runner import predict_split
from tests.fit_helpers import fit_method, run_device


class WatchedSplit:
    """Stands in for a test split during fit and records every read: the items asked for by index
    (`inputs`, `batches`, `take`), else the attribute read (x, y, len, chunks, ...: every item)."""

    def __init__(self, split, name: str, reads: list) -> None:
        self._split, self._name, self._reads = split, name, reads

    def _items(self, idx) -> list[int]:
        return torch.as_tensor(idx).reshape(-1).tolist()

    def inputs(self, idx):
        self._reads.append((self._name, self._items(idx)))
        return self._split.inputs(idx)

    def batches(self, index_batches, seeds=None):
        for idx in index_batches:
            self._reads.append((self._name, self._items(idx)))
            yield from self._split.batches([idx])

    def take(self, idx):
        self._reads.append((self._name, self._items(idx)))
        return self._split.take(idx)

    def __len__(self) -> int:
        self._reads.append((self._name, "len"))
        return len(self._split)

    def __getattr__(self, attr: str):
        self._reads.append((self._name, attr))
        return getattr(self._split, attr)


def watched(data, reads: list):
    """`data` with every test split (ID and OOD) replaced by a WatchedSplit that logs into `reads`."""
    return replace(
        data,
        test_id=WatchedSplit(data.test_id, "test_id", reads),
        test_ood={k: WatchedSplit(s, f"test_ood[{k}]", reads) for k, s in data.test_ood.items()},
    )


# (method, recipe) whose published recipe gives a posterior far narrower than the spread of the means, with
# the floor its variance must still clear (float32 rounding of the means alone gives ~1e-14 of it): LAM's
# recipe (online_la) starts its curvature at H_0 = N and adds N^2/P-scaled batch curvature, so every
# weight's variance is below 1/N; on smoke its mean variance is 1.8e-5 of the means' spread
CONCENTRATED = {("online_la", "paper"): 1e-7}


@pytest.fixture(scope="module")
def smoke():
    cfg = preset_config("smoke").replace(dataset="synthetic", quiet=True)
    return cfg, load_benchmark(cfg)


def _predict_all(method, data) -> dict[str, EmbeddingPrediction]:
    sets = {"id": data.test_id, **data.test_ood}
    with torch.no_grad():
        return {k: predict_split(method, s, run_device()) for k, s in sets.items()}


@pytest.mark.parametrize("recipe", ["paper", "default"])
@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name, recipe, smoke, tmp_path):
    """At its published recipe (the run's default) and at the harness's former defaults."""
    cfg, data = smoke
    cls = METHODS.get(name)
    cfg = method_config(cfg.replace(recipe=recipe), cls)
    if recipe == "paper" and cfg == method_config(smoke[0].replace(recipe="default"), cls).replace(
        recipe="paper"
    ):
        pytest.skip(f"{name}'s paper recipe changes nothing: the default case covers it")
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
            # a method with uncertainty has some: an all-zero variance (up to rounding) or the same one for
            # every query scores nothing. On smoke every method's mean variance is >= 0.27x the spread of its
            # means, and its per-query total varies by >= 5e-4 of its mean (pfe, the flattest)
            total = p.var.sum(-1)
            floor = CONCENTRATED.get((name, recipe), 1e-3)
            assert p.var.mean() > floor * p.mean.var(0).mean(), f"{name}: (near) zero variance on {k}"
            assert total.std() > 1e-5 * total.mean(), f"{name}: the same variance for every query of {k}"
        if p.cov is not None:
            assert p.cov.shape == (n, cfg.embed_dim, cfg.embed_dim) and torch.isfinite(p.cov).all(), k
            assert torch.allclose(torch.diagonal(p.cov, dim1=-2, dim2=-1), p.var, atol=1e-5), k
        if p.samples is not None:  # joint draws [S, n, d], as many for every query set
            assert p.samples.dim() == 3 and p.samples.shape[1:] == (n, cfg.embed_dim), k
            assert (
                p.samples.shape[0] == preds["id"].samples.shape[0] >= 2 and torch.isfinite(p.samples).all()
            ), k
    reads: list = []  # cached nets, same seed; the test splits watched: fit may not read a single test item
    again, _, _ = fit_method(name, cfg, watched(data, reads), tmp_path / "models")
    assert reads == [], f"{name}.fit read test data: {reads[:5]}"
    for k, p in _predict_all(again, data).items():
        assert torch.equal(p.mean, preds[k].mean), f"{name}: mean not deterministic on {k}"
        if p.var is not None:
            assert torch.equal(p.var, preds[k].var), f"{name}: variance not deterministic on {k}"
        if p.samples is not None:
            assert torch.equal(p.samples, preds[k].samples), f"{name}: samples not deterministic on {k}"
