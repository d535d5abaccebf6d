"""The embedding network: an MLP on flattened images (the seed's 5 Linear layers with ReLU)."""
from __future__ import annotations

import torch
from torch import nn


class EmbeddingNet(nn.Module):
    """Linear-ReLU stack mapping [N, in_dim] inputs to [N, embed_dim] embeddings.

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
        self.in_dim, self.hidden, self.embed_dim, self.dropout = in_dim, tuple(hidden), embed_dim, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def last_linear(self) -> nn.Linear:
        """The output layer (what last-layer methods treat probabilistically)."""
        return self.net[-1]  # type: ignore[return-value]


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters D."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
