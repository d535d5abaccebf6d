"""The seed paper's embedding net: a Linear-ReLU stack on flattened images (5 Linear layers by default)."""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.registry import register_backbone


class EmbeddingNet(nn.Module):
    """Linear-ReLU stack mapping inputs [N, *in_shape] (flattened) to [N, embed_dim] embeddings.

    With `dropout > 0` a Dropout layer follows each hidden ReLU (MC dropout keeps it active at test time).
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], embed_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = h
        layers.append(nn.Linear(prev, embed_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


@register_backbone("mlp")
def build_mlp(cfg, in_shape: tuple[int, ...], dropout: float) -> EmbeddingNet:
    """MLP on flattened inputs: widths `hidden`, output `embed_dim`, dropout after each hidden ReLU."""
    return EmbeddingNet(math.prod(in_shape), cfg.hidden, cfg.embed_dim, dropout)
