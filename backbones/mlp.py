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

    @property
    def stackable(self) -> bool:
        """True when `stacked_forward` computes this net: Linear and ReLU layers only (no dropout)."""
        return all(type(layer) in (nn.Linear, nn.ReLU) for layer in self.net)

    def stacked_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """M nets of this architecture at once: parameters stacked [M, ...] (`torch.func.stack_module_state`
        names), inputs [M, B, *in_shape] -> [M, B, embed_dim], one batched matmul and a bias add per layer.
        Bit-identical to vmap(functional_call), forward and backward (a fused baddbmm rounds otherwise, and
        2 epochs of side-by-side training turned that into weights 0.3 apart), without vmap's per-op
        batching dispatch (the ensemble's forward and backward were 4.7x one net's at batch 64)."""
        h = x.flatten(2)
        for i, layer in enumerate(self.net):
            if type(layer) is nn.ReLU:
                h = torch.relu(h)
                continue
            w, b = params[f"net.{i}.weight"].transpose(1, 2), params.get(f"net.{i}.bias")
            h = torch.bmm(h, w) if b is None else torch.bmm(h, w) + b.unsqueeze(1)  # not baddbmm: see above
        return h


@register_backbone("mlp")
def build_mlp(cfg, in_shape: tuple[int, ...], dropout: float) -> EmbeddingNet:
    """MLP on flattened inputs: widths `hidden`, output `embed_dim`, dropout after each hidden ReLU."""
    return EmbeddingNet(math.prod(in_shape), cfg.hidden, cfg.embed_dim, dropout)
