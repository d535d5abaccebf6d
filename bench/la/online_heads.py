"""The online Laplace accumulators of a Bayesian module that computes one nn.Linear (a head): the post-hoc
family's curvature (`bench.la.curvature`) on the head's closed-form Jacobian [I_d (x) phi^T, I_d], one
mining batch per training step, and for the Euclidean GGN the diagonal or full block straight from the
pairs (no Jacobian rows). Each curvature structure picks its accumulator here
(`bench.la.structures.Structure.online_accumulator`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.errors import BenchError
from bench.la.curvature import Chunk, DiagGGN, KronGGN
from bench.la.pairs import DIST_FLOOR, kept_laplacian
from bench.loss import PairLoss, pairwise_distances, reducer_weights
from bench.model import last_linear


class LinearHeadDiagGGN(DiagGGN):
    """diag GGN of a head that is one nn.Linear, on its closed-form Jacobian [I_d (x) phi^T, I_d]."""

    subset = "last_layer"


class LinearHeadFullGGN(LinearHeadDiagGGN):
    """Full H [D, D] of a head that is one nn.Linear (LastLayerGGN's matrix, one batch at a time): the same
    rows M, H += M^T M by one small product (no BLAS buffer and free-memory probe per step)."""

    structure = "last_layer"

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        super().__init__(model, dtype)
        self.H = torch.zeros(self.D, self.D, dtype=self.dtype, device=self.device)

    def add_rows(self, M: torch.Tensor) -> None:
        self.H += M.T @ M


class LinearHeadKronGGN(KronGGN):
    """KronGGN of a head that is one nn.Linear on its closed-form layer quantities, one location:
    U = [phi, 1] (1 with a bias), B = I_d (what `jac.layer_quantities` finds with d backward passes)."""

    def jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        with torch.no_grad():
            f = self.model(x)
        n, d = f.shape
        U = (
            torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            if last_linear(self.model, "online_la").bias is not None
            else x
        )
        return f, [(U[:, None], torch.eye(d, dtype=f.dtype, device=f.device).expand(n, 1, d, d))]


class LinearHeadPairDiag(LinearHeadDiagGGN):
    """The diagonal of `LinearHeadDiagGGN` for the Euclidean GGN, without Jacobian rows: for a head
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
        if not isinstance(
            chunk.pairs, DiagonalPairs
        ):  # what batch_curvature hands a diagonal_blocks accumulator
            raise BenchError("the pair-form head diagonal needs hessian=ggn and distance=euclidean")
        W, phi = chunk.pairs.W_pos, chunk.J.reshape(*chunk.valid.shape, -1)
        n, a, b = (W != 0).nonzero(as_tuple=True)
        C = W[n, a, b, None] * chunk.pairs.diagonals(n, a, b)  # [P, d]
        rows, m = phi.reshape(-1, phi.shape[-1]), phi.shape[1]
        dphi = rows[
            n * m + a
        ]  # [P, h], in place from here (fresh [P, h] buffers cost more than the arithmetic)
        dphi -= rows[n * m + b]
        h = torch.mm(C.T.contiguous(), dphi.square_()).reshape(-1)
        self.H[: h.numel()] += h
        self.stats["param_kept"] += float(h.sum())


class LinearHeadLaplacianDiag(LinearHeadDiagGGN):
    """The diagonal of `LinearHeadDiagGGN` for any pair curvature (the cosine GGN, whose pair blocks couple
    f_a and f_b) or jtj, without Jacobian rows: with J_a = I_d (x) [phi_a^T, 1] and the batch's kept block
    Laplacian L [m d, m d] (`bench.la.pairs.kept_laplacian`), diag(J^T L J) is
        H_W[o, i] += sum_ab L[(a, o), (b, o)] phi_a,i phi_b,i,    H_b[o] += sum_ab L[(a, o), (b, o)],
    one [m, m] x [m, h] product per output dimension, where the rows M = V^T J cost an eigh and an
    [m d, m d] x [m d, D] product per step (CIFAR head, D = 10,248, 64 items: 427 s of a 20-epoch fit).
    Equal to the rows' diagonal up to the eigenvalues `laplacian_factor` clips below 1e-7 of the largest."""

    def jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, the head's inputs phi [n, h]) instead of J; remembers the output dimension d."""
        with torch.no_grad():
            f = self.model(x)
        self.out_dim = f.shape[-1]
        return f, x.to(self.dtype)

    def add(self, chunk: Chunk) -> None:
        nb, m = chunk.valid.shape
        d = self.out_dim
        phi = chunk.J.reshape(nb, m, -1) * chunk.valid[..., None].to(self.dtype)
        h = phi.shape[-1]
        if chunk.pairs is None:  # jtj: identity output Hessian per item
            w = phi.square().sum((0, 1)).expand(d, h)
            b = chunk.valid.sum().to(self.dtype).expand(d)
        else:
            L = kept_laplacian(chunk.pairs)
            Lo = L.view(nb, m, d, m, d).diagonal(dim1=2, dim2=4)  # [nb, m, m, d]: L[(a, o), (b, o)]
            w = torch.einsum("nabo,nbi,nai->oi", Lo, phi, phi)
            b = Lo.sum((0, 1, 2))
        k = w.numel()
        self.H[:k] += w.reshape(-1)
        kept = float(w.sum())
        if self.D > k:  # the bias follows the weight, row-major [W | b]
            self.H[k : k + d] += b
            kept += float(b.sum())
        self.stats["param_kept"] += kept


@dataclass
class DiagonalPairs:
    """What the pair-form diagonal needs of a batch's pairs (Euclidean GGN): the reducer weights W_pos,
    W_neg [nb, m, m] and, for any pairs asked for, the diagonals of their Hessian blocks A_ab =
    (I - u u^T / d^2) / max(d, DIST_FLOOR) (`bench.la.pairs.pair_hessians`; 0 where d = 0), without
    building every [m, m, d, d] block (1.4 ms of a 10 ms CIFAR step). Stands in for `PairCurvature`
    where an online step's accumulator takes diagonals (its output traces are analytic: tr A = (d - 1) /
    d)."""

    W_pos: torch.Tensor
    W_neg: torch.Tensor
    F: torch.Tensor  # [nb, m, d] embeddings
    dist: torch.Tensor  # [nb, m, m]

    @classmethod
    def of(
        cls, F: torch.Tensor, counts: tuple[torch.Tensor, torch.Tensor], loss: PairLoss
    ) -> "DiagonalPairs":
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


class LinearHeadPairFull(LinearHeadFullGGN):
    """`LinearHeadFullGGN` for the Euclidean GGN without Jacobian rows (`LinearHeadPairDiag`'s pair
    term in full): H_WW += sum_ab w_ab A_ab (x) dphi_ab dphi_ab^T, the bias rows and columns nothing."""

    jacobian = LinearHeadPairDiag.jacobian

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
