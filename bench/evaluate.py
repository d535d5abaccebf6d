"""Scoring one method's predictions: per-query metric vectors and their bootstrap CIs."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench.config import RunConfig
from bench.method import EmbeddingPrediction
from bench.metrics.bootstrap import bootstrap_mean_ci
from bench.metrics.retrieval import retrieval_per_query
from datasets.base import Dataset


@dataclass
class MethodEvaluation:
    """per_query: metric -> vector [N] whose mean is the metric (CIs by resampling queries);
    scalars: metric -> (value, ci_low, ci_high) for metrics that are not means (AUROC, ECE, ...);
    extras: arrays for plots (reliability bins, sparsification curves), saved with the per-query data."""

    per_query: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def rows(self, cfg: RunConfig) -> list[dict]:
        """Tidy rows (metric, value, ci_low, ci_high) in a stable order."""
        out = []
        for name, vec in self.per_query.items():
            v, lo, hi = bootstrap_mean_ci(vec, cfg.bootstrap_resamples, cfg.ci_level, seed=cfg.seed)
            out.append({"metric": name, "value": v, "ci_low": lo, "ci_high": hi})
        for name, (v, lo, hi) in self.scalars.items():
            out.append({"metric": name, "value": v, "ci_low": lo, "ci_high": hi})
        return out


def evaluate(pred_id: EmbeddingPrediction, pred_ood: dict[str, EmbeddingPrediction], data: Dataset,
             cfg: RunConfig) -> MethodEvaluation:
    """Retrieval on the ID test set (leave-one-out, mean embeddings) and uncertainty metrics."""
    ev = MethodEvaluation()
    ev.per_query.update(retrieval_per_query(pred_id.mean.detach().cpu(), data.test_id.y, cfg.ks))
    return ev
