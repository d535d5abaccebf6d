"""Output-space curvature of the contrastive loss (`bench.loss`): analytic pair Hessians of the mined
pairs and the block graph Laplacian, vectorised over many mining batches at once (no Python loop over pairs),
for plain
Euclidean distances and for distances between L2-normalised embeddings (distance=cosine)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.errors import BenchError
from bench.loss import mined_pair_counts, pairwise_distances, reducer_weights, retrieval_space

DIST_FLOOR = 1e-3  # pair distances below this get the curvature of this distance (see pair_hessians)


@dataclass
class PairCurvature:
    """Curvature of a stack of nb mining batches of m items each (embedding dim d).

    W_pos / W_neg [nb, m, m]: reducer weights of the ordered pairs (a, b) (0 when not mined or inactive).
    Euclidean distance (the pair loss depends on u = f_a - f_b only):
      A_pos / A_neg [nb, m, m, d, d]: Hessian blocks hess_u l of the active pairs (0 elsewhere).
    Cosine distance (the pair loss depends on f_a and f_b separately; A_pos = A_neg = None):
      pair_index (bi, ai, bj) [P] each: the active ordered pairs; B_kept / B_dropped [P, 2d, 2d]: w x the
      PSD / NSD parts of each pair's Hessian w.r.t. the stacked (f_a, f_b) (`normalised_pair_hessians`).
    """

    W_pos: torch.Tensor
    W_neg: torch.Tensor
    A_pos: torch.Tensor | None
    A_neg: torch.Tensor | None
    pair_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    B_kept: torch.Tensor | None = None
    B_dropped: torch.Tensor | None = None

    def output_traces(self) -> tuple[float, float]:
        """(kept, dropped): the output-space absolute traces of the curvature kept by the PSD clamp and
        dropped by it, as half the traces of their block Laplacians (so, for Euclidean distances,
        sum w tr A of the positive pairs and sum w |tr A| of the negative pairs)."""
        if self.B_kept is not None:
            tr = lambda B: float(B.diagonal(dim1=-2, dim2=-1).sum()) / 2  # noqa: E731
            return tr(self.B_kept), -tr(self.B_dropped)
        tr_pos = (self.W_pos * self.A_pos.diagonal(dim1=-2, dim2=-1).sum(-1)).sum()
        tr_neg = (self.W_neg * self.A_neg.diagonal(dim1=-2, dim2=-1).sum(-1)).sum()  # <= 0
        return float(tr_pos), float(-tr_neg)


def pair_hessians(F: torch.Tensor, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic Hessian blocks A_ab = s (I - u u^T / d^2) / d of s * ||u|| with u = f_a - f_b.

    F [nb, m, d] -> (A [nb, m, m, d, d], dist [nb, m, m]); A is 0 where d == 0 (undefined there), and
    1/d is capped at 1/DIST_FLOOR (exact for d >= DIST_FLOOR).

    Derivation: with d = ||u|| and l = s (d - m) on the active side of a pair loss,
    grad_u l = s u / d and hess_u l = s (I - u u^T / d^2) / d: eigenvalue s / d on the (dim-1)-dim
    complement of u, 0 along u.
    """
    u = F[:, :, None, :] - F[:, None, :, :]
    d2 = u.pow(2).sum(-1)
    dist = d2.sqrt()
    ok = dist > 0
    inv = torch.where(ok, 1.0 / torch.where(ok, dist, torch.ones_like(dist)), torch.zeros_like(dist))
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    uhat = u * inv[..., None]
    # the 1/d curvature of the cone ||u|| is capped at 1/DIST_FLOOR: near-duplicate items (Fashion-MNIST
    # has exact duplicates) would otherwise give blocks of 1e7 and more, and an ill-conditioned GGN
    scale = torch.where(ok, 1.0 / dist.clamp_min(DIST_FLOOR), torch.zeros_like(dist))
    A = (eye - uhat[..., :, None] * uhat[..., None, :]) * (sign * scale)[..., None, None]
    return A, dist


