"""Sensitivity sweep (opt-in): a fitted method re-evaluated at every point of
cfg.sensitivity_priors x cfg.sensitivity_scales (prior precision x likelihood temperature) without
refitting (`Method.variants`: the Laplace family reuses one factorisation), each point scored by the
harness's own `evaluate`; the headline metrics per point go to the run folder's sensitivity.csv."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from bench.config import RunConfig
from bench.conventions import CORRECTNESS_METRIC
from bench.data import Dataset
from bench.evaluate import MethodEvaluation, evaluate
from bench.method import EmbeddingPrediction, Method

SENSITIVITY_COLUMNS = [
    "method",
    "seed",
    "prior_precision",
    "likelihood_scale",
    "rank_bound",
    "metric",
    "value",
    "ci_low",
    "ci_high",
]
AXES = ("prior_precision", "likelihood_scale")  # the settings a point changes (RunConfig names)

PredictAll = Callable[[Method], tuple[EmbeddingPrediction, dict[str, EmbeddingPrediction]]]


def offered(method: Method) -> bool:
    """Whether the method offers a sweep (it overrides `Method.variants`)."""
    return type(method).variants is not Method.variants


def points(cfg: RunConfig) -> list[dict[str, float | None]]:
    """The grid: every (prior precision, temperature) of the two axes; an empty axis is [None] (the fitted
    value)."""
    priors = list(cfg.sensitivity_priors) or [None]
    scales = list(cfg.sensitivity_scales) or [None]
    return [dict(zip(AXES, p)) for p in itertools.product(priors, scales)]


def headline_metrics(ood_sets: list[str]) -> list[str]:
    """The metrics a sweep records: mAP@1, AUSE, ECE and AUROC[<set>] per OOD set."""
    return [CORRECTNESS_METRIC, "AUSE", "ECE"] + [f"AUROC[{s}]" for s in ood_sets]


def sweep(
    method: Method, name: str, seed: int, data: Dataset, cfg: RunConfig, predict_all: PredictAll
) -> list[dict]:
    """Rows (SENSITIVITY_COLUMNS) of every point of `points(cfg)` for a fitted method; [] when the method
    offers none. Each point: the method's own predict on every query set, `evaluate`, and the
    headline metrics with their CIs (only those are bootstrapped)."""
    variants = method.variants(points(cfg))
    if variants is None:
        return []
    rows = []
    for settings, variant in variants:
        pred_id, pred_ood = predict_all(variant)
        ev = evaluate(pred_id, pred_ood, data, cfg)
        names = headline_metrics(list(pred_ood))
        kept = MethodEvaluation(
            per_query={k: v for k, v in ev.per_query.items() if k in names},
            scalars={k: v for k, v in ev.scalars.items() if k in names},
        )
        for r in kept.rows(cfg):
            rows.append(
                {"method": name, "seed": seed, **{k: settings.get(k) for k in (*AXES, "rank_bound")}, **r}
            )
    return rows
