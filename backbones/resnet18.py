"""ResNet-18 (torchvision) trunk + the embedding head; from scratch unless `backbone_weights`
names a local file."""

from __future__ import annotations

from torch import nn

from backbones._cnn import build_cnn
from backbones._resnet import resnet_stats, resnet_trunk
from bench.registry import register_backbone


@register_backbone("resnet18", pixel_stats=resnet_stats)
def build_resnet18(cfg, in_shape: tuple[int, ...], dropout: float) -> nn.Module:
    """ResNet-18 (torchvision, from scratch or a local weights file) + pooling + embedding head."""
    return build_cnn(
        cfg, in_shape, dropout, lambda c: resnet_trunk("resnet18", c, cfg.pooling, cfg.backbone_weights)
    )
