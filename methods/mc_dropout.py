"""MC dropout (Gal & Ghahramani, 2016): dropout kept active at test time as approximate inference.

The embedding net has a Dropout layer with rate p after every hidden ReLU and is trained through the
shared loop (same loss, miner, optimiser, epochs as the base model; its own cache entry). At test
time T stochastic forward passes with independent Bernoulli masks give samples z_1..z_T [N, d] of
the embedding of each query; the prediction is

    mean = (1/T) sum_t z_t
    var  = (1/(T-1)) sum_t (z_t - mean)^2                     (per dimension, unbiased)
    cov  = (1/(T-1)) sum_t (z_t - mean)(z_t - mean)^T         (only for d <= SAMPLE_COV_MAX_DIM)

Dropout rate. Gal & Ghahramani treat p as a model hyperparameter; for small fully connected nets
the literature uses small rates: their UCI regression experiments (public code
yaringal/DropoutUncertaintyExps) grid-search p on a validation split, common reimplementations over
{0.005, 0.01, 0.05, 0.1}, and 0.1 is the usual default of MC-dropout baselines; p = 0.5 is the
large-network, regularisation-driven choice of Srivastava et al. (2014).
The seed paper's net has hidden layers only 16 units wide: with p = 0.5 each pass would keep about
8 units per layer across four stacked layers, which cripples the retrieval quality of the very net
whose uncertainty we measure. p = 0.1 (the dropout option's default) keeps about 14 of 16 units per
layer: enough noise to produce a spread, little enough to leave mAP close to the plain net's.

Masks are drawn from a dedicated torch.Generator seeded from cfg.seed (not the global RNG), so the
prediction for a fixed seed is bit-reproducible and independent of what ran before. All T passes
happen inside `predict`, so the runner's "predict" stage includes them; training time goes to this
method's "train" stage through ctx.train_model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bench.errors import require
from bench.method import EmbeddingPrediction, FitContext, Method, Option
from bench.recipes import Knob
from bench.registry import register_method

MASK_SEED_OFFSET = 0x6D63  # generator offset of the dropout-mask stream


@contextmanager
def seeded_dropout(
    model: nn.Module, generator: torch.Generator | None, active: bool = True
) -> Iterator[None]:
    """Within the block, every nn.Dropout(p) of `model` (in eval mode) multiplies its input by a mask
    Bernoulli(1 - p) / (1 - p) drawn from `generator` (inverted dropout, as nn.Dropout in train
    mode); with active=False dropout stays the identity. Works for any backbone with Dropout modules."""

    def hook(mod: nn.Dropout, inp: tuple, out: torch.Tensor) -> torch.Tensor:
        h = inp[0]
        keep = 1.0 - mod.p
        u = torch.rand(h.shape, generator=generator, device=h.device, dtype=h.dtype)
        return h * (u < keep).to(h.dtype) / keep

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Dropout) and active and m.p > 0
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def mc_samples(
    model: nn.Module, x: torch.Tensor, samples: int, generator: torch.Generator, active: bool = True
) -> torch.Tensor:
    """T = `samples` stochastic passes [T, N, d] of `model` (eval mode), masks from `generator`."""
    with seeded_dropout(model, generator, active):
        return torch.stack([model(x) for _ in range(samples)])


@register_method("mc_dropout")
class MCDropout(Method):
    """MC dropout: a net trained with dropout p after each hidden layer, T stochastic passes at test time."""

    reuses_base_model = False
    _stream: torch.Generator | None = None  # set by query_set
    tunable = {"dropout": Knob(0.05, 0.5)}  # recipe=tuned (bench.tuning): the dropout rate, refit per trial
    options = {
        "dropout": Option(float, 0.1, "dropout rate p after each hidden layer, in training and at test time"),
        "dropout_passes": Option(int, 100, "stochastic forward passes T at test time", minimum=2),
    }

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        p = cls.option(cfg, "dropout")
        require(
            0.0 < p < 1.0,
            f"mc_dropout needs dropout in (0, 1), got {p} "
            "(0 makes every pass identical); e.g. --set dropout=0.1",
        )

    def fit(self, ctx: FitContext) -> None:
        self.dropout, self.passes = self.option(self.cfg, "dropout"), self.option(self.cfg, "dropout_passes")
        self.model = ctx.train_model(seed=ctx.seed, dropout=self.dropout)
        self.model.eval()  # dropout is applied explicitly with seeded masks in predict
        self.mask_seed = ctx.seed_for(MASK_SEED_OFFSET)
        self.diagnostics = {
            "dropout": self.dropout,
            "dropout_passes": self.passes,
            "mask_seed": self.mask_seed,
        }

    def predict(self, x: torch.Tensor) -> EmbeddingPrediction:
        g = self._stream or torch.Generator(device=x.device).manual_seed(
            self.mask_seed
        )  # same masks per query set
        z = mc_samples(self.model, x, self.passes, g)
        return EmbeddingPrediction.from_sample_moments(z)

    @contextmanager
    def query_set(self) -> Iterator[None]:
        """A query set read in chunks draws its masks from one stream (seeded as a single call would be),
        so item i of one chunk and item i of the next get independent masks."""
        device = next(self.model.parameters()).device
        self._stream = torch.Generator(device=device).manual_seed(self.mask_seed)
        try:
            yield
        finally:
            self._stream = None
