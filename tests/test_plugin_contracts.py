"""Contracts of the dataset and backbone plugins, checked for every registered one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.config import preset_config
from bench.data import DataSource
from bench.errors import BenchError
from bench.model import build_model
from bench.registry import BACKBONES, DATASETS
from datasets import cifar10
from tests.conftest import FASHION_DIR

FASHION_INSTALLED = (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file()


# datasets whose files this machine may lack (a download, or a Debian package); every other one must load
EXTERNAL_DATA = (
    {"svhn", "cars196", "cub200", "sop", "cars_train", "caltech101"}
    | {n for n in DATASETS.names() if n == "pacs" or n.startswith("pacs_")}  # public snapshots
    | (set() if FASHION_INSTALLED else {"fashion_mnist", "fashion_ood"})
    | (set() if cifar10.shared_archive() else {"cifar10"})
)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "cifar10" else n for n in DATASETS.names()]
)  # cifar10: decodes 60k JPEGs (15-35 s)
def test_dataset_contract(name):
    cfg = preset_config("smoke")
    try:
        src = DATASETS.get(name)(cfg)
    except BenchError as e:
        if name not in EXTERNAL_DATA:  # shipped or synthetic data: a BenchError is a regression, not a skip
            raise
        # data not installed here: the error must be one line saying where to get it and where to put it
        assert "\n" not in str(e) and ("--data-dir" in str(e) or "install" in str(e)), str(e)
        pytest.skip(f"{name}: {e}")
    assert isinstance(src, DataSource) and src.class_names
    for x, y in ((src.train_x, src.train_y), (src.test_x, src.test_y)):
        assert len(x) == len(y) > 0
        assert y.min() >= -1 and y.max() < len(src.class_names)
        assert (
            x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating) or x.dtype.kind == "U"
        )  # images, features, paths
    if src.train_x.dtype == np.uint8 or src.train_x.dtype.kind == "U":
        assert src.pixel_stats is not None and 0 < np.min(src.pixel_stats[1])  # a std, or one per channel
    far_ood = DATASETS.meta(name).get("far_ood", ())
    for far in far_ood(cfg) if callable(far_ood) else far_ood:
        DATASETS.get(far)  # a declared default far-OOD set is registered


@pytest.mark.parametrize("name", BACKBONES.names())
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (32,)])
def test_backbone_contract(name, in_shape):
    if name == "efficientnet_lite0":
        pytest.importorskip("efficientnet_lite_pytorch")
    cfg = preset_config("smoke").replace(backbone=name)
    a, b = build_model(cfg, in_shape, seed=0), build_model(cfg, in_shape, seed=0)
    x = torch.randn(5, *in_shape)
    assert a(x).shape == (5, cfg.embed_dim)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), "initialisation is seeded"
    c = build_model(cfg, in_shape, seed=1)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    state = torch.random.get_rng_state()
    build_model(cfg, in_shape, seed=2)
    assert torch.equal(state, torch.random.get_rng_state()), "building a model leaves the global RNG alone"
    drop = build_model(cfg, in_shape, seed=0, dropout=0.2)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.2 for m in drop.modules())
    # no module registered twice (a tied weight): torch.func.functional_call, which the Jacobians and
    # the posterior samples use, would put it back as a detached tensor that no longer requires grad
    before = dict(a.named_parameters())
    with torch.no_grad():
        torch.func.functional_call(a, {k: v.detach() for k, v in before.items()}, (x,))
    after = dict(a.named_parameters())
    assert all(after[k] is p and p.requires_grad for k, p in before.items())
