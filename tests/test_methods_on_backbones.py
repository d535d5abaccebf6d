"""Every registered method x every registered backbone, on a tiny synthetic colour dataset: on a frozen
trunk (methods see the head on cached features) for every CNN, and end to end (methods see images through
the DataLoader) for the MLP, the conv net and ResNet-18 (ResNet-50 and EfficientNet-Lite0 differ from it
only in size here: their forward passes are in tests/test_cnn_backbones.py, the CUB preset fine-tunes
EfficientNet end to end in tests/test_frozen_features.py).

Beyond well-formed finite moments, each case checks what a backbone can break: a method with uncertainty
gives a variance that is neither (near) zero nor the same for every query (e.g. Jacobians cut off at the
trunk, or a posterior over parameters the embedding does not depend on); and a post-hoc method with the GLM
predictive serves the shared base model's embedding as its mean (the same net, trunk and head, as `plain`).

Sizes are chosen so no case factors a large matrix: the MLP end to end sees 8x8 images through one hidden
layer of 8 (D = 1.6k weights, so full Laplace over all of them is cheap); on ResNet-18 end to end the
Laplace family covers the head (`la_subset=head`; subsets through conv layers: the conv net, where diag and
KFAC cover every weight); laplace-torch takes its diagonal structure
where the head is wide (ResNet-50's 2048-d features, the MLP). The prior precision is fixed (1.0) to keep
the factorisations cheap; marglik is tested in tests/test_laplace_* and
tests/test_marglik_vs_laplace_torch.py."""

from __future__ import annotations

import pytest
import torch

from bench.config import RunConfig, apply_overrides, preset_config
from bench.features import prepare_benchmark
from bench.registry import BACKBONES, METHODS
from bench.runner import predict_split
from tests.fit_helpers import fit_method, run_device

LAPLACE = {
    m for m in METHODS.names() if METHODS.get(m).__module__ in ("methods.laplace", "methods.online_la")
}
END_TO_END = ("mlp", "convnet", "resnet18")
GLM_MEAN = {"full_la", "last_layer_la", "diag_la", "kfac_la"}  # post-hoc, GLM predictive: mean = f_MAP(x)


def _cfg(backbone: str, frozen: bool, tmp_path) -> RunConfig:
    cfg = apply_overrides(
        preset_config("smoke"),
        dict(
            dataset="synthetic_color",
            backbone=backbone,
            freeze_backbone=frozen,
            n_train=48,
            n_test=24,
            batch_size=16,
            embed_dim=2,
            posterior_samples=4,
            dropout_passes=3,
            ensemble_size=2,
            hessian_items=32,
            jacobian_chunk=32,
            image_size=16,
            data_workers=0,
            quiet=True,
            out=str(tmp_path),
            pfe_steps=2,
            prior_precision="1.0",
        ),
    )
    if backbone == "mlp":
        cfg = cfg.replace(image_size=8, hidden=(8,))
    return cfg


_DATA: dict = {}


def _data(backbone: str, frozen: bool, tmp_path_factory):
    if (backbone, frozen) not in _DATA:
        cfg = _cfg(backbone, frozen, tmp_path_factory.mktemp("cache"))
        _DATA[(backbone, frozen)] = (
            cfg,
            prepare_benchmark(cfg, run_device(), tmp_path_factory.mktemp("features"))[0],
        )
    return _DATA[(backbone, frozen)]


def _predict(name, cfg, data, root):
    method, _, _ = fit_method(name, cfg, data, root)
    with torch.no_grad():
        return {
            k: predict_split(method, s, run_device())
            for k, s in {"id": data.test_id, **data.test_ood}.items()
        }


def _check(name, cfg, data, root):
    preds = _predict(name, cfg, data, root)
    plain = (
        _predict("plain", cfg, data, root) if name in GLM_MEAN else None
    )  # the same cache: the same base net
    for k, p in preds.items():
        n = len(data.test_id) if k == "id" else len(data.test_ood[k])
        assert p.mean.shape == (n, cfg.embed_dim) and torch.isfinite(p.mean).all(), k
        if p.var is not None:
            assert p.var.shape == p.mean.shape and torch.isfinite(p.var).all() and (p.var >= 0).all(), k
            total = p.var.sum(-1)
            assert p.var.mean() > 1e-3 * p.mean.var(0).mean(), f"{name}: (near) zero variance on {k}"
            assert total.std() > 1e-5 * total.mean(), f"{name}: the same variance for every query of {k}"
        if plain is not None:
            assert torch.allclose(p.mean, plain[k].mean, rtol=1e-4, atol=1e-5), (
                f"{name}: mean is not the base net's"
            )


@pytest.mark.parametrize("backbone", [b for b in BACKBONES.names() if b != "mlp"])
@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_on_a_frozen_trunk(name, backbone, tmp_path, tmp_path_factory):
    if backbone == "efficientnet_lite0":
        pytest.importorskip("efficientnet_lite_pytorch")
    cfg, data = _data(backbone, True, tmp_path_factory)
    assert data.train_id.in_memory and len(data.train_id.in_shape) == 1  # methods see features
    if name == "laplace_torch" and data.train_id.in_shape[0] > 1280:  # a full 4k x 4k for ResNet-50's head
        cfg = cfg.replace(method_options=cfg.method_options + (("laplace_torch_structure", "diag"),))
    _check(name, cfg, data, tmp_path / "models")


@pytest.mark.parametrize("backbone", [b for b in BACKBONES.names() if b in END_TO_END])
@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_end_to_end(name, backbone, tmp_path, tmp_path_factory):
    cfg, data = _data(backbone, False, tmp_path_factory)
    assert data.test_id.in_shape[0] == 3 and not data.test_id.in_memory  # images through the DataLoader
    if name == "laplace_torch" and backbone == "mlp":
        cfg = cfg.replace(method_options=cfg.method_options + (("laplace_torch_structure", "diag"),))
    if (
        name in LAPLACE and backbone == "resnet18"
    ):  # 11M weights: the posterior covers the head (through the trunk)
        cfg = cfg.replace(la_subset="head")
    _check(name, cfg, data, tmp_path / "models")
