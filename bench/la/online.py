"""Online Laplace: a Gaussian posterior over a parameter subset kept up to date while the net trains, the
net trained at posterior samples (Warburg et al. 2023, "Bayesian Metric Learning for Uncertainty
Quantification in Image Retrieval" (LAM); the prior precision re-tuned by the Laplace evidence during
training as in Immer et al. 2021, "Scalable Marginal Likelihood Estimation for Model Selection in Deep
Learning").

One training step on a batch b, with mu the subset's current weights, H the running curvature and delta
the prior precision (`methods.online_la.OnlineStep`; steps 4-5 here, `OnlineCurvature`):
  1. the current posterior N(mu, (H + delta I)^-1) of the structure, one of the post-hoc family's
     classes (`bench.la.posterior`; diag: sigma = 1 / sqrt(H + delta));
  2. S = train_samples draws theta_s = mu + eps_s from it (eps_s detached);
  3. loss = 1/S sum_s L_b(theta_s), the shared contrastive batch loss; its gradient flows to mu
     (d theta_s / d mu = I) and, by plain backpropagation, to the rest of the net;
  4. h_b = 1/S sum_s c_s GGN_b(theta_s): the batch's contrastive GGN at each sample, on the subset's
     detached inputs (the head's features), mined, PSD-clamped and accumulated by the post-hoc code
     (`bench.la.pairs`, the `bench.la.curvature` accumulators: `batch_curvature`);
  5. S_t = m S_{t-1} + h_b and Z_t = m Z_{t-1} + 1 with m the memory factor (`OnlineState`);
and at the end of every E-th epoch delta <- the maximiser of the Laplace evidence at (mu, H)
(`marglik_prior`: `bench.la.prior.optimize_marglik`, the post-hoc family's marglik), once more after
training at the trained weights (the final posterior's delta).

The curvature h_b is PSD by construction (each pair's Hessian clamped to its PSD part, as post hoc),
so LAM's relu(h) is a no-op here.

Scaling of H (what H is the curvature of):
  gibbs (default): the training objective read as a Gibbs likelihood p(D | theta) = exp(-sum_b L_b(theta))
    over the n_b mining batches of an epoch, the likelihood of the post-hoc family's GGN and marglik
    (`bench.la.prior.log_marglik`). Its data-term GGN is sum_b GGN_b, so one batch's GGN times n_b is an
    unbiased estimate of it (batches drawn uniformly), and the online H is n_b times the bias-corrected
    running mean of the batch GGNs:
        H_t = n_b S_t / Z_t = n_b sum_u m^(t-u) h_u / sum_u m^(t-u)      (H = 0 before the first step).
    With m = 1 and weights held fixed, H after one epoch is exactly the post-hoc GGN of the same batches;
    with m < 1 it is a recency-weighted mean over about 1 / (1 - m) steps.
  lam (reproduction of LAM): H_t = m H_{t-1} + h_sum N^2 / P, H_0 = N, with N the training set size, P the
    number of Hessian pairs of the batch (2 per mined triplet, after the cap) and h_sum the GGN summed
    over pairs. LAM sums its Hessian over the pairs; ours is of the reduced loss, the mean over the
    n_pos active positive pairs (the only ones the PSD part keeps), so h_sum = n_pos h_b. Not derived
    from the loss: in the steady state H ~ N^2 h_sum / (P (1 - m)).

Kronecker factors are kept the KFAC way: S_G as S above (scaled), the input factor A as the running mean
S_A / Z (the identity before the first step).
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import nn

from bench.errors import BenchError, require
from bench.la import jacobians as jac
from bench.la.curvature import (Accumulator, Chunk, Curvature, DiagGGN, KronFactor, KronGGN, LastLayerGGN,
                                scale_curvature)
from bench.la.pairs import DIST_FLOOR, PairCurvature, contrastive_pair_curvature
from bench.la.posterior import Posterior
from bench.la.prior import optimize_marglik
from bench.la.structures import get_structure
from bench.la.subsets import last_linear, subset_modules
from bench.loss import (PairLoss, mined_triplets, pairwise_distances, reducer_weights, retrieval_space,
                        triplet_pair_counts)
from bench.timing import sync

STRUCTURES = ("diag", "kron", "last_layer")
SUBSETS = ("head", "all")
SCALINGS = ("gibbs", "lam")
STAGE_NAMES = ("hessian", "prior")  # the parts of the training time the state measures (OnlineState.seconds)


@dataclass(frozen=True)
class OnlineSettings:
    """What determines an online-Laplace training run besides the shared training config."""

    structure: str = "diag"  # diag | kron | last_layer (full GGN over the last Linear layer)
    subset: str = "head"  # head | all: the Bayesian parameters (the rest are trained by plain gradients)
    train_samples: int = 1  # posterior draws per step
    memory: float = 0.999  # m in S_t = m S_{t-1} + h_t
    scaling: str = "gibbs"  # gibbs | lam
    prior: float = 1.0  # prior precision: fixed, or the start of the marglik re-tuning
    marglik_every: int = 1  # epochs between marglik re-tunings of the prior precision (0: fixed)
    pair_cap: int = 0  # most Hessian pairs per batch, 0: all (LAM: 5000)
    hessian: str = "ggn"  # ggn | jtj (the seed's identity output Hessian)
    dtype: str = "float32"  # dtype of the running curvature
    distance: str = "euclidean"  # the training loss's (euclidean | cosine)

    def check(self) -> None:
        """BenchError (one line) for values or combinations that cannot run."""
        require(self.structure in STRUCTURES, f"online_structure must be one of {', '.join(STRUCTURES)}, got {self.structure!r}")
        require(self.subset in SUBSETS, f"online_subset must be one of {', '.join(SUBSETS)}, got {self.subset!r}")
        require(self.scaling in SCALINGS, f"online_scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        require(0.0 < self.memory <= 1.0, f"online_memory must be in (0, 1], got {self.memory}")
        require(self.prior > 0 and math.isfinite(self.prior), f"online_prior must be a positive number, got {self.prior}")
        require(self.structure != "last_layer" or self.subset == "head",
                "online_structure=last_layer is the full GGN over the last layer: use online_subset=head")
        require(self.structure != "kron" or self.subset == "head",
                "online_structure=kron over all layers samples through an eigendecomposition of every layer's "
                "factors each step (about 40x a plain step on the paper net): use online_subset=head or diag")
        require(self.scaling != "lam" or self.hessian == "ggn",
                "online_scaling=lam counts Hessian pairs: it needs hessian=ggn")
        require(self.structure != "kron" or self.hessian != "ggn" or self.distance == "euclidean",
                "online_structure=kron: the Kronecker GGN needs distance=euclidean (a pair loss of f_a - f_b); "
                "with distance=cosine use diag or last_layer, or hessian=jtj")

    def options(self) -> dict:
        return asdict(self)


def head_module(model: nn.Module) -> nn.Module:
    """The head of an embedding net, as la_subset=head takes it (`bench.la.subsets`): `model.head` when the
    backbone defines one (the CNN backbones), else its last nn.Linear (the MLP's output layer). The
    embedding must be the head's output (`subset_inputs` checks it)."""
    (head,) = subset_modules(model, "head")
    return head


def bayesian_module(model: nn.Module, subset: str) -> nn.Module:
    """The module whose parameters the posterior covers: the head, or the whole net (subset all)."""
    return head_module(model) if subset == "head" else model


@contextmanager
def _captured_calls(module: nn.Module) -> Iterator[list]:
    store: list = []
    handle = module.register_forward_hook(lambda mod, inp, out: store.append((inp[0], out)))
    try:
        yield store
    finally:
        handle.remove()


def subset_inputs(model: nn.Module, subset: str, x: torch.Tensor, check: bool = False) -> torch.Tensor:
    """The input of the Bayesian module for items x: the head's features (one forward of the net; they
    carry the backbone's gradient when grad is on), or x itself for subset all. check: BenchError unless
    the net's output is the head's (online LA samples the head on these features)."""
    if subset == "all":
        return x
    with _captured_calls(head_module(model)) as store:
        f = model(x)
    if len(store) != 1 or (check and not torch.equal(store[0][1], f)):
        raise BenchError("online_la: the embedding must be the head's output, the head run once per forward pass; "
                         "use --set online_subset=all for this backbone")
    return store[0][0]


class _LinearHeadDiagGGN(DiagGGN):
    """diag GGN of a head that is one nn.Linear, on its closed-form Jacobian [I_d (x) phi^T, I_d]."""

    subset = "last_layer"


class _LinearHeadFullGGN(_LinearHeadDiagGGN):
    """Full H [D, D] of a head that is one nn.Linear (LastLayerGGN's matrix, one batch at a time): the same
    rows M, H += M^T M by one small product (no BLAS buffer and free-memory probe per step)."""

    structure = "last_layer"

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        super().__init__(model, dtype)
        self.H = torch.zeros(self.D, self.D, dtype=self.dtype, device=self.device)

    def add_rows(self, M: torch.Tensor) -> None:
        self.H += M.T @ M


class _LinearHeadKronGGN(KronGGN):
    """KronGGN of a head that is one nn.Linear on its closed-form layer quantities, one location:
    U = [phi, 1] (1 with a bias), B = I_d (what `jac.layer_quantities` finds with d backward passes)."""

    def jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        with torch.no_grad():
            f = self.model(x)
        n, d = f.shape
        U = torch.cat([x, torch.ones_like(x[:, :1])], dim=1) if last_linear(self.model).bias is not None else x
        return f, [(U[:, None], torch.eye(d, dtype=f.dtype, device=f.device).expand(n, 1, d, d))]


class _LinearHeadPairDiag(_LinearHeadDiagGGN):
    """The diagonal of `_LinearHeadDiagGGN` for the Euclidean GGN, without Jacobian rows: for a head
    f = W phi + b, J_a - J_b = I_d (x) (phi_a - phi_b, 0)^T, so a pair (a, b) with reducer weight w and
    PSD block A (`bench.la.pairs`; the block Laplacian's term w (e_a - e_b)(e_a - e_b)^T (x) A) adds
    w A (x) dphi dphi^T to the weight block and nothing to the bias:
        H_W[o, i] += sum_ab w_ab A_ab[o, o] (phi_a,i - phi_b,i)^2.
    The same numbers as the rows M = V^T J (tested), in a few tensor ops per step."""

    diagonal_blocks = True  # batch_curvature may hand it `DiagonalPairs` instead of a PairCurvature

    def jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, the head's inputs phi [n, h]) instead of J."""
        with torch.no_grad():
            f = self.model(x)
        return f, x.to(self.dtype)

    def add(self, chunk: Chunk) -> None:
        """Only pairs with a weight (w_ab != 0: the mined positive pairs, a few hundred of a batch's m^2) are
        gathered: their differences dphi [P, h], then one product C^T dphi^2 with C_ab,o = w_ab A_ab[o, o]
        (all m^2 differences of a 1280-d head were 50 ms of a step)."""
        if not isinstance(chunk.pairs, DiagonalPairs):  # what batch_curvature hands a diagonal_blocks accumulator
            raise BenchError("the pair-form head diagonal needs hessian=ggn and distance=euclidean")
        W, phi = chunk.pairs.W_pos, chunk.J.reshape(*chunk.valid.shape, -1)
        n, a, b = (W != 0).nonzero(as_tuple=True)
        C = W[n, a, b, None] * chunk.pairs.diagonals(n, a, b)  # [P, d]
        rows, m = phi.reshape(-1, phi.shape[-1]), phi.shape[1]
        dphi = rows[n * m + a]  # [P, h], in place from here (fresh [P, h] buffers cost more than the arithmetic)
        dphi -= rows[n * m + b]
        h = torch.mm(C.T.contiguous(), dphi.square_()).reshape(-1)
        self.H[:h.numel()] += h
        self.stats["param_kept"] += float(h.sum())


@dataclass
class DiagonalPairs:
    """What the pair-form diagonal needs of a batch's pairs (Euclidean GGN): the reducer weights W_pos,
    W_neg [nb, m, m] and, for any pairs asked for, the diagonals of their Hessian blocks A_ab =
    (I - u u^T / d^2) / max(d, DIST_FLOOR) (`bench.la.pairs.pair_hessians`; 0 where d = 0), without
    building every [m, m, d, d] block (1.4 ms of a 10 ms CIFAR step). Stands in for `PairCurvature`
    where an online step's accumulator takes diagonals (its output traces are analytic: tr A = (d - 1) / d)."""

    W_pos: torch.Tensor
    W_neg: torch.Tensor
    F: torch.Tensor  # [nb, m, d] embeddings
    dist: torch.Tensor  # [nb, m, m]

    @classmethod
    def of(cls, F: torch.Tensor, counts: tuple[torch.Tensor, torch.Tensor], loss: PairLoss) -> "DiagonalPairs":
        dist = pairwise_distances(F)
        W_pos, W_neg = reducer_weights(counts[0], counts[1], dist, loss.pos_margin, loss.neg_margin)
        return cls(W_pos, W_neg, F, dist)

    def _scale(self, d: torch.Tensor) -> torch.Tensor:
        return torch.where(d > 0, 1.0 / d.clamp_min(DIST_FLOOR), torch.zeros_like(d))

    def diagonals(self, n: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """diag A_ab [P, d] of the positive pairs (n, a, b)."""
        u = self.F[n, a] - self.F[n, b]
        d = self.dist[n, a, b]
        uhat2 = (u / torch.where(d > 0, d, torch.ones_like(d))[:, None]) ** 2
        return (1.0 - uhat2) * self._scale(d)[:, None]

    def output_traces(self) -> tuple[float, float]:
        """`PairCurvature.output_traces`: sum w tr A over the positive and the negative pairs."""
        k = (self.F.shape[-1] - 1) * self._scale(self.dist)
        return float((self.W_pos * k).sum()), float((self.W_neg * k).sum())


class _LinearHeadPairFull(_LinearHeadFullGGN):
    """`_LinearHeadFullGGN` for the Euclidean GGN without Jacobian rows (`_LinearHeadPairDiag`'s pair
    term in full): H_WW += sum_ab w_ab A_ab (x) dphi_ab dphi_ab^T, the bias rows and columns nothing."""

    jacobian = _LinearHeadPairDiag.jacobian

    def add(self, chunk: Chunk) -> None:
        W, A, dphi = _pair_terms(chunk)
        block = torch.einsum("nab,nabop,nabi,nabj->oipj", W, A, dphi, dphi)
        k = block.shape[0] * block.shape[1]
        self.H[:k, :k] += block.reshape(k, k)
        self.stats["param_kept"] += float(block.reshape(k, k).diagonal().sum())


def _pair_terms(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_pos [nb, m, m], A_pos [nb, m, m, d, d], dphi [nb, m, m, h]) of a chunk of the pair-form full
    accumulator (the positive pairs' blocks are the PSD part for Euclidean distances)."""
    pc = chunk.pairs
    if pc is None or pc.A_pos is None:
        raise BenchError("the pair-form head curvature needs hessian=ggn and distance=euclidean")
    nb, m = chunk.valid.shape
    phi = chunk.J.reshape(nb, m, -1)
    return pc.W_pos, pc.A_pos, phi[:, :, None] - phi[:, None]


def single_linear(module: nn.Module) -> bool:
    """True when the Bayesian module computes one nn.Linear: an nn.Linear, or a backbone's head that says
    so (`single_linear`: a CNN's EmbeddingHead without whitening, hidden layers or L2 normalisation)."""
    return type(module) is nn.Linear or getattr(module, "single_linear", False) is True


def accumulator_class(structure: str, module: nn.Module, pair_form: bool = False) -> type[Accumulator]:
    """The post-hoc family's accumulator of `structure` for the Bayesian module: closed-form Jacobians
    when it computes one nn.Linear (`single_linear`), and with pair_form (hessian=ggn, Euclidean
    distances) its diagonal or full block straight from the pairs (`_LinearHeadPairDiag`)."""
    linear = single_linear(module)
    if structure == "diag":
        return (_LinearHeadPairDiag if pair_form else _LinearHeadDiagGGN) if linear else DiagGGN
    if structure == "last_layer":
        return (_LinearHeadPairFull if pair_form else _LinearHeadFullGGN) if linear else LastLayerGGN
    return _LinearHeadKronGGN if linear else KronGGN


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Training steps (= mining batches) per epoch of `bench.train.train_net`: ceil(n / B) batches, a
    last batch of fewer than 2 items skipped."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


# ---------------------------------------------------------------------------------------------
# one batch's curvature, at the accumulator's weights
# ---------------------------------------------------------------------------------------------

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
    for b in range(flat.shape[0]):  # a random k of the mined positions (randperm: no key per possible triplet)
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


def batch_curvature(acc: Accumulator, inputs: torch.Tensor, y: torch.Tensor, loss: PairLoss, hessian: str = "ggn",
                    pair_cap: int | None = None, generator: torch.Generator | None = None,
                    counts: tuple[torch.Tensor, torch.Tensor] | None = None) -> BatchCurvature:
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
                pairs = contrastive_pair_curvature(F, yb, pos_margin=loss.pos_margin, neg_margin=loss.neg_margin,
                                                   miner_margin=loss.miner_margin, miner_type=loss.miner_type,
                                                   distance=loss.distance, counts=counts)
        acc.add(Chunk(J, valid, pairs))
    return BatchCurvature(acc.result(), pairs, counts if pairs is not None else None)


# ---------------------------------------------------------------------------------------------
# the running state (module buffers: cached with the net)
# ---------------------------------------------------------------------------------------------

class OnlineState(nn.Module):
    """The running curvature sums S (diag [D], full [D, D], or per Linear layer S_G [out, out] and S_A
    [in+1, in+1]), their weight Z, the prior precision, the step count, the measured seconds of the
    curvature and prior parts of training, the prior after each epoch (NaN where not re-tuned) and the
    output-space curvature kept / dropped (negative pairs) summed over steps; all buffers, so they travel
    in the model cache."""

    def __init__(self, structure: str, shapes: list[tuple[int, int]], epochs: int, prior: float,
                 init: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.structure = structure
        self.n_layers = len(shapes)
        if structure == "kron":
            for i, (out, inp) in enumerate(shapes):
                self.register_buffer(f"G{i}", torch.eye(out, dtype=dtype) * init)
                self.register_buffer(f"A{i}", torch.zeros(inp, inp, dtype=dtype))
        else:
            (D, _), = shapes
            self.register_buffer("S", torch.full((D,), init, dtype=dtype) if structure == "diag"
                                 else torch.eye(D, dtype=dtype) * init)
        f64 = dict(dtype=torch.float64)
        self.register_buffer("weight", torch.zeros((), **f64))
        self.register_buffer("prior_precision", torch.tensor(float(prior), **f64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("seconds", torch.zeros(len(STAGE_NAMES), **f64))
        self.register_buffer("prior_history", torch.full((epochs,), float("nan"), **f64))
        self.register_buffer("traces", torch.zeros(2, **f64))  # output-space kept, dropped

    def add(self, curv: Curvature, memory: float, traces: tuple[float, float] = (0.0, 0.0)) -> None:
        """S <- m S + h (and S_A <- m S_A + A), Z <- m Z + 1, for the step's curvature h."""
        if self.structure == "kron":
            for i, f in enumerate(curv.kron or []):
                getattr(self, f"G{i}").mul_(memory).add_(f.G.to(self.curvature_dtype))
                getattr(self, f"A{i}").mul_(memory).add_(f.A.to(self.curvature_dtype))
        else:
            self.S.mul_(memory).add_(curv.H.to(self.S.dtype))
        self.weight.mul_(memory).add_(1.0)
        self.traces[0] += traces[0]
        self.traces[1] += traces[1]

    @property
    def curvature_dtype(self) -> torch.dtype:
        return self.G0.dtype if self.structure == "kron" else self.S.dtype

    def curvature(self, names: list[str], subset: str, D: int, scale: float | None) -> Curvature:
        """The current H as a `Curvature` of the structure: scale * S / Z (gibbs: scale = n_b; 0 before the
        first step), or S itself when scale is None (lam); Kronecker: G from S_G that way, A = S_A / Z."""
        z = float(self.weight)

        def scaled(S: torch.Tensor) -> torch.Tensor:
            if scale is None:
                return S.clone()
            return S * (scale / z) if z > 0 else torch.zeros_like(S)

        if self.structure == "kron":
            factors = []
            for i in range(self.n_layers):
                A = getattr(self, f"A{i}")
                A = A / z if z > 0 else torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
                factors.append(KronFactor(scaled(getattr(self, f"G{i}")), A))
            return Curvature("kron", subset, names, D, kron=factors)
        return Curvature(self.structure, subset, names, D, H=scaled(self.S))

    def stage_seconds(self) -> dict[str, float]:
        return {k: float(v) for k, v in zip(STAGE_NAMES, self.seconds)}


class OnlineLaplaceNet(nn.Module):
    """An embedding net (`net`: its Bayesian subset's weights are the posterior mean) and the online
    posterior state (`state`); the forward pass is the net's."""

    def __init__(self, net: nn.Module, settings: OnlineSettings, epochs: int, n_train: int) -> None:
        super().__init__()
        self.net, self.settings = net, settings
        self._module = (bayesian_module(net, settings.subset),)  # a reference, not a child module
        module = self.bayesian_module()
        dtype = torch.float64 if settings.dtype == "float64" else torch.float32
        probe = accumulator_class(settings.structure, module)(module, dtype)
        self.names, self.subset_name, self.D = probe.names, probe.subset, probe.D
        if settings.structure == "kron":
            shapes = [(G.shape[0], A.shape[0]) for G, A in zip(probe.G, probe.A)]
        else:
            shapes = [(probe.D, probe.D)]
        init = float(n_train) if settings.scaling == "lam" else 0.0  # LAM: H_0 = N
        self.state = OnlineState(settings.structure, shapes, epochs, settings.prior, init, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def bayesian_module(self) -> nn.Module:
        return self._module[0]

    def curvature(self, n_batches: int) -> Curvature:
        """The current H (`OnlineState.curvature` with this net's scaling)."""
        scale = float(n_batches) if self.settings.scaling == "gibbs" else None
        return self.state.curvature(self.names, self.subset_name, self.D, scale)

    def posterior(self, n_batches: int, delta: float | None = None) -> Posterior:
        """The current posterior N(mu, (H + delta I)^-1) over the Bayesian module (the structure's class);
        delta: the state's prior precision unless given."""
        cls = get_structure(self.settings.structure).posterior
        delta = float(self.state.prior_precision) if delta is None else float(delta)
        return cls(self.bayesian_module(), self.curvature(n_batches), delta)


def sample_deviations(posterior: Posterior, S: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """S draws theta_s of the posterior (its own sampler) as deviations eps_s = theta_s - mu: name -> [S, *shape]."""
    params = dict(posterior.model.named_parameters())
    return {n: v - params[n].detach() for n, v in posterior.sample_params(S, generator).items()}


# ---------------------------------------------------------------------------------------------
# the curvature part of a training step
# ---------------------------------------------------------------------------------------------

class OnlineCurvature:
    """Steps 4-5 of a training step (module docstring) and the in-training marglik: the batch's curvature
    at each posterior draw, accumulated into the net's state; timed into the state ("hessian", "prior").
    The training step itself (draws, loss) is `methods.online_la.OnlineStep`."""

    def __init__(self, settings: OnlineSettings, loss: PairLoss, n_train: int, batch_size: int, epochs: int,
                 generator: torch.Generator) -> None:
        self.settings, self.loss, self.n_train, self.epochs = settings, loss, n_train, epochs
        self.n_batches = steps_per_epoch(n_train, batch_size)
        self.generator = generator  # the pair cap's draws
        self._probe: nn.Module | None = None

    def update(self, model: OnlineLaplaceNet, samples: dict[str, torch.Tensor], inputs: torch.Tensor,
               y: torch.Tensor, counts: list | None = None) -> None:
        """Add the curvature of the batch (inputs of the Bayesian module [m, ...], y [m]) at the S draws
        `samples` (name -> [S, *shape]; counts: the training loss's mined pairs per draw) to the state;
        at the end of every marglik_every-th epoch but the last, re-tune the prior precision."""
        s, state = self.settings, model.state
        module = model.bayesian_module()
        S = next(iter(samples.values())).shape[0]
        device = state.seconds.device
        sync(device)
        t0 = time.perf_counter()
        if self._probe is None:  # a copy of the Bayesian module that holds each draw in turn (eval mode:
            self._probe = copy.deepcopy(module).eval()  # BatchNorm would couple the items of the Jacobians)
        acc_cls = accumulator_class(s.structure, module, pair_form=s.hessian == "ggn" and s.distance == "euclidean")
        total: Curvature | None = None
        traces = [0.0, 0.0]
        with torch.no_grad():
            for k in range(S):
                for n, p in self._probe.named_parameters():
                    p.copy_(samples[n][k])
                acc = acc_cls(self._probe, state.curvature_dtype)
                acc.measure_dropped = False  # measured in output space instead (no extra eigh per step)
                bc = batch_curvature(acc, inputs, y, self.loss, s.hessian, s.pair_cap or None, self.generator,
                                     counts[k] if counts else None)
                c = 1.0 if s.scaling == "gibbs" else (bc.pos_active * self.n_train ** 2 / bc.pairs if bc.pairs else 0.0)
                total = _mean_into(total, scale_curvature(bc.curvature, c / S), S)
                traces = [t + u / S for t, u in zip(traces, bc.output_traces())]
            state.add(total, s.memory, tuple(traces))
            state.steps += 1
        sync(device)
        state.seconds[0] += time.perf_counter() - t0
        epoch, end_of_epoch = divmod(int(state.steps), self.n_batches)
        if s.marglik_every and end_of_epoch == 0 and epoch % s.marglik_every == 0 and epoch < self.epochs:
            t0 = time.perf_counter()  # the final re-tuning, at the trained weights, is the method's own
            delta = marglik_prior(model, self.n_batches)
            state.prior_precision.fill_(delta)
            state.prior_history[epoch - 1] = delta
            state.seconds[1] += time.perf_counter() - t0


def marglik_prior(model: OnlineLaplaceNet, n_batches: int) -> float:
    """The prior precision that maximises the Laplace evidence at the current (mu, H) of the Bayesian
    module (`bench.la.prior.optimize_marglik` on the structure's spectrum of H, ||mu||^2 over the subset)."""
    cls = get_structure(model.settings.structure).posterior
    theta_sq = float(jac.flat_params(model.bayesian_module(), model.names).double().pow(2).sum())
    return optimize_marglik(cls.spectrum(model.curvature(n_batches)), theta_sq)[0]


def _mean_into(total: Curvature | None, curv: Curvature, S: int) -> Curvature:
    """total + curv, with Kronecker input factors A averaged over the S samples (G, H already carry 1/S)."""
    if curv.kron is not None:
        for f in curv.kron:
            f.A = f.A / S
    if total is None:
        return curv
    if curv.kron is not None:
        for a, b in zip(total.kron, curv.kron):
            a.G, a.A = a.G + b.G, a.A + b.A
    else:
        total.H = total.H + curv.H
    return total
