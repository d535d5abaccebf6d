"""torchvision ResNets as trunks, from scratch (weights=None: nothing is downloaded) or from a local
weights file (`backbone_weights`, e.g. torchvision's ImageNet state dict; its `fc.*` is ignored)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from backbones._cnn import IMAGENET_STATS, PooledTrunk
from bench.errors import BenchError


def resnet_trunk(arch: str, channels: int, pool: str, weights: str | None) -> PooledTrunk:
    """torchvision `arch` (resnet18 | resnet50) without its classifier: stem + layer1..4 + pooling."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise BenchError(
                f"backbone_weights {path} is not a file (a {arch} state dict saved with torch.save)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        missing, unexpected = net.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False
        )
        if [k for k in missing if not k.startswith("fc.")] or unexpected:
            raise BenchError(
                f"backbone_weights {path} does not fit {arch} (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
    if channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    body = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    return PooledTrunk(body, pool)


def resnet_stats(cfg):
    """ImageNet normalisation when pretrained weights are loaded, else the data's own statistics."""
    return IMAGENET_STATS if cfg.backbone_weights else None
