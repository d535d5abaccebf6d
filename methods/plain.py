"""Plain deep metric learning: the deterministic MAP embedding network, no uncertainty."""

from __future__ import annotations

import torch

from bench.method import EmbeddingPrediction, FitContext, Method
from bench.registry import register_method


@register_method("plain")
class PlainEmbedding(Method):
    """Deterministic embedding net (contrastive loss); uncertainty metrics are n/a."""

    reuses_base_model = True  # it *is* the shared base model

    def fit(self, ctx: FitContext) -> None:
        self.model = ctx.base_model()

    def predict(self, x: torch.Tensor) -> EmbeddingPrediction:
        return EmbeddingPrediction(mean=self.model(x))
