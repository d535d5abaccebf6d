"""What every CNN backbone shares: pooling (avg / GeM / flatten), the embedding head, and the
trunk + head model whose parts the Laplace subsets and the frozen-feature path address by name.

Contract: a CNN embedding net is `CNNEmbedding` with `model.trunk` (images [N, C, H, W] -> pooled
features [N, F]) and `model.head` (an `EmbeddingHead`: features [N, F] -> embedding [N, d]). Built
for 1-d inputs (features of a frozen trunk), a CNN backbone is its head alone, whose `.head` is itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's ImageNet normalisation


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al. 2018): f_c = (mean_hw x_chw^p)^(1/p), p learnable
    (initial 3; p = 1 is average pooling, p -> inf max pooling), x clamped at eps > 0."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean((-2, -1)).pow(1.0 / self.p)


def make_pool(kind: str) -> nn.Module:
    """Feature map [N, C, h, w] -> features: avg [N, C], gem [N, C], flat [N, C*h*w]."""
    if kind == "avg":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if kind == "gem":
        return GeM()
    if kind == "flat":
        return nn.Flatten()
    raise ValueError(f"unknown pooling {kind!r}")


class L2Normalize(nn.Module):
    """z -> z / ||z||_2 (row-wise)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1)


class EmbeddingHead(nn.Module):
    """Features [N, F] -> embedding [N, d]:
    [Dropout(p) if dropout_before] -> [whitening Linear(F, w) if w > 0] -> [Linear-ReLU per hidden width]
    -> Dropout(p) -> Linear(., d) (`last_linear`) -> [L2 normalisation].
    MC dropout's dropout sits right before the embedding layer (in the head) and, optionally, on the
    pooled features (before it); for a single-Linear head the two places coincide (one Dropout)."""

    def __init__(
        self,
        in_dim: int,
        embed_dim: int,
        dropout: float = 0.0,
        whiten_dim: int = 0,
        hidden: tuple[int, ...] = (),
        l2: bool = False,
        dropout_before: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        if dropout > 0 and dropout_before and (whiten_dim or hidden):
            layers.append(nn.Dropout(dropout))
        if whiten_dim:
            layers.append(nn.Linear(prev, whiten_dim))
            prev = whiten_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self._last = len(layers)  # the embedding layer's index in `net` (registered once: see last_linear)
        layers.append(nn.Linear(prev, embed_dim))
        if l2:
            layers.append(L2Normalize())
        self.net = nn.Sequential(*layers)

    @property
    def last_linear(self) -> nn.Linear:
        """The embedding layer. A property, not a second registration of the module: a submodule
        registered under two names is a tied weight, and torch.func.functional_call (Jacobians,
        posterior samples) then restores it as a detached tensor that no longer requires grad."""
        return self.net[self._last]

    @property
    def single_linear(self) -> bool:
        """True when the head computes its embedding layer alone (no whitening, hidden layer or L2
        normalisation; Dropout aside, the identity in eval mode): its Jacobian is then closed-form."""
        return all(isinstance(m, nn.Dropout) for i, m in enumerate(self.net) if i != self._last)

    @property
    def head(self) -> "EmbeddingHead":
        """A head is its own head (the model methods see on a frozen trunk's features)."""
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class CNNEmbedding(nn.Module):
    """trunk (images -> pooled features [N, F]) then head (features -> embedding [N, d])."""

    def __init__(self, trunk: nn.Module, head: EmbeddingHead) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head

    @property
    def last_linear(self) -> nn.Linear:
        return self.head.last_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class PooledTrunk(nn.Module):
    """A convolutional body (images -> feature map) followed by a pooling (`make_pool`)."""

    def __init__(self, body: nn.Module, pool: str) -> None:
        super().__init__()
        self.body, self.pool = body, make_pool(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x))


def feature_dim(trunk: nn.Module, in_shape: tuple[int, ...]) -> int:
    """F of trunk(images [1, *in_shape]), from one forward pass in eval mode (no statistics change)."""
    was = trunk.training
    trunk.eval()
    with torch.no_grad():
        f = trunk(torch.zeros(1, *in_shape)).shape[1]
    trunk.train(was)
    return int(f)


def build_cnn(
    cfg, in_shape: tuple[int, ...], dropout: float, make_trunk: Callable[[int], nn.Module]
) -> nn.Module:
    """The CNN embedding net for inputs [N, *in_shape]: images (C, H, W) -> `CNNEmbedding` of
    make_trunk(C) and the config's head; features (F,) -> the head alone (a frozen trunk's features)."""

    def head(in_dim: int) -> EmbeddingHead:
        return EmbeddingHead(
            in_dim,
            cfg.embed_dim,
            dropout,
            cfg.whiten_dim,
            tuple(cfg.head_hidden),
            cfg.l2_normalize,
            cfg.dropout_before_head,
        )

    if len(in_shape) == 1:
        return head(in_shape[0])
    if len(in_shape) != 3:
        raise ValueError(
            f"a CNN takes images [C, H, W] or features [F], got inputs of shape {list(in_shape)}"
        )
    trunk = make_trunk(in_shape[0])
    return CNNEmbedding(trunk, head(feature_dim(trunk, in_shape)))
