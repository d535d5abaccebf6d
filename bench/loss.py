"""The contrastive loss, in one place: what defines it (`PairLoss`), PML's reference objects, the
distance geometry every loss, curvature and retrieval distance is measured in (`retrieval_space`), the
TripletMarginMiner's emulation (mined triplets and pair multiplicities, without listing pairs), PML's
reducer weights, and the vectorised batch loss the training loop runs. Training (`bench.train`), the
curvature (`bench.la.pairs`, `bench.la.curvature`, online LA) and retrieval (`bench.metrics.retrieval`)
import it, so the objective a net is trained on and the one its Hessian is taken of cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as nnf
from pytorch_metric_learning import distances, losses, miners
from torch import nn

from bench.conventions import DISTANCES
from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.config import RunConfig


@dataclass
class PairLoss:
    """What defines the loss and its pairs: the margins, the miner, the distance and the reduction. The
    functions below take a PairLoss or a `RunConfig` (the same field names; `from_config` copies them)."""

    pos_margin: float = 0.0
    neg_margin: float = 1.0
    miner_margin: float = 0.2
    miner_type: str = "all"
    distance: str = "euclidean"
    reduction: str = "mean"  # mean: the loss as trained (AvgNonZeroReducer); sum: every pair an observation

    @classmethod
    def from_config(cls, cfg) -> PairLoss:
        return cls(cfg.pos_margin, cfg.neg_margin, cfg.miner_margin, cfg.miner_type, cfg.distance)


BatchLoss = Callable[
    [nn.Module, torch.Tensor, torch.Tensor], torch.Tensor
]  # (model, x [B, ...], y [B]) -> loss


# -- geometry ------------------------------------------------------------------------------------------


def retrieval_space(emb: torch.Tensor, distance: str) -> torch.Tensor:
    """Embeddings [..., d] in the space whose Euclidean distances are the run's `distance`:
    euclidean: emb itself; cosine: emb / max(||emb||, 1e-12) (what pytorch-metric-learning's
    LpDistance(normalize_embeddings=True) and its testers do), so ||a - b|| = sqrt(2 - 2 cos(a, b))."""
    if distance == "euclidean":
        return emb
    if distance == "cosine":
        return nnf.normalize(emb, p=2, dim=-1)
    raise BenchError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")


def space_distance(a: torch.Tensor, b: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """||rho(a) - rho(b)|| along the last axis (broadcasting), rho = retrieval_space."""
    return (retrieval_space(a, distance) - retrieval_space(b, distance)).norm(dim=-1)


def pairwise_distances(F: torch.Tensor) -> torch.Tensor:
    """Plain Euclidean distances within each mining batch: F [nb, m, d] -> [nb, m, m]."""
    diff = F[:, :, None, :] - F[:, None, :, :]
    return diff.pow(2).sum(-1).clamp_min(0).sqrt()


# -- the miner and the reducer ------------------------------------------------------------------------

MINER_TYPES = ("all", "hard", "semihard", "easy")


def mined_triplets(
    F: torch.Tensor,
    y: torch.Tensor,
    margin: float,
    miner_type: str = "all",
    valid: torch.Tensor | None = None,
    dist: torch.Tensor | None = None,
) -> torch.Tensor:
    """The triplets a TripletMarginMiner yields, as a mask trip [nb, a, p, n] (bool), per batch.

    F [nb, m, d], y [nb, m]; valid [nb, m] masks padding items; dist [nb, m, m] the distances to
    mine with (default `pairwise_distances(F)`; training passes torch.cdist's, as PML does). A triplet (a, p,
    n) with y_a = y_p,
    a != p, y_a != y_n is mined when t = d_an - d_ap satisfies: all: t <= margin; hard: t <= min(margin, 0);
    semihard: 0 < t <= margin; easy: t > margin (PML's definitions).
    """
    if miner_type not in MINER_TYPES:
        raise BenchError(f"miner_type must be one of {', '.join(MINER_TYPES)}, got {miner_type!r}")
    m = F.shape[1]
    dist = pairwise_distances(F) if dist is None else dist
    same = y[:, :, None] == y[:, None, :]
    pos = same & ~torch.eye(m, dtype=torch.bool, device=F.device)  # [nb, a, p]
    neg = ~same  # [nb, a, n]
    if valid is not None:  # (no mask: the training step, where every operator counts)
        vv = valid[:, :, None] & valid[:, None, :]
        pos, neg = pos & vv, neg & vv
    t = dist[:, :, None, :] - dist[:, :, :, None]  # [nb, a, p, n] = d_an - d_ap
    if miner_type == "easy":
        cond = t > margin
    else:
        cond = t <= margin
        if miner_type == "hard":
            cond &= t <= 0
        elif miner_type == "semihard":
            cond &= t > 0
    return cond & pos[:, :, :, None] & neg[:, :, None, :]


def triplet_pair_counts(trip: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_pos, C_neg) [nb, m, m] of a triplet mask [nb, a, p, n]: C_pos[a, p] = #triplets with that
    (a, p), C_neg[a, n] = #triplets with that (a, n) (the pairs of PML's `convert_to_pairs`)."""
    return trip.sum(3).to(dtype), trip.sum(2).to(dtype)


def mined_pair_counts(
    F: torch.Tensor,
    y: torch.Tensor,
    margin: float,
    miner_type: str = "all",
    valid: torch.Tensor | None = None,
    dist: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How often each ordered pair occurs among the pairs a TripletMarginMiner yields, per batch:
    (C_pos, C_neg) [nb, m, m] of `mined_triplets` (its arguments), exactly the multiplicities of PML's
    `convert_to_pairs` without listing the triplets.

    Only the k positives of each anchor can start a triplet (k = the most any anchor has, about m / classes),
    so the triplet test runs on [nb, a, k, n] instead of `mined_triplets`' [nb, a, p, n]: the positives'
    distances gathered, the same difference d_an - d_ap compared with the same margin, so the counts are
    `mined_triplets`' exactly (tested); at batch 64 over 7 classes it is ~4x fewer elements (most of a
    training step's mining, and of an ensemble's, whose members mine at once)."""
    if miner_type not in MINER_TYPES:
        raise BenchError(f"miner_type must be one of {', '.join(MINER_TYPES)}, got {miner_type!r}")
    nb, m = F.shape[0], F.shape[1]
    dist = pairwise_distances(F) if dist is None else dist
    same = y[:, :, None] == y[:, None, :]
    pos = same & ~torch.eye(m, dtype=torch.bool, device=F.device)  # [nb, a, p]
    neg = ~same  # [nb, a, n]
    if valid is not None:
        vv = valid[:, :, None] & valid[:, None, :]
        pos, neg = pos & vv, neg & vv
    k = int(pos.sum(2).max()) if pos.numel() else 0
    zeros = torch.zeros(nb, m, m, dtype=F.dtype, device=F.device)
    if k == 0:
        return zeros, zeros.clone()
    # each anchor's positives first, in item order, then padding: the k smallest of a key that puts
    # positives (their item index) before the rest (m + item index); a partial sort, ~3x faster than a
    # stable sort of the [nb, a, p] mask on CPU, the same indices (keys are distinct)
    items = torch.arange(m, device=F.device)
    pidx = torch.topk(torch.where(pos, items, items + m), k, dim=2, largest=False, sorted=True).indices
    # masked pairs get distances that make d_an - d_ap infinite and fail the test: +inf for `t <= ...`
    # (padding positives -inf, non-negatives +inf), -inf for the easy miner's `t > margin`; the others'
    # differences are the same numbers as `mined_triplets`'
    big = float("-inf") if miner_type == "easy" else float("inf")
    d_ap = torch.gather(dist, 2, pidx).masked_fill(~torch.gather(pos, 2, pidx), -big)  # [nb, a, k]
    d_an = dist.masked_fill(~neg, big)  # [nb, a, n]
    t = d_an[:, :, None, :] - d_ap[:, :, :, None]  # [nb, a, k, n] = d_an - d_ap
    # the test written in place as 0/1 floats (a comparison into a bool tensor, then a cast, took ~6x as
    # long on CPU: the ensemble's mining); hard: t <= margin and t <= 0 is t <= min(margin, 0)
    if miner_type == "easy":
        trip = t.gt_(margin)
    elif miner_type == "hard":
        trip = t.le_(min(margin, 0.0))
    elif miner_type == "semihard":
        above = t > 0
        trip = t.le_(margin).mul_(above)
    else:
        trip = t.le_(margin)
    C_pos = zeros.scatter_add_(2, pidx, trip.sum(3))  # padding adds 0
    return C_pos, trip.sum(2)


def reducer_weights(
    C_pos: torch.Tensor,
    C_neg: torch.Tensor,
    dist: torch.Tensor,
    pos_margin: float,
    neg_margin: float,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (W_pos, W_neg) [nb, m, m] of the ordered pairs in PML's reduced batch loss, from the
    mined multiplicities C and the distances: an active pair (a, b) of kind k (positive: d > m_pos,
    negative: d < m_neg) carries count_ab / n_active_k, where n_active_k counts the active pairs of
    kind k with multiplicity (reduction "mean": AvgNonZeroReducer, as trained), or count_ab
    (reduction "sum": SumReducer, every pair an observation, `bench.la.likelihood`); inactive pairs 0.
    PML returns a zero loss when the miner yields at most one triplet (GenericPairLoss), so such a
    batch has all weights 0."""
    if reduction not in ("mean", "sum"):
        raise BenchError(f"reduction must be mean or sum, got {reduction!r}")
    # (the counts are >= 0, so masking by activity alone keeps C = 0 where nothing was mined; and where
    # n_k = 0 every C of the batch is 0, so C / max(n_k, 1) is 0 there without a torch.where)
    enough = C_pos.sum((1, 2), keepdim=True) > 1  # number of mined triplets per batch
    C_pos = C_pos * ((dist - pos_margin > 0) & enough)
    C_neg = C_neg * ((neg_margin - dist > 0) & enough)
    if reduction == "sum":
        return C_pos, C_neg
    return C_pos / C_pos.sum((1, 2), keepdim=True).clamp_min(1), C_neg / C_neg.sum(
        (1, 2), keepdim=True
    ).clamp_min(1)


# -- the loss -----------------------------------------------------------------------------------------


def make_loss_and_miner(
    cfg: PairLoss | RunConfig,
) -> tuple[losses.ContrastiveLoss, miners.TripletMarginMiner]:
    """ContrastiveLoss and TripletMarginMiner on LpDistance(p=2, power=1): plain Euclidean distances
    for distance=euclidean (2-d embeddings are not squashed onto a circle), distances between
    L2-normalised embeddings (PML's default LpDistance) for cosine; the miner's triplets become the
    loss's pairs."""
    dist = distances.LpDistance(normalize_embeddings=cfg.distance == "cosine", p=2, power=1)
    loss = losses.ContrastiveLoss(pos_margin=cfg.pos_margin, neg_margin=cfg.neg_margin, distance=dist)
    miner = miners.TripletMarginMiner(margin=cfg.miner_margin, type_of_triplets=cfg.miner_type, distance=dist)
    return loss, miner


def batched_contrastive_loss(F: torch.Tensor, y: torch.Tensor, cfg: PairLoss | RunConfig) -> torch.Tensor:
    """Per-batch losses [nb] of embeddings F [nb, m, d] with labels y [nb, m]: PML's ContrastiveLoss
    (cfg.distance, AvgNonZeroReducer) on the pairs of its TripletMarginMiner, computed as sum over
    pairs of reducer weight x pair loss without listing pairs (this module); equal to
    `make_loss_and_miner`'s loss and gradients on the same batch up to float rounding (tested)."""
    return contrastive_loss_and_counts(F, y, cfg)[0]


def contrastive_loss_and_counts(
    F: torch.Tensor, y: torch.Tensor, cfg: PairLoss | RunConfig
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`batched_contrastive_loss` and the mined pair multiplicities (C_pos, C_neg) [nb, m, m] it used
    (`mined_pair_counts`), so the loss's curvature can reuse its pairs."""
    dist, (W_pos, W_neg), counts = mined_pair_weights(F, y, cfg)
    return weighted_pair_loss(dist, W_pos, W_neg, cfg), counts


def mined_pair_weights(
    F: torch.Tensor, y: torch.Tensor, cfg: PairLoss | RunConfig
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The mining half of the loss: (dist [nb, m, m] with grad, (W_pos, W_neg), (C_pos, C_neg)), the
    distances in cfg.distance's geometry, the reducer weights and mined multiplicities (no grad)."""
    G = retrieval_space(F, cfg.distance)  # cosine: normalised as PML's LpDistance normalises
    dist = torch.cdist(G, G)  # what PML's LpDistance computes, so the mined set is the same
    with torch.no_grad():
        C_pos, C_neg = mined_pair_counts(F, y, cfg.miner_margin, cfg.miner_type, dist=dist)
        W = reducer_weights(C_pos, C_neg, dist, cfg.pos_margin, cfg.neg_margin)
    return dist, W, (C_pos, C_neg)


def weighted_pair_loss(
    dist: torch.Tensor, W_pos: torch.Tensor, W_neg: torch.Tensor, cfg: PairLoss | RunConfig
) -> torch.Tensor:
    """The loss half: sum_ab W_pos relu(d_ab - m_pos) + W_neg relu(m_neg - d_ab) per batch [nb]."""
    pos = (W_pos * torch.relu(dist - cfg.pos_margin)).sum((1, 2))
    neg = (W_neg * torch.relu(cfg.neg_margin - dist)).sum((1, 2))
    return pos + neg


def contrastive_loss(cfg: PairLoss | RunConfig) -> BatchLoss:
    """The shared objective on one batch (see `batched_contrastive_loss`)."""

    def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return batched_contrastive_loss(model(x)[None], y[None], cfg)[0]

    return batch_loss
