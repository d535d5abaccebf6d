"""Plain deep metric learning: the deterministic MAP embedding network, no uncertainty."""

from __future__ import annotations

import torch

from bench.method import EmbeddingPrediction, FitContext, Method
from bench.recipes import Recipe
from bench.registry import register_method


@register_method("plain")
class PlainEmbedding(Method):
    """Deterministic embedding net (contrastive loss); uncertainty metrics are n/a."""

    reuses_base_model = True  # it *is* the shared base model
    recipes = {
        "paper": Recipe(
            settings={},
            source="Hadsell et al. 2006 + the seed paper, Sec. 3; the contrastive loss with a "
            "TripletMarginMiner (pytorch-metric-learning): the shared base model",
            note="no setting of its own: the training settings are the run's (preset), shared by every "
            "method that reuses the base model",
        )
    }
    tunable = {}  # nothing to tune: no uncertainty

    def fit(self, ctx: FitContext) -> None:
        self.model = ctx.base_model()

    def predict(self, x: torch.Tensor) -> EmbeddingPrediction:
        return EmbeddingPrediction(mean=self.model(x))
