"""Scoring one method's predictions the same way for every method: per-query retrieval vectors,
calibration, sparsification and OOD metrics of the uncertainty score, with bootstrap CIs."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench.config import RunConfig
from bench.method import EmbeddingPrediction
from bench.metrics.bootstrap import bootstrap_mean_ci
from bench.metrics.calibration import DEFAULT_BINS, calibration_metrics
from bench.metrics.ood import OOD_METRICS, ood_metrics_ci
from bench.metrics.retrieval import retrieval_per_query, retrieval_space
from bench.metrics.sparsification import sparsification_metrics
from bench.metrics.uncertainty import uncertainty_score
from bench.conventions import CORRECTNESS_METRIC
from bench.data import Dataset

NAN3 = (float("nan"), float("nan"), float("nan"))


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


def uncertainty_metric_names(ood_sets: list[str]) -> list[str]:
    """Names of the uncertainty metrics for the given OOD sets, in results order."""
    return ["ECE", "AUSE"] + [f"{m}[{s}]" for s in ood_sets for m in OOD_METRICS]


def evaluate(pred_id: EmbeddingPrediction, pred_ood: dict[str, EmbeddingPrediction], data: Dataset,
             cfg: RunConfig) -> MethodEvaluation:
    """Retrieval on the ID test set (leave-one-out, mean embeddings in `retrieval_space` of
    cfg.distance; CIs resample queries with the gallery fixed) and, from the uncertainty score u = tr(Sigma):
    * ECE of u against precision@1 (cross-fitted isotonic confidence, equal-mass bins), extras
      reliability_{conf,acc,count} and confidence;
    * AUSE: sparsification of the correctness by u, extras sparsification_*;
    * per OOD set s (ID test queries vs the queries of s): AUROC[s], AUPR[s], FPR95[s],
      var_ratio[s], stratified bootstrap.
    A deterministic method gets every uncertainty metric as NaN (n/a), never a made-up number.
    Every bootstrap uses cfg.bootstrap_resamples, cfg.ci_level and numpy Generator(cfg.seed)."""
    ev = MethodEvaluation()
    labels = data.test_id.y
    emb = retrieval_space(pred_id.mean.detach().cpu(), cfg.distance)  # retrieval in the training geometry
    ev.per_query.update(retrieval_per_query(emb, labels, cfg.ks))
    ood_sets = list(pred_ood)
    u_id = uncertainty_score(pred_id)
    if u_id is None:
        ev.scalars.update({name: NAN3 for name in uncertainty_metric_names(ood_sets)})
        return ev
    correct = ev.per_query.get(CORRECTNESS_METRIC)
    if correct is None:
        correct = retrieval_per_query(emb, labels, (1,))[CORRECTNESS_METRIC]
    boot = dict(n_resamples=cfg.bootstrap_resamples, level=cfg.ci_level, seed=cfg.seed)
    ev.scalars["ECE"], cal_extras = calibration_metrics(u_id, correct, DEFAULT_BINS, **boot)
    ev.scalars["AUSE"], sp_extras = sparsification_metrics(u_id, correct, **boot)
    ev.extras.update(cal_extras)
    ev.extras.update(sp_extras)
    for s, p in pred_ood.items():
        u_ood = uncertainty_score(p)
        if u_ood is None or u_ood.size == 0 or u_id.size == 0:
            vals = {m: NAN3 for m in OOD_METRICS}
        else:
            vals = ood_metrics_ci(u_id, u_ood, **boot)
        ev.scalars.update({f"{m}[{s}]": vals[m] for m in OOD_METRICS})
    return ev
