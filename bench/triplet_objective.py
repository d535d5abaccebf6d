"""The one objective `recipe=tuned` maximises for every method (`bench.tuning`): the validation
log-likelihood of triplet orderings under the method's predictive.

For validation items cut into seeded groups of GROUP items, every (anchor a, positive p, negative n) within
a group (y_a = y_p, a != p, y_n != y_a) contributes log P(d(a, p) < d(a, n)), the probability that the
predictive orders the triplet as retrieval should. P is estimated from the draws the harness's scores use
(`bench.metrics.uncertainty.draws_of`): the method's joint samples when it has them, else S = score_samples
independent Gaussian draws of its per-item moments from a seeded generator (common random numbers: a
deterministic function of the prediction). With `hits` of S draws ordering the triplet right,
P = (hits + 1/2) / (S + 1) (Krichevsky-Trofimov: a triplet the predictive calls impossible costs
log(1 / (2 S + 2)), not -inf). A deterministic method (no variance) has one draw, its mean: P is 3/4 or 1/4,
a step function of the ordering (reported for reference; it has nothing to tune).

Why this one (docs/tuning.md): it is a proper score of what the predictive says about retrieval, so it
rewards a correct ordering and a spread that matches the errors: a predictive too narrow pays the floor on
each misordered triplet, one too wide drifts every triplet towards log(1/2). It needs no OOD data and no
test items, only labelled validation items of the training classes, and it is the same formula for a
Laplace posterior, an ensemble, dropout or a per-item Gaussian. It extends `bench.la.prior.triplet_log_score`
(the Laplace family's own search) from a joint Gaussian to any method's draws.
"""

from __future__ import annotations

import math

import torch

from bench.errors import BenchError
from bench.la.prior import item_groups, triplet_mask
from bench.loss import retrieval_space
from bench.method import EmbeddingPrediction, stream_seed
from bench.metrics.uncertainty import ScoreSettings, draws_of

NAME = "val_triplet_loglik"
GROUP = 16  # validation items per group: every triplet within a group is scored
GROUP_STREAM = 0x7A1  # generator offset of the groups' permutation (of the run seed)
DRAW_STREAM = 0x7A2  # offset (added to SCORE_DRAW_STREAM) of the Gaussian draws of methods without samples
DRAW_CHUNK = 32  # draws per chunk (bounds the [s, groups, m, m] distance tensor)


def groups_of(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups [G, m] item indices, triplet mask [G, m, m, m]) of validation labels [N], seeded by `seed`."""
    g = torch.Generator().manual_seed(stream_seed(seed, GROUP_STREAM))
    groups = item_groups(len(labels), GROUP, g)
    return groups, triplet_mask(labels[groups])


def ordering_hits(
    draws: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, distance: str
) -> torch.Tensor:
    """[T] number of draws (of draws [S, N, d]) in which each triplet of `mask` has d(a, p) < d(a, n)
    (triplets in `torch.nonzero(mask)` order; distances as retrieval measures them)."""
    b, a, p, n = torch.nonzero(mask, as_tuple=True)
    m = groups.shape[1]
    ap, an = (b * m + a) * m + p, (b * m + a) * m + n  # into the flattened [G, m, m] distances
    hits = torch.zeros(len(b), dtype=torch.int64)
    for s0 in range(0, draws.shape[0], DRAW_CHUNK):
        e = retrieval_space(draws[s0 : s0 + DRAW_CHUNK, groups].double(), distance)  # [s, G, m, d]
        sq = (e[..., :, None, :] - e[..., None, :, :]).pow(2).sum(-1).reshape(e.shape[0], -1)
        hits += (sq.index_select(1, ap) < sq.index_select(1, an)).sum(0)
    return hits


def triplet_loglik(
    pred: EmbeddingPrediction, labels: torch.Tensor, distance: str, samples: int, seed: int
) -> float:
    """The objective (module docstring) of the prediction `pred` of N validation items with labels [N]:
    mean over the triplets of log((hits + 1/2) / (S + 1)). BenchError when no group holds a triplet."""
    groups, mask = groups_of(labels.cpu(), seed)
    if not bool(mask.any()):
        raise BenchError(
            f"the validation split ({len(labels)} items) has no triplet (anchor, positive, negative) "
            f"within a group of {GROUP}: set a larger val_items"
        )
    if pred.var is None and pred.samples is None:  # deterministic: the mean is the only draw
        draws = pred.mean.detach().cpu().float()[None]
    else:
        settings = ScoreSettings(distance=distance, samples=samples, seed=seed)
        draws = draws_of(pred, settings, stream=DRAW_STREAM)
    hits = ordering_hits(draws, groups, mask, distance).double()
    S = draws.shape[0]
    value = float(torch.log((hits + 0.5) / (S + 1)).mean())
    if not math.isfinite(value):
        raise BenchError(f"{NAME} is not finite ({value}): the predictive has non-finite draws")
    return value
