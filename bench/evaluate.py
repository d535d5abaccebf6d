"""Scoring one method's predictions the same way for every method: per-query retrieval vectors, and
for every uncertainty score (bench/scores/) its calibration, sparsification, OOD and confound
metrics, with bootstrap CIs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.config import ALL_SCORES, RunConfig
from bench.conventions import CORRECTNESS_METRIC, ID_SET, score_metric
from bench.data import Dataset
from bench.loss import retrieval_space
from bench.method import EmbeddingPrediction
from bench.metrics.bootstrap import bootstrap_mean_ci
from bench.metrics.calibration import DEFAULT_BINS, calibration_metrics
from bench.metrics.ood import OOD_METRICS, ood_metrics_ci
from bench.metrics.ranking import RANKING_METRICS, ranking_metrics
from bench.metrics.retrieval import retrieval_per_query
from bench.metrics.selective import selective_metric_names, selective_metrics
from bench.metrics.sparsification import sparsification_extras
from bench.metrics.uncertainty import ScoreSettings, candidate_coverage, run_score, score_inputs
from bench.registry import SCORES

NAN3 = (float("nan"), float("nan"), float("nan"))
ID_METRICS = ("ECE", "AUSE", "AURG")  # headline ID metrics (of cfg.id_score)
SCORE_ID_METRICS = ("ECE", *RANKING_METRICS)  # every score's ID metrics: + Spearman, Spearman_within
# old names kept as duplicate rows in results.csv for one version (bench 0.1 -> 0.2): old -> new
ALIASES = {"error_AUROC": "R-AUROC"}


@dataclass
class MethodEvaluation:
    """per_query: metric -> vector [N] whose mean is the metric (CIs by resampling queries);
    scalars: metric -> (value, ci_low, ci_high) for metrics that are not means (AUROC, ECE, ...);
    extras: arrays for plots (reliability bins, sparsification curves), saved with the per-query data;
    scores: (query set, score) -> the score's vector [N] (query set `id` or an OOD set's name);
    diagnostics: JSON-safe facts about the scoring (the kind and number of draws, candidate_coverage
    per query set)."""

    per_query: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)

    def rows(self, cfg: RunConfig) -> list[dict]:
        """Tidy rows (metric, value, ci_low, ci_high) in a stable order."""
        out = []
        for name, vec in self.per_query.items():
            v, lo, hi = bootstrap_mean_ci(vec, cfg.bootstrap_resamples, cfg.ci_level, seed=cfg.seed)
            out.append({"metric": name, "value": v, "ci_low": lo, "ci_high": hi})
        for name, (v, lo, hi) in self.scalars.items():
            out.append({"metric": name, "value": v, "ci_low": lo, "ci_high": hi})
        return out


def resolve_scores(cfg: RunConfig) -> list[str]:
    """The scores of a run: cfg.scores ('all' = every registered score, by name: the order must not
    depend on which module happened to be imported first), plus id_score and ood_score; an unknown
    name is a BenchError listing the registered ones."""
    names: list[str] = []
    for n in (*cfg.scores, cfg.id_score, cfg.ood_score):
        for s in sorted(SCORES.names()) if n == ALL_SCORES else [n]:
            SCORES.get(s)
            if s not in names:
                names.append(s)
    return names


def ood_metric_names(ood_sets: list[str]) -> list[str]:
    """`AUROC[s]`, `AUPR[s]`, `FPR95[s]`, `var_ratio[s]` for each OOD set s."""
    return [f"{m}[{s}]" for s in ood_sets for m in OOD_METRICS]


def uncertainty_metric_names(ood_sets: list[str]) -> list[str]:
    """Headline uncertainty metrics for the given OOD sets, in results order (the default scores')."""
    return [*ID_METRICS, *ood_metric_names(ood_sets)]


def selective_losses(ks: tuple[int, ...]) -> list[str]:
    """The per-query metrics whose loss (1 - metric) the selective metrics use: precision@1 (`mAP@1`,
    the headline: AURC, ...) and AP at the largest K (`mAP@K`: AURC(mAP@K), ...) when K > 1."""
    return list(dict.fromkeys([CORRECTNESS_METRIC, f"mAP@{max(ks)}"]))


def score_metric_names(ood_sets: list[str], ks: tuple[int, ...] = RunConfig.ks) -> list[str]:
    """Metrics every score gets (suffixed `:<score>` in results), in results order (the aliases of
    ALIASES last)."""
    return [
        *SCORE_ID_METRICS,
        *selective_metric_names(selective_losses(ks)),
        *ood_metric_names(ood_sets),
        *ALIASES,
    ]


def _id_metrics(
    u: np.ndarray | None, correct: np.ndarray, classes: np.ndarray, losses: dict[str, np.ndarray], boot: dict
) -> tuple[dict[str, tuple[float, float, float]], dict[str, np.ndarray]]:
    """ECE, AUSE, AURG, R-AUROC, the two Spearman diagnostics and the selective metrics (per loss
    of `losses`) of ID score u (NaN when u is None), and the extras of the plots (reliability bins,
    confidence, sparsification curves)."""
    selective = selective_metric_names(list(losses))
    if u is None or u.size == 0:
        return {n: NAN3 for n in (*SCORE_ID_METRICS, *selective)}, {}
    out: dict[str, tuple[float, float, float]] = {}
    out["ECE"], cal_extras = calibration_metrics(u, correct, DEFAULT_BINS, **boot)
    out.update(ranking_metrics(u, correct, classes, **boot))
    out.update(selective_metrics(u, losses, **boot))
    return out, {**cal_extras, **sparsification_extras(u, correct)}


def _ood_metrics(
    u_id: np.ndarray | None, u_ood: dict[str, np.ndarray | None], boot: dict
) -> dict[str, tuple[float, float, float]]:
    out = {}
    for s, u in u_ood.items():
        if u_id is None or u is None or u.size == 0 or u_id.size == 0:
            vals = {m: NAN3 for m in OOD_METRICS}
        else:
            vals = ood_metrics_ci(u_id, u, **boot)
        out.update({f"{m}[{s}]": vals[m] for m in OOD_METRICS})
    return out


def evaluate(
    pred_id: EmbeddingPrediction, pred_ood: dict[str, EmbeddingPrediction], data: Dataset, cfg: RunConfig
) -> MethodEvaluation:
    """Retrieval on the ID test set (leave-one-out, mean embeddings in `retrieval_space` of
    cfg.distance; CIs resample queries with the gallery fixed) and, for every score u of
    `resolve_scores(cfg)` (bench/scores/; a score sees the ID test set as gallery, in the same
    geometry, never a query's own label):
    * `ECE:u` of u against precision@1 (cross-fitted isotonic confidence, equal-mass bins);
    * `AUSE:u` and `AURG:u`: sparsification of the correctness by u (AURG > 0: better than random);
    * `R-AUROC:u`: P(u of a wrong query > u of a right one), the base-rate-free error detection
      (URL-style benchmarks' R-AUROC; also written under its old name `error_AUROC:u` for one version);
    * selective retrieval (bench.metrics.selective): `AURC:u`, `E-AURC:u`, `AUGRC:u`, `Risk@80Cov:u`,
      `Risk@90Cov:u`, `Risk@95Cov:u` with loss 1 - precision@1, and the same suffixed `(mAP@K)` with
      loss 1 - AP@K for the largest K of cfg.ks;
    * `Spearman:u` (overall) and `Spearman_within:u` (mean over the queries' true classes) of u with
      the correctness: the confound diagnostics (the class is used here only, never by u);
    * per OOD set s (ID test queries vs the queries of s): `AUROC[s]:u`, `AUPR[s]:u`, `FPR95[s]:u`,
      `var_ratio[s]:u`, stratified bootstrap.
    The headline `ECE`, `AUSE`, `AURG` (with extras reliability_*, confidence, sparsification_*)
    repeat cfg.id_score's, `AUROC[s]`, `AUPR[s]`, `FPR95[s]`, `var_ratio[s]` cfg.ood_score's.
    A score that needs a predictive gets NaN (n/a) for a deterministic method, never a made-up
    number. Every bootstrap uses cfg.bootstrap_resamples, cfg.ci_level and numpy Generator(cfg.seed)."""
    ev = MethodEvaluation()
    labels = data.test_id.y
    emb = retrieval_space(pred_id.mean.detach().cpu(), cfg.distance)  # retrieval in the training geometry
    ev.per_query.update(retrieval_per_query(emb, labels, cfg.ks))
    correct = ev.per_query.get(CORRECTNESS_METRIC)
    if correct is None:
        correct = retrieval_per_query(emb, labels, (1,))[CORRECTNESS_METRIC]
    classes = labels.cpu().numpy()  # for the within-class diagnostic only
    boot = dict(n_resamples=cfg.bootstrap_resamples, level=cfg.ci_level, seed=cfg.seed)
    names = resolve_scores(cfg)
    losses = {m: 1.0 - (ev.per_query[m] if m in ev.per_query else correct) for m in selective_losses(cfg.ks)}
    inp_id, inp_ood = score_inputs(pred_id, pred_ood, labels, ScoreSettings.from_config(cfg))
    ood_sets = list(pred_ood)
    headline = {n: NAN3 for n in uncertainty_metric_names(ood_sets)}
    per_score: dict[str, tuple[float, float, float]] = {}
    vectors = {}
    for name in names:
        u_id = run_score(name, inp_id)
        u_ood = {s: run_score(name, inp) for s, inp in inp_ood.items()}
        for s, u in [(ID_SET, u_id), *u_ood.items()]:
            if u is not None:
                ev.scores[(s, name)] = u
        vectors[name] = (u_id, u_ood)

    def metrics_of(name: str):
        u_id, u_ood = vectors[name]
        return _id_metrics(u_id, correct, classes, losses, boot), _ood_metrics(u_id, u_ood, boot)

    # the scores' bootstraps in threads over the cores this fit may use (numpy's passes release the GIL;
    # every bootstrap is seeded, so the values do not depend on the order): one while other fits wait
    threads = max(1, min(torch.get_num_threads(), len(names)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        computed = dict(zip(names, pool.map(metrics_of, names)))
    for name in names:
        (id_vals, extras), ood_vals = computed[name]
        aliases = {old: id_vals[new] for old, new in ALIASES.items()}
        per_score.update({score_metric(m, name): v for m, v in {**id_vals, **ood_vals, **aliases}.items()})
        if name == cfg.id_score:
            headline.update({m: id_vals[m] for m in ID_METRICS})
            ev.extras.update(extras)
        if name == cfg.ood_score:
            headline.update(ood_vals)
    ev.scalars.update(headline)
    ev.scalars.update(per_score)
    if not inp_id.deterministic:
        ev.diagnostics["score_draws"] = {
            "kind": "joint samples" if inp_id.joint else "independent Gaussian draws",
            "count": int(inp_id.draws()[0].shape[0]),
        }
        ev.diagnostics["score_candidate_coverage"] = {
            s: candidate_coverage(inp) for s, inp in [(ID_SET, inp_id), *inp_ood.items()]
        }
    return ev
