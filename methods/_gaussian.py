"""Gaussian embeddings shared by the probabilistic-embedding methods (PFE, HIB, BTL).

These methods model data (aleatoric) uncertainty: the net predicts, per input, a Gaussian
N(mean(x), diag(var(x))) in embedding space, instead of a posterior over its weights. The three share
what is written here: reading their options from the config, a net that returns (mean, var) for
every registered backbone, the KL divergence to an isotropic Gaussian prior, and the plumbing of the
two methods that train their own net through the shared loop (HIB, BTL).

Net. The registered backbone is built with embed_dim = d + k outputs (bench.model.build_model, so
every backbone works unchanged): the first d are the mean, the last k the raw variance, with k = d
("diag", one variance per dimension) or k = 1 ("isotropic", one variance broadcast to all d):

    mean = out[:, :d]        var = softplus(out[:, d:]) + VAR_FLOOR       [N, d] after broadcasting

softplus keeps the variance positive with a gradient that neither explodes nor vanishes (the
Bayesian triplet loss reference code uses it for its variance head); VAR_FLOOR keeps log var finite.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.loss import BatchLoss
from bench.method import EmbeddingPrediction, FitContext, Method
from bench.model import build_model
from bench.train import Recipe

VAR_FLOOR = 1e-6  # smallest predicted variance (as PFE's reference code: log(1e-6 + exp(.)))
VARIANCE_KINDS = ("diag", "isotropic")


def variance_width(kind: str, embed_dim: int) -> int:
    """Number of variance outputs k: embed_dim for 'diag', 1 for 'isotropic'."""
    return embed_dim if kind == "diag" else 1


def broadcast_var(var: torch.Tensor, embed_dim: int) -> torch.Tensor:
    """Variance [N, k] (k = 1 or d) as a per-dimension variance [N, d]."""
    return var.expand(var.shape[0], embed_dim).contiguous() if var.shape[1] != embed_dim else var


class GaussianEmbeddingNet(nn.Module):
    """A backbone with d + k outputs read as a Gaussian embedding: forward(x) -> (mean [N, d], var [N, d])."""

    def __init__(self, backbone: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(x)
        mean, raw = out[:, : self.embed_dim], out[:, self.embed_dim :]
        return mean, broadcast_var(F.softplus(raw) + VAR_FLOOR, self.embed_dim)


def build_gaussian_net(
    cfg,
    in_shape: tuple[int, ...],
    seed: int,
    kind: str,
    cls: type[GaussianEmbeddingNet] = GaussianEmbeddingNet,
) -> GaussianEmbeddingNet:
    """A `cfg.backbone` net with cfg.embed_dim mean outputs and a `kind` variance ('diag' | 'isotropic')."""
    d = cfg.embed_dim
    backbone = build_model(cfg.replace(embed_dim=d + variance_width(kind, d)), in_shape, seed)
    return cls(backbone, d)


def kl_to_isotropic_prior(mean: torch.Tensor, var: torch.Tensor, prior_var: float = 1.0) -> torch.Tensor:
    """KL( N(mean, diag var) || N(0, prior_var I) ) per item [N], for mean, var [N, d]:

    KL = 1/2 sum_l [ var_l / v0 + mean_l^2 / v0 - 1 - log(var_l / v0) ]     (standard Gaussian KL)
    """
    ratio = var / prior_var
    return 0.5 * (ratio + mean**2 / prior_var - 1.0 - torch.log(ratio)).sum(-1)


def all_pairs(n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) of the n(n-1)/2 unordered pairs i < j of a batch of n items."""
    iu = torch.triu_indices(n, n, offset=1, device=device)
    return iu[0], iu[1]


class OwnGaussianNetMethod(Method):
    """A Gaussian-embedding method that trains its own net with its own objective through the shared,
    cached loop (`ctx.train_model(recipe=...)`; charged to the method's train stage); predicts the
    net's (mean, var). Subclasses give `batch_loss`, `NET` (the net class), `PREFIX` and `options`
    named `<PREFIX>_<option>`, with at least `_variance` and `_kl_weight`; the values enter the cache key."""

    reuses_base_model = False
    PREFIX = ""
    NET: type[GaussianEmbeddingNet] = GaussianEmbeddingNet
    RECIPE_VERSION = 1  # bump in a subclass when its objective's code changes, so cached nets are retrained

    @classmethod
    def option_values(cls, cfg) -> dict[str, Any]:
        """Option name without the method prefix -> value in this config (default unless set)."""
        return {name[len(cls.PREFIX) + 1 :]: cls.option(cfg, name) for name in cls.options}

    def recipe_options(self) -> dict[str, Any]:
        return {**self.option_values(self.cfg), "version": self.RECIPE_VERSION}

    def build(self, cfg, in_shape: tuple[int, ...], seed: int) -> GaussianEmbeddingNet:
        return build_gaussian_net(cfg, in_shape, seed, self.option_values(cfg)["variance"], cls=self.NET)

    def batch_loss(self, cfg) -> BatchLoss:
        raise NotImplementedError

    def fit(self, ctx: FitContext) -> None:
        opts = self.recipe_options()
        recipe = Recipe(
            name=self.name, build=self.build, loss=self.batch_loss, options=tuple(sorted(opts.items()))
        )
        self.net = ctx.train_model(seed=ctx.seed, recipe=recipe)
        self.net.eval()
        self.diagnostics = {**opts, **self.fitted_facts()}

    def fitted_facts(self) -> dict[str, Any]:
        """JSON-safe facts about the trained net for the diagnostics (none by default)."""
        return {}

    def predict(self, x: torch.Tensor) -> EmbeddingPrediction:
        mean, var = self.net(x)
        return EmbeddingPrediction(mean=mean, var=var)
