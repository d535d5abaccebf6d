"""The small CIFAR conv net of Laplace-on-retrieval work: three 3x3 conv blocks with 32, 64, 64
channels (ReLU, 2x2 max pooling each) and a Linear embedding layer; with pooling=flat on 32 px
images the embedding layer is Linear(64 * 4 * 4 = 1024 -> d), the original net."""

from __future__ import annotations

from torch import nn

from backbones._cnn import PooledTrunk, build_cnn
from bench.registry import register_backbone

WIDTHS = (32, 64, 64)


def conv_body(channels: int) -> nn.Sequential:
    """Conv(3x3, pad 1) - ReLU - MaxPool(2) per width of WIDTHS: [N, C, H, W] -> [N, 64, H/8, W/8]."""
    layers: list[nn.Module] = []
    prev = channels
    for w in WIDTHS:
        layers += [nn.Conv2d(prev, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        prev = w
    return nn.Sequential(*layers)


@register_backbone("convnet")
def build_convnet(cfg, in_shape: tuple[int, ...], dropout: float) -> nn.Module:
    """Conv 32-64-64 (3x3, ReLU, max-pool) + the embedding head (the CIFAR net of Laplace for retrieval)."""
    return build_cnn(cfg, in_shape, dropout, lambda c: PooledTrunk(conv_body(c), cfg.pooling))
