"""Building embedding nets from the backbone registry, seeded without touching the global RNG."""
from __future__ import annotations

import torch
from torch import nn

from bench.registry import BACKBONES


def build_model(cfg, in_shape: tuple[int, ...], seed: int, dropout: float = 0.0) -> nn.Module:
    """A freshly initialised `cfg.backbone` net for inputs [N, *in_shape] (initialisation seeded by `seed`)."""
    builder = BACKBONES.get(cfg.backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(cfg, tuple(in_shape), dropout)


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters D."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
