"""What an uncertainty score sees, and the loop that computes every score of a method.

A score (a plugin in bench/scores/, `@register_score`) maps one query set to one number per query,
larger = more uncertain. It receives a `ScoreInputs`: the queries' prediction (mean, var, cov,
samples as the method gave them), the gallery's prediction (the ID test set), each query's nearest
gallery items under the mean embeddings (`neighbours`, with their labels), joint draws of queries
and gallery, the retrieval under each draw (`sampled()`: the k nearest gallery items per draw, with
their labels) and the run's distance. The query's own label is not in it: gallery labels reach a
score only with retrieved items, and under leave-one-out (the queries are the gallery) a query never
retrieves itself. That is the whole contract; the query's true class is used only by the
evaluation's confound diagnostics, never by a score.

Draws. When the method attaches joint samples (`EmbeddingPrediction.samples` [S, N, d]: the same S
members / passes / posterior draws for every query set) they are the draws, so query and gallery
items are jointly distributed as the method says. Otherwise (PFE, HIB, BTL: a Gaussian per item)
the draws are independent Gaussian draws z = mean + L eps, L L^T = cov (or sqrt(var) per
dimension), S = `score_samples`, from a torch.Generator seeded from the run seed: independent
draws *are* those methods' predictive. Deterministic methods have no draws.

Sampled retrieval: under every draw s the whole gallery is searched (`score_candidates = 0`, the
default: exact, S kNN searches per query set). For large galleries `score_candidates = K_c > 0`
searches only each query's K_c nearest items under the mean embeddings, an approximation that is
exact whenever the item retrieved under draw s is one of them; `candidate_coverage` measures how
often that holds (a whole-gallery search on a subset of queries). It can be far from 1: on the
default preset with K_c = 100 of 2000, only 10-40% of the Laplace / dropout / PFE / BTL draws
retrieved a candidate (their predictive moves a query past many neighbours).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.errors import BenchError
from bench.loss import space_distance
from bench.method import EmbeddingPrediction, stream_seed
from bench.metrics.retrieval import nearest

SCORE_DRAW_STREAM = 0x5C0E  # generator offset of the independent Gaussian draws (query set k: + k)
CHUNK_ELEMENTS = 4_000_000  # floats per chunk of gathered candidate draws [S, n, K_c, d]
SAMPLED_K = 10  # items retrieved per draw by ScoreInputs.sampled() (scores slice the first k)
NEIGHBOURS = 10  # nearest gallery items under the mean in ScoreInputs.neighbours (at least; K_c when larger)
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
    candidates: int = 0
    samples: int = 100
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> "ScoreSettings":
        return cls(
            distance=cfg.distance, candidates=cfg.score_candidates, samples=cfg.score_samples, seed=cfg.seed
        )


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
class Retrieval:
    """Retrieved gallery items, nearest first: index (gallery positions), labels (theirs) and dist,
    each [N, k] (under the mean embeddings) or [S, N, k] (under each draw)."""

    index: torch.Tensor
    labels: torch.Tensor
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
    `gallery` predictions (no labels), `neighbours` (each query's max(NEIGHBOURS, K_c) nearest gallery
    items under the mean embeddings, with labels; a query is never its own neighbour),
    `leave_one_out` (the queries are the gallery, query i = item i), `settings` (distance, K_c,
    draws), joint draws through `draws()` and the retrieval under each draw through `sampled()`.
    Labels of retrieved items come from `_labels_of`, a function the framework closes over the
    gallery labels: a score gets labels only of what was retrieved."""

    query: EmbeddingPrediction
    gallery: EmbeddingPrediction
    neighbours: Retrieval
    leave_one_out: bool
    settings: ScoreSettings
    _gallery_draws: _GalleryDraws = field(repr=False)
    _labels_of: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    _stream: int = 0
    _query_draws: torch.Tensor | None = field(default=None, repr=False)
    _sampled: Retrieval | None = field(default=None, repr=False)

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
            raise BenchError(
                f"query set has {zq.shape[0]} joint samples but the gallery {zg.shape[0]}: "
                "a method must attach the same draws to every query set"
            )
        return zq, zg

    def sampled(self) -> Retrieval:
        """The retrieval under every draw s: the SAMPLED_K nearest gallery items of each query under
        d(z_q^s, z_g^s) (query and gallery drawn jointly), index / labels / dist [S, N, k], nearest
        first, a query never retrieving itself. The whole gallery is searched when K_c = 0, else each
        query's K_c nearest items under the mean (see the module docstring). Computed once."""
        if self._sampled is None:
            zq, zg = self.draws()
            k = min(SAMPLED_K, self.neighbours.index.shape[1])
            if self.settings.candidates > 0:
                k = min(k, self.settings.candidates)
                idx, dist = self._search_candidates(zq, zg, k)
            else:
                found = [
                    nearest(zq[s], zg[s], k, self.settings.distance, exclude_self=self.leave_one_out)
                    for s in range(zq.shape[0])
                ]
                idx, dist = torch.stack([f[0] for f in found]), torch.stack([f[1] for f in found])
            self._sampled = Retrieval(idx, self._labels_of(idx), dist)
        return self._sampled

    def _search_candidates(
        self, zq: torch.Tensor, zg: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per draw, the k nearest of each query's K_c candidates (the first K_c mean neighbours)."""
        cand = self.neighbours.index[:, : self.settings.candidates]
        S, K, d = zq.shape[0], cand.shape[1], zq.shape[2]
        idx = torch.empty(S, self.n, k, dtype=torch.long)
        dist = torch.empty(S, self.n, k)
        step = max(1, CHUNK_ELEMENTS // max(S * K * d, 1))
        for s in range(0, self.n, step):
            rows = slice(s, min(s + step, self.n))
            dd = space_distance(
                zq[:, rows, None, :], zg[:, cand[rows]], self.settings.distance
            )  # [S, n, K_c]
            top = dd.topk(k, dim=-1, largest=False, sorted=True)
            idx[:, rows] = torch.gather(cand[rows].expand(S, *cand[rows].shape), 2, top.indices)
            dist[:, rows] = top.values
        return idx, dist


def neighbours_for(
    query: EmbeddingPrediction,
    gallery: EmbeddingPrediction,
    labels_of: Callable,
    leave_one_out: bool,
    settings: ScoreSettings,
) -> Retrieval:
    """Each query's max(NEIGHBOURS, K_c) nearest gallery items under the mean embeddings."""
    idx, dist = nearest(
        query.mean.detach().cpu(),
        gallery.mean.detach().cpu(),
        max(NEIGHBOURS, settings.candidates),
        settings.distance,
        exclude_self=leave_one_out,
    )
    return Retrieval(idx, labels_of(idx), dist)


def score_inputs(
    pred_id: EmbeddingPrediction,
    pred_ood: dict[str, EmbeddingPrediction],
    labels_id: torch.Tensor,
    settings: ScoreSettings,
) -> tuple[ScoreInputs, dict[str, ScoreInputs]]:
    """ScoreInputs of the ID queries (leave-one-out against the ID test set) and of each OOD set
    (against the whole ID test set), sharing one set of gallery draws. BenchError when a predicted
    variance is non-finite or negative (score_from_var), before any score runs."""
    for p in (pred_id, *pred_ood.values()):
        if p.var is not None:
            score_from_var(p.var)
    shared = _GalleryDraws(pred_id, settings)
    labels = labels_id.detach().cpu().clone()
    labels_of = labels.__getitem__  # labels of retrieved gallery items only (a query never retrieves itself)

    def make(pred: EmbeddingPrediction, loo: bool, stream: int) -> ScoreInputs:
        return ScoreInputs(
            pred,
            pred_id,
            neighbours_for(pred, pred_id, labels_of, loo, settings),
            loo,
            settings,
            shared,
            labels_of,
            stream,
        )

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
        raise BenchError(
            f"score {name}: non-finite value for {int((~np.isfinite(u)).sum())} of {inputs.n} queries"
        )
    return u


def candidate_coverage(inputs: ScoreInputs, max_queries: int = COVERAGE_QUERIES) -> float:
    """Share of (query, draw) pairs whose top-1 over the *whole* gallery is one of the query's K_c
    candidates, on up to `max_queries` evenly spaced queries: how often the candidate search of a
    sampled retrieval is exact (1.0 when the whole gallery is searched; NaN without draws)."""
    if inputs.deterministic or inputs.n == 0:
        return float("nan")
    g = inputs.gallery.mean.shape[0] - (1 if inputs.leave_one_out else 0)
    K = inputs.settings.candidates
    if K <= 0 or K >= g:
        return 1.0
    idx = inputs.neighbours.index[:, :K]
    rows = torch.from_numpy(
        np.unique(np.linspace(0, inputs.n - 1, min(inputs.n, max_queries)).round().astype(np.int64))
    )
    zq, zg = inputs.draws()
    S, G = zq.shape[0], zg.shape[1]
    hits = 0
    step = max(1, CHUNK_ELEMENTS // max(S * G * zq.shape[2], 1))
    for s in range(0, len(rows), step):
        r = rows[s : s + step]
        d = space_distance(zq[:, r, None, :], zg[:, None, :, :], inputs.settings.distance)  # [S, r, G]
        if inputs.leave_one_out:
            d[:, torch.arange(len(r)), r] = float("inf")
        top = d.argmin(-1)  # [S, r]
        hits += int((top[..., None] == idx[r][None]).any(-1).sum())
    return hits / (len(rows) * S)
