"""What an uncertainty score sees, and the loop that computes every score of a method.

A score (a plugin in bench/scores/, `@register_score`) maps one query set to one number per query,
larger = more uncertain. It receives a `ScoreInputs`: the queries' prediction (mean, var, cov,
samples as the method gave them), the gallery's prediction (the ID test set), the candidate set of
each query (its nearest gallery items under the mean embeddings, with their labels), joint draws of
queries and gallery, and the run's distance. The query's own label is not in it: gallery labels
reach a score only through the candidates, and under leave-one-out (the queries are the gallery) a
query is never its own candidate. That is the whole contract; the query's true class is used only
by the evaluation's confound diagnostics, never by a score.

Draws. When the method attaches joint samples (`EmbeddingPrediction.samples` [S, N, d]: the same S
members / passes / posterior draws for every query set) they are the draws, so query and gallery
items are jointly distributed as the method says. Otherwise (PFE, HIB, BTL: a Gaussian per item)
the draws are independent Gaussian draws z = mean + L eps, L L^T = cov (or sqrt(var) per
dimension), S = `score_samples`, from a torch.Generator seeded from the run seed: independent
draws *are* those methods' predictive. Deterministic methods have no draws.

Candidate sets (an approximation, exact when K_c covers the gallery): per query the K_c nearest
gallery items under the mean embeddings (`score_candidates`; 0 = the whole gallery). A sampled
retrieval (top-1 or top-K under draw s) is searched among them only. It is exact whenever the item
retrieved under draw s is a candidate; `candidate_coverage` measures how often that holds, against
a search of the whole gallery on a subset of queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from bench.errors import BenchError
from bench.method import EmbeddingPrediction, stream_seed
from bench.metrics.retrieval import nearest, space_distance

SCORE_DRAW_STREAM = 0x5C0E  # generator offset of the independent Gaussian draws (query set k: + k)
CHUNK_ELEMENTS = 4_000_000  # floats per chunk of gathered candidate draws [S, n, K_c, d]
COVERAGE_QUERIES = 128  # queries on which candidate_coverage checks the candidate sets against the gallery


def score_from_var(var: np.ndarray | torch.Tensor) -> np.ndarray:
    """u [N] = tr(Sigma_q) = sum_j Var[z_qj] from per-dimension variances [N, d] (float64): the total
    variance of the embedding (the seed paper's "variance"); the diagonal suffices.

    Raises BenchError on non-finite or negative variances (a method bug that a silent NaN metric
    would hide).
    """
    v = var.detach().cpu().double().numpy() if isinstance(var, torch.Tensor) else np.asarray(var, np.float64)
    if v.ndim == 1:
        v = v[:, None]
    bad = ~np.isfinite(v).all(axis=-1)
    if bad.any():
        raise BenchError(f"non-finite predicted variance for {int(bad.sum())} of {v.shape[0]} queries")
    if (v < 0).any():
        raise BenchError(f"negative predicted variance (min {float(v.min()):.3g}): a covariance must be PSD")
    return v.sum(axis=-1)


def uncertainty_score(pred: EmbeddingPrediction) -> np.ndarray | None:
    """tr Sigma [N] of a prediction (the `trace` score), or None for a deterministic method (no variance)."""
    return None if pred.var is None else score_from_var(pred.var)


@dataclass(frozen=True)
class ScoreSettings:
    """How scores are computed in a run: the distance of retrieval, K_c (0: the whole gallery), the
    number of independent Gaussian draws for methods without joint samples, and the run seed."""

    distance: str = "euclidean"
    candidates: int = 100
    samples: int = 100
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> "ScoreSettings":
        return cls(distance=cfg.distance, candidates=cfg.score_candidates, samples=cfg.score_samples, seed=cfg.seed)


def gaussian_draws(pred: EmbeddingPrediction, n: int, generator: torch.Generator) -> torch.Tensor:
    """n independent draws [n, N, d] of N(mean_i, cov_i) per item (cov, else diag(var)):
    z = mean + eps L^T with L = V diag(sqrt(max(lambda, 0))) V^T the PSD square root of cov."""
    mean = pred.mean.detach().cpu().float()
    eps = torch.randn((n, *mean.shape), generator=generator)
    if pred.cov is not None:
        lam, vec = torch.linalg.eigh(pred.cov.detach().cpu().double())
        root = (vec * lam.clamp(min=0).sqrt()[..., None, :]) @ vec.transpose(-1, -2)
        return mean + torch.einsum("snj,nij->sni", eps.double(), root).float()
    return mean + eps * pred.var.detach().cpu().float().clamp(min=0).sqrt()


@dataclass
class Candidates:
    """Each query's K_c nearest gallery items under the mean embeddings, nearest first:
    index [N, K_c] (gallery positions), labels [N, K_c] (their labels), dist [N, K_c]."""

    index: torch.Tensor
    labels: torch.Tensor
    dist: torch.Tensor


@dataclass
class CandidateChunk:
    """Draws of a block of queries and of their candidates: rows (query positions), labels [n, K_c],
    zq [S, n, d], zc [S, n, K_c, d] and the sampled distances dist [S, n, K_c] = ||rho(zq) - rho(zc)||."""

    rows: slice
    labels: torch.Tensor
    zq: torch.Tensor
    zc: torch.Tensor
    dist: torch.Tensor


class _GalleryDraws:
    """The gallery's draws, made once per method and shared by every query set."""

    def __init__(self, pred: EmbeddingPrediction, settings: ScoreSettings) -> None:
        self.pred, self.settings = pred, settings
        self._draws: torch.Tensor | None = None

    def get(self) -> torch.Tensor | None:
        if self._draws is None and self.pred.var is not None:
            self._draws = draws_of(self.pred, self.settings, stream=0)
        return self._draws


def draws_of(pred: EmbeddingPrediction, settings: ScoreSettings, stream: int) -> torch.Tensor:
    """The method's joint samples [S, N, d] when it has them, else independent Gaussian draws
    (S = settings.samples) from generator stream SCORE_DRAW_STREAM + `stream` of the run seed."""
    if pred.samples is not None:
        return pred.samples.detach().cpu().float()
    g = torch.Generator().manual_seed(stream_seed(settings.seed, SCORE_DRAW_STREAM + stream))
    return gaussian_draws(pred, settings.samples, g)


@dataclass
class ScoreInputs:
    """Everything a score may use for one query set (see the module docstring): `query` and
    `gallery` predictions (no labels), `candidates` (the only gallery labels a score sees; a query
    is never its own candidate), `leave_one_out` (the queries are the gallery, query i = item i),
    `settings` (distance, K_c, draws) and joint draws through `draws()` / `candidate_chunks()`."""

    query: EmbeddingPrediction
    gallery: EmbeddingPrediction
    candidates: Candidates
    leave_one_out: bool
    settings: ScoreSettings
    _gallery_draws: _GalleryDraws = field(repr=False)
    _stream: int = 0
    _query_draws: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return int(self.query.mean.shape[0])

    @property
    def deterministic(self) -> bool:
        """True when the method has no predictive (no variance, no samples)."""
        return self.query.var is None and self.query.samples is None

    @property
    def joint(self) -> bool:
        """True when the draws are the method's joint samples (not independent Gaussian draws)."""
        return self.query.samples is not None

    def draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query draws [S, N, d], gallery draws [S, G, d]); draw s of both comes from the same
        member / pass / posterior sample when the method has joint samples (under leave-one-out the
        query draws are the gallery draws). BenchError for a deterministic method."""
        if self.deterministic:
            raise BenchError("a predictive score was asked of a deterministic method")
        zg = self._gallery_draws.get()
        if self.leave_one_out:
            return zg, zg
        if self._query_draws is None:
            self._query_draws = draws_of(self.query, self.settings, self._stream)
        zq = self._query_draws
        if zq.shape[0] != zg.shape[0]:
            raise BenchError(f"query set has {zq.shape[0]} joint samples but the gallery {zg.shape[0]}: "
                             "a method must attach the same draws to every query set")
        return zq, zg

    def candidate_chunks(self) -> Iterator[CandidateChunk]:
        """The draws of consecutive blocks of queries and their candidates (bounded memory)."""
        zq_all, zg_all = self.draws()
        idx = self.candidates.index
        S, K, d = zq_all.shape[0], idx.shape[1], zq_all.shape[2]
        step = max(1, CHUNK_ELEMENTS // max(S * K * d, 1))
        for s in range(0, self.n, step):
            rows = slice(s, min(s + step, self.n))
            zq = zq_all[:, rows]
            zc = zg_all[:, idx[rows]]
            dist = space_distance(zq[:, :, None, :], zc, self.settings.distance)
            yield CandidateChunk(rows, self.candidates.labels[rows], zq, zc, dist)


def candidates_for(query: EmbeddingPrediction, gallery: EmbeddingPrediction, gallery_labels: torch.Tensor,
                   leave_one_out: bool, settings: ScoreSettings) -> Candidates:
    """Candidates of every query (K_c = settings.candidates, 0 or more than the gallery: all items)."""
    g = gallery.mean.shape[0] - (1 if leave_one_out else 0)
    k = g if settings.candidates <= 0 else min(settings.candidates, g)
    idx, dist = nearest(query.mean.detach().cpu(), gallery.mean.detach().cpu(), k, settings.distance,
                        exclude_self=leave_one_out)
    return Candidates(idx, gallery_labels.cpu()[idx], dist)


def score_inputs(pred_id: EmbeddingPrediction, pred_ood: dict[str, EmbeddingPrediction], labels_id: torch.Tensor,
                 settings: ScoreSettings) -> tuple[ScoreInputs, dict[str, ScoreInputs]]:
    """ScoreInputs of the ID queries (leave-one-out against the ID test set) and of each OOD set
    (against the whole ID test set), sharing one set of gallery draws. BenchError when a predicted
    variance is non-finite or negative (score_from_var), before any score runs."""
    for p in (pred_id, *pred_ood.values()):
        if p.var is not None:
            score_from_var(p.var)
    shared = _GalleryDraws(pred_id, settings)

    def make(pred: EmbeddingPrediction, loo: bool, stream: int) -> ScoreInputs:
        cand = candidates_for(pred, pred_id, labels_id, loo, settings)
        return ScoreInputs(pred, pred_id, cand, loo, settings, shared, stream)

    return make(pred_id, True, 0), {s: make(p, False, k + 1) for k, (s, p) in enumerate(pred_ood.items())}


def run_score(name: str, inputs: ScoreInputs) -> np.ndarray | None:
    """Score `name` [N] (float64) of one query set, None when it needs a predictive the method lacks.
    BenchError when the score returns the wrong shape or non-finite values (a score or method bug)."""
    from bench.registry import SCORES

    fn = SCORES.get(name)
    if SCORES.meta(name).get("predictive", True) and inputs.deterministic:
        return None
    if inputs.n == 0:
        return np.zeros(0)
    u = np.asarray(fn(inputs), dtype=np.float64)
    if u.shape != (inputs.n,):
        raise BenchError(f"score {name} returned shape {u.shape}, expected ({inputs.n},)")
    if not np.isfinite(u).all():
        raise BenchError(f"score {name}: non-finite value for {int((~np.isfinite(u)).sum())} of {inputs.n} queries")
    return u


def candidate_coverage(inputs: ScoreInputs, max_queries: int = COVERAGE_QUERIES) -> float:
    """Share of (query, draw) pairs whose top-1 over the *whole* gallery is one of the query's
    candidates, on up to `max_queries` evenly spaced queries: how often the candidate-set search of a
    sampled top-1 is exact (1.0 when K_c covers the gallery; NaN without draws)."""
    if inputs.deterministic or inputs.n == 0:
        return float("nan")
    idx = inputs.candidates.index
    g = inputs.gallery.mean.shape[0] - (1 if inputs.leave_one_out else 0)
    if idx.shape[1] >= g:
        return 1.0
    rows = torch.from_numpy(np.unique(np.linspace(0, inputs.n - 1, min(inputs.n, max_queries)).round().astype(np.int64)))
    zq, zg = inputs.draws()
    S, G = zq.shape[0], zg.shape[1]
    hits = 0
    step = max(1, CHUNK_ELEMENTS // max(S * G * zq.shape[2], 1))
    for s in range(0, len(rows), step):
        r = rows[s:s + step]
        d = space_distance(zq[:, r, None, :], zg[:, None, :, :], inputs.settings.distance)  # [S, r, G]
        if inputs.leave_one_out:
            d[:, torch.arange(len(r)), r] = float("inf")
        top = d.argmin(-1)  # [S, r]
        hits += int((top[..., None] == idx[r][None]).any(-1).sum())
    return hits / (len(rows) * S)
