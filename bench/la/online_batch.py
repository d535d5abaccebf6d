"""One mining batch's contrastive curvature at an accumulator's current weights (an online training step):
the post-hoc family's mining, pair Hessians, PSD clamp and accumulator on one batch, with LAM's cap on
the number of Hessian pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.la.curvature import Accumulator, Chunk, Curvature
from bench.la.online_heads import DiagonalPairs
from bench.la.pairs import PairCurvature, contrastive_pair_curvature
from bench.loss import PairLoss, mined_triplets, pairwise_distances, retrieval_space, triplet_pair_counts


def cap_triplets(trip: torch.Tensor, cap: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """At most cap // 2 triplets per batch of a mask [nb, a, p, n] (each gives one positive and one negative
    Hessian pair): a uniform random subset, drawn from `generator` only when more were mined."""
    if cap is None:
        return trip
    k = max(1, cap // 2)
    if int(trip.flatten(1).sum(1).max()) <= k:
        return trip
    flat = trip.flatten(1)
    out = torch.zeros_like(flat)
    gen_device = generator.device if generator is not None else "cpu"
    for b in range(
        flat.shape[0]
    ):  # a random k of the mined positions (randperm: no key per possible triplet)
        pos = flat[b].nonzero().squeeze(1)
        if pos.numel() > k:
            pos = pos[torch.randperm(pos.numel(), generator=generator, device=gen_device)[:k].to(pos.device)]
        out[b, pos] = True
    return out.view_as(trip)


@dataclass
class BatchCurvature:
    """The curvature of one mining batch, its mined pairs (None for jtj) and their multiplicities."""

    curvature: Curvature
    pair_curvature: PairCurvature | None = None
    counts: tuple[torch.Tensor, torch.Tensor] | None = None  # (C_pos, C_neg) [1, m, m] of the kept triplets

    @property
    def pairs(self) -> float:
        """P: the Hessian pairs used, 2 per kept triplet (each C_pos entry counts its triplets); 0 for jtj."""
        return 2.0 * float(self.counts[0].sum()) if self.counts is not None else 0.0

    @property
    def pos_active(self) -> float:
        """n_pos: the active positive pairs with multiplicity (the reducer's normaliser); 0 for jtj."""
        if self.counts is None:
            return 0.0
        return float((self.counts[0] * (self.pair_curvature.W_pos > 0)).sum())

    def output_traces(self) -> tuple[float, float]:
        """Output-space curvature (kept, dropped by the PSD clamp) of the batch; zeros for jtj."""
        return self.pair_curvature.output_traces() if self.pair_curvature is not None else (0.0, 0.0)


def batch_curvature(
    acc: Accumulator,
    inputs: torch.Tensor,
    y: torch.Tensor,
    loss: PairLoss,
    hessian: str = "ggn",
    pair_cap: int | None = None,
    generator: torch.Generator | None = None,
    counts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BatchCurvature:
    """The contrastive GGN (hessian=ggn) or JtJ of the accumulator's model on one mining batch (inputs
    [m, ...], y [m]), at the model's current weights: what the post-hoc `accumulate` adds for that batch
    (same mining, pair Hessians, PSD clamp and accumulator), with the mined triplets capped
    (`cap_triplets`) at pair_cap Hessian pairs. counts: the batch's mined multiplicities (C_pos, C_neg)
    [1, m, m] at these weights when the caller has them (the training loss's own pairs); they are used
    as they are when within the cap, else the triplets are mined here and capped."""
    f, J = acc.jacobian(inputs)
    valid = torch.ones(1, len(y), dtype=torch.bool, device=acc.device)
    pairs = None
    with torch.no_grad():
        if hessian == "ggn":
            F, yb = f[None].to(acc.dtype), y[None].to(acc.device)
            k = None if pair_cap is None else max(1, pair_cap // 2)
            if counts is None or (k is not None and float(counts[0].sum()) > k):
                G = retrieval_space(F, loss.distance)  # mined on the loss's distances
                trip = mined_triplets(G, yb, loss.miner_margin, loss.miner_type, dist=pairwise_distances(G))
                counts = triplet_pair_counts(cap_triplets(trip, pair_cap, generator), F.dtype)
            counts = (counts[0].to(F.dtype), counts[1].to(F.dtype))
            if getattr(acc, "diagonal_blocks", False) and loss.distance == "euclidean":
                pairs = DiagonalPairs.of(F, counts, loss)
            else:
                pairs = contrastive_pair_curvature(
                    F,
                    yb,
                    pos_margin=loss.pos_margin,
                    neg_margin=loss.neg_margin,
                    miner_margin=loss.miner_margin,
                    miner_type=loss.miner_type,
                    distance=loss.distance,
                    counts=counts,
                )
        acc.add(Chunk(J, valid, pairs))
    return BatchCurvature(acc.result(), pairs, counts if pairs is not None else None)
