"""Building embedding nets from the backbone registry, seeded without touching the global RNG."""

from __future__ import annotations

import torch
from torch import nn

from bench.errors import BenchError
from bench.registry import BACKBONES


def build_model(cfg, in_shape: tuple[int, ...], seed: int, dropout: float = 0.0) -> nn.Module:
    """A freshly initialised `cfg.backbone` net for inputs [N, *in_shape] (initialisation seeded by
    `seed`)."""
    builder = BACKBONES.get(cfg.backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(cfg, tuple(in_shape), dropout)


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters D."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def last_linear(model: nn.Module, needed_by: str = "this method") -> nn.Linear:
    """The output Linear layer (`model.last_linear` when the backbone names it, else the last nn.Linear);
    a one-line BenchError naming `needed_by` when there is none."""
    layer = getattr(model, "last_linear", None)
    if isinstance(layer, nn.Linear):
        return layer
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BenchError(f"the model has no nn.Linear output layer; {needed_by} needs one")
    return linears[-1]
