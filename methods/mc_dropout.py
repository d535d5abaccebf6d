"""MC dropout (Gal & Ghahramani, 2016): dropout kept active at test time as approximate inference.

The embedding net has a Dropout layer with rate p after every hidden ReLU and is trained through the
shared loop (same loss, miner, optimiser, epochs as the base model; its own cache entry). At test
time T stochastic forward passes with independent Bernoulli masks give samples z_1..z_T [N, d] of
the embedding of each query; the prediction is

    mean = (1/T) sum_t z_t
    var  = (1/(T-1)) sum_t (z_t - mean)^2                     (per dimension, unbiased)
    cov  = (1/(T-1)) sum_t (z_t - mean)(z_t - mean)^T         (only for d <= COV_MAX_DIM)

Dropout rate. Gal & Ghahramani treat p as a model hyperparameter; for small fully connected nets
the literature uses small rates: their UCI regression experiments (public code
yaringal/DropoutUncertaintyExps) grid-search p on a validation split, common reimplementations over
{0.005, 0.01, 0.05, 0.1}, and 0.1 is the usual default of MC-dropout baselines; p = 0.5 is the
large-network, regularisation-driven choice of Srivastava et al. (2014).
The seed paper's net has hidden layers only 16 units wide: with p = 0.5 each pass would keep about
8 units per layer across four stacked layers, which cripples the retrieval quality of the very net
whose uncertainty we measure. p = 0.1 (cfg.dropout, the default) keeps about 14 of 16 units per
layer: enough noise to produce a spread, little enough to leave mAP close to the plain net's.

Masks are drawn from a dedicated torch.Generator seeded from cfg.seed (not the global RNG), so the
prediction for a fixed seed is bit-reproducible and independent of what ran before. All T passes
happen inside `predict`, so the runner's "predict" stage includes them; training time goes to this
method's "train" stage through ctx.train_model.
"""
from __future__ import annotations

import torch
from torch import nn

from bench.errors import BenchError
from bench.method import EmbeddingPrediction, FitContext, Method
from bench.model import EmbeddingNet
from bench.registry import register_method

COV_MAX_DIM = 16  # full per-query covariance only for small embeddings ([N, d, d] memory)
MASK_SEED_OFFSET = 0x6D63  # separates the mask stream from other seeded streams of the same run seed


def mask_seed(seed: int) -> int:
    """Seed of the dropout-mask generator for run seed `seed` (deterministic, 63-bit)."""
    return (seed * 1_000_003 + MASK_SEED_OFFSET) % (2 ** 63 - 1)


def stochastic_forward(model: EmbeddingNet, x: torch.Tensor, generator: torch.Generator | None,
                       active: bool = True) -> torch.Tensor:
    """One forward pass of `model` on x [N, in_dim] -> [N, d] with dropout masks from `generator`.

    With `active=True` every nn.Dropout(p) multiplies its input by an independent mask
    Bernoulli(1 - p) / (1 - p) (inverted dropout, as nn.Dropout in train mode); with `active=False`
    dropout is the identity (eval mode) and the pass is deterministic.
    """
    h = x
    for layer in model.net:
        if isinstance(layer, nn.Dropout):
            if active and layer.p > 0:
                keep = 1.0 - layer.p
                u = torch.rand(h.shape, generator=generator, device=h.device, dtype=h.dtype)
                h = h * (u < keep).to(h.dtype) / keep
        else:
            h = layer(h)
    return h


def mc_samples(model: EmbeddingNet, x: torch.Tensor, samples: int, seed: int, active: bool = True) -> torch.Tensor:
    """T = `samples` stochastic passes [T, N, d], masks from a generator seeded with `seed`."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    return torch.stack([stochastic_forward(model, x, g, active) for _ in range(samples)])


def moments(z: torch.Tensor, with_cov: bool) -> EmbeddingPrediction:
    """Mean, unbiased per-dimension variance and (optionally) covariance of samples z [T, N, d]."""
    mean = z.mean(0)
    c = z - mean
    denom = max(z.shape[0] - 1, 1)
    var = (c ** 2).sum(0) / denom
    cov = torch.einsum("tni,tnj->nij", c, c) / denom if with_cov else None
    return EmbeddingPrediction(mean=mean, var=var, cov=cov)


@register_method("mc_dropout")
class MCDropout(Method):
    """MC dropout: a net trained with dropout p after each hidden layer, T stochastic passes at test time."""

    post_hoc = False

    def fit(self, ctx: FitContext) -> None:
        if self.cfg.dropout <= 0.0:
            raise BenchError("mc_dropout needs dropout > 0 (got 0: every pass would be identical); "
                             "use --set dropout=0.1")
        self.model = ctx.train_model(seed=ctx.seed, dropout=self.cfg.dropout)
        self.model.eval()  # dropout is applied explicitly with seeded masks in predict
        self.seed = mask_seed(ctx.seed)
        self.diagnostics = {"dropout": self.cfg.dropout, "mc_samples": self.cfg.mc_samples,
                            "mask_seed": self.seed}

    def predict(self, x: torch.Tensor) -> EmbeddingPrediction:
        z = mc_samples(self.model, x, self.cfg.mc_samples, self.seed, active=True)
        return moments(z, with_cov=z.shape[-1] <= COV_MAX_DIM)