def normalised_pair_hessians(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """Hessian [P, 2d, 2d] of the normalised distance d = ||n_a - n_b||, n = f / ||f||, w.r.t. the
    stacked pair (f_a, f_b), for fa, fb [P, d]; 1/d capped at 1/DIST_FLOOR as in `pair_hessians`,
    0 where d == 0.

    Derivation: with r = ||f||, n = f / r, the normalisation's Jacobian is P = dn/df = (I - n n^T) / r
    and, for a fixed v, hess_f (v^T n) = C(n, v, r) = -[(n.v)(I - n n^T) + n w^T + w n^T] / r^2 with
    w = (I - n n^T) v. With u = n_a - n_b, g = u / d and A = (I - g g^T) / d (= hess_u d):
        H_aa = P_a A P_a + C(n_a, g, r_a),    H_bb = P_b A P_b + C(n_b, -g, r_b),
        H_ab = H_ba^T = -P_a A P_b.
    Unlike the Euclidean block [[A, -A], [-A, A]] this is not a function of f_a - f_b alone, and the
    C terms make it indefinite even for a positive pair.
    """
    d = fa.shape[-1]
    eye = torch.eye(d, dtype=fa.dtype, device=fa.device)
    ra = fa.norm(dim=-1).clamp_min(1e-12)
    rb = fb.norm(dim=-1).clamp_min(1e-12)
    na, nb_ = fa / ra[:, None], fb / rb[:, None]
    u = na - nb_
    dist = u.norm(dim=-1)
    ok = dist > 0
    g = u / torch.where(ok, dist, torch.ones_like(dist))[:, None]  # 0 where d == 0
    inv = torch.where(ok, 1.0 / dist.clamp_min(DIST_FLOOR), torch.zeros_like(dist))
    A = (eye - g[:, :, None] * g[:, None, :]) * inv[:, None, None]

    def proj(n: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (eye - n[:, :, None] * n[:, None, :]) / r[:, None, None]

    def curv(n: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        nv = (n * v).sum(-1)
        w = v - n * nv[:, None]
        outer = n[:, :, None] * w[:, None, :]
        return (
            -(nv[:, None, None] * (eye - n[:, :, None] * n[:, None, :]) + outer + outer.transpose(1, 2))
            / (r * r)[:, None, None]
        )

    Pa, Pb = proj(na, ra), proj(nb_, rb)
    H_ab = -Pa @ A @ Pb
    top = torch.cat([Pa @ A @ Pa + curv(na, g, ra), H_ab], dim=-1)
    bottom = torch.cat([H_ab.transpose(1, 2), Pb @ A @ Pb + curv(nb_, -g, rb)], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def psd_split(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B+, B-) for symmetric B [P, k, k]: its PSD and NSD parts from one batched eigh (B+ + B- = B)."""
    if B.shape[0] == 0:
        return B.clone(), B.clone()
    evals, evecs = small_eigh(B)
    plus = (evecs * evals.clamp_min(0)[:, None, :]) @ evecs.transpose(1, 2)
    minus = (evecs * evals.clamp_max(0)[:, None, :]) @ evecs.transpose(1, 2)
    return plus, minus


def contrastive_pair_curvature(
    F: torch.Tensor,
    y: torch.Tensor,
    *,
    pos_margin: float,
    neg_margin: float,
    miner_margin: float,
    miner_type: str = "all",
    valid: torch.Tensor | None = None,
    distance: str = "euclidean",
    reduction: str = "mean",
    counts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PairCurvature:
    """Reducer weights and Hessian blocks of PML's ContrastiveLoss for F [nb, m, d], y [nb, m].

    The loss as trained (`bench.loss.make_loss_and_miner`): ContrastiveLoss on the distances
    d_ij = ||f_i - f_j|| (euclidean) or ||n_i - n_j|| with n = f / ||f|| (cosine: PML's default
    LpDistance, normalize_embeddings=True), both p=2, power=1, pairs taken from the
    triplets (a, p, n) of a TripletMarginMiner: each mined triplet gives the positive pair (a, p) and
    the negative pair (a, n), duplicates included (PML's `convert_to_pairs`). Per pair
        positive: l = relu(d - m_pos),     negative: l = relu(m_neg - d),
    reduced by PML's AvgNonZeroReducer: the batch loss is mean_{active pos pairs} l + mean_{active neg
    pairs} l, so an active pair (a, b) of kind k carries weight w_ab = count_ab / n_active_k, with
    count_ab how often the miner produced it and n_active_k the number (with multiplicity) of pairs of
    kind k with l > 0 (inactive pairs have zero gradient and zero Hessian). PML returns a zero loss
    when the miner yields at most one triplet (GenericPairLoss), so such a batch has no curvature.
    Mining and activity use the same distances. For cosine each active pair's block
    s w hess_(f_a, f_b) d_ab (s = +1 positive, -1 negative; `normalised_pair_hessians`) is split
    into its PSD and NSD parts (`psd_split`), only the pairs with w > 0 being built.
    reduction "sum" weights every active pair by its count instead (`reducer_weights`).
    counts: the mined multiplicities (C_pos, C_neg) when the caller mined (e.g. subsampled) them itself,
    on the same distances.
    """
    if distance == "cosine":
        G = retrieval_space(F, distance)
        dist = pairwise_distances(G)
        C_pos, C_neg = (
            mined_pair_counts(G, y, miner_margin, miner_type, valid, dist=dist) if counts is None else counts
        )
        W_pos, W_neg = reducer_weights(C_pos, C_neg, dist, pos_margin, neg_margin, reduction)
        W = W_pos + W_neg  # an ordered pair is positive or negative, never both
        bi, ai, bj = torch.nonzero(W > 0, as_tuple=True)
        w = torch.where(W_pos[bi, ai, bj] > 0, 1.0, -1.0).to(F.dtype) * W[bi, ai, bj]
        plus, minus = psd_split(w[:, None, None] * normalised_pair_hessians(F[bi, ai], F[bi, bj]))
        return PairCurvature(W_pos, W_neg, None, None, (bi, ai, bj), plus, minus)
    if distance != "euclidean":
        raise BenchError(f"distance must be euclidean or cosine, got {distance!r}")
    C_pos, C_neg = mined_pair_counts(F, y, miner_margin, miner_type, valid) if counts is None else counts
    A_pos, dist = pair_hessians(F, +1.0)
    A_neg = -A_pos
    W_pos, W_neg = reducer_weights(C_pos, C_neg, dist, pos_margin, neg_margin, reduction)
    act_pos, act_neg = W_pos > 0, W_neg > 0
    return PairCurvature(W_pos, W_neg, A_pos * act_pos[..., None, None], A_neg * act_neg[..., None, None])


def _laplacian(W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Block graph Laplacian sum_ab W_ab (e_a - e_b)(e_a - e_b)^T (x) A_ab: [nb, m*d, m*d].

    A pair loss depends on (f_a, f_b) only through u = f_a - f_b, so its Hessian w.r.t. the stacked
    pair is [[A, -A], [-A, A]] = (e_a - e_b)(e_a - e_b)^T (x) A; summed over the weighted pairs this
    is the Hessian of the batch loss w.r.t. all embeddings, and J^T L J its GGN.
    """
    nb, m = W.shape[:2]
    d = A.shape[-1]
    S = W[..., None, None] * A  # [nb, a, b, d, d]
    S = S + S.transpose(1, 2)  # the (a, b) pair touches (b, a) too; A(u) = A(-u) is symmetric
    diag = S.sum(2)  # [nb, a, d, d]
    L = -S
    idx = torch.arange(m, device=W.device)
    L[:, idx, idx] += diag
    return L.permute(0, 1, 3, 2, 4).reshape(nb, m * d, m * d)


def _pair_block_laplacian(
    shape: tuple[int, int, int], index: tuple[torch.Tensor, ...], B: torch.Tensor
) -> torch.Tensor:
    """sum over pairs p of E_p^T B_p E_p, E_p selecting (f_a, f_b) of pair p = (bi, ai, bj) of its batch:
    [nb, m*d, m*d] from pair blocks B [P, 2d, 2d] (scatter-added, no loop over pairs)."""
    nb, m, d = shape
    bi, ai, bj = index
    L = B.new_zeros(nb, m, m, d, d)
    for (r, c), blk in (
        ((ai, ai), B[:, :d, :d]),
        ((bj, bj), B[:, d:, d:]),
        ((ai, bj), B[:, :d, d:]),
        ((bj, ai), B[:, d:, :d]),
    ):
        L.index_put_((bi, r, c), blk, accumulate=True)
    return L.permute(0, 1, 3, 2, 4).reshape(nb, m * d, m * d)


def clamped_laplacians(pc: PairCurvature) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_kept, L_dropped) [nb, m*d, m*d]: the PSD clamp of the block Laplacian; their sum is the exact L.

    Each pair's block is replaced by its PSD part (negative eigen-directions dropped, as Bayesian
    metric learning / LAM keeps only PSD terms), so L+ and J^T L+ J are PSD. Euclidean: the block is
    (e_a - e_b)(e_a - e_b)^T (x) A with A s/d times a projector, so A+ = A for positive pairs and
    A+ = 0 for active negative pairs: the whole curvature of active negative pairs is dropped.
    Cosine: the PSD part of each 2d x 2d pair block (`contrastive_pair_curvature`), of either sign.
    """
    if pc.B_kept is not None:
        return kept_laplacian(pc), _pair_block_laplacian(_block_shape(pc), pc.pair_index, pc.B_dropped)
    return kept_laplacian(pc), _laplacian(pc.W_neg, pc.A_neg)


def kept_laplacian(pc: PairCurvature) -> torch.Tensor:
    """L_kept of `clamped_laplacians` alone [nb, m*d, m*d] (the kept, PSD part's block Laplacian)."""
    if pc.B_kept is not None:
        return _pair_block_laplacian(_block_shape(pc), pc.pair_index, pc.B_kept)
    return _laplacian(pc.W_pos, pc.A_pos)


def _block_shape(pc: PairCurvature) -> tuple[int, int, int]:
    nb, m = pc.W_pos.shape[:2]
    return nb, m, pc.B_kept.shape[-1] // 2


def small_eigh(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched eigh of small matrices. On CPU it runs single-threaded: LAPACK's threaded path spends
    ~100x longer synchronising threads than computing on 32 x 32 blocks (measured: 190 ms vs 3 ms)."""
    if L.device.type != "cpu" or torch.get_num_threads() == 1:
        return _eigh64(L)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _eigh64(L)
    finally:
        torch.set_num_threads(n)


def _eigh64(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh in float64 (float32 LAPACK fails to converge on some badly scaled blocks), cast back;
    non-finite blocks are a BenchError rather than a LAPACK error."""
    if not bool(torch.isfinite(L).all()):
        raise BenchError(
            "non-finite pair curvature (an embedding or distance is inf/NaN); check the base model"
        )
    try:
        evals, evecs = torch.linalg.eigh(L.double())
    except RuntimeError as e:  # torch.linalg.LinAlgError
        raise BenchError(
            f"eigendecomposition of the pair-curvature blocks failed: {str(e).splitlines()[0]}"
        ) from None
    return evals.to(L.dtype), evecs.to(L.dtype)


def laplacian_factor(L: torch.Tensor, rel_tol: float = 1e-7) -> torch.Tensor:
    """V [nb, m*d, r] with L = V V^T for PSD L [nb, m*d, m*d] (eigh, eigenvalues below
    rel_tol * max clipped; r = the largest numerical rank in the stack, zero columns pad the rest).
    For NSD L pass -L. An all-zero stack gives r = 0."""
    evals, evecs = small_eigh(L)
    top = evals.abs().amax(-1, keepdim=True)
    keep = evals > rel_tol * top.clamp_min(torch.finfo(L.dtype).tiny)
    r = int(keep.sum(-1).max()) if keep.numel() else 0
    if r == 0:
        return L.new_zeros(L.shape[0], L.shape[1], 0)
    # eigh sorts ascending: the kept eigenvalues are the last ones
    ev = torch.where(keep, evals, torch.zeros_like(evals))[:, -r:]
    return evecs[:, :, -r:] * ev.clamp_min(0).sqrt()[:, None, :]
