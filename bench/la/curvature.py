"""The GGN (or JtJ) of the contrastive loss: one accumulator per structure (full, last layer, diagonal,
Kronecker) fed chunk by chunk by one driver, `accumulate` (memory budgets: `bench.la.memory`; the full
matrix's rank-k update: `bench.la.rank_k`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bench.errors import BenchError
from bench.la import jacobians as jac
from bench.la.memory import (
    available_memory,
    check_full_memory,
    chunk_budget,
    fitting_subsets,
    forward_footprint,
    items_within,
)
from bench.la.pairs import (
    PairCurvature,
    clamped_laplacians,
    contrastive_pair_curvature,
    kept_laplacian,
    laplacian_factor,
)
from bench.la.rank_k import SymmetricAccumulator
from bench.loss import PairLoss

HESSIANS = ("ggn", "jtj")


@dataclass
class KronFactor:
    """One Linear/Conv2d layer's factors: H_l ~= G (x) A for the layer's [W | b] flattened row-major."""

    G: torch.Tensor  # [out, out]
    A: torch.Tensor  # [in', in'] (in' = in_features or C_in kh kw, + 1 with a bias)


@dataclass
class Curvature:
    """A curvature estimate: full [D, D], diag [D] or per-layer Kronecker factors."""

    structure: str
    subset: str
    names: list[str]
    D: int
    H: torch.Tensor | None = None
    kron: list[KronFactor] | None = None
    stats: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# accumulators: one per structure
# ---------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """What the driver hands an accumulator: nb mining batches of m items.

    J: the accumulator's own `jacobian` of the nb*m items; valid [nb, m]: False on padding;
    pairs: the mined pairs' weights and output Hessian blocks (hessian="ggn"), None for "jtj"
    (identity output Hessian per item).
    """

    J: Any
    valid: torch.Tensor
    pairs: PairCurvature | None


class Accumulator:
    """Curvature of one structure over a parameter subset (`bench.la.subsets`; the class default when
    None): `jacobian` says what the driver computes per item, `add` takes a chunk, `result` returns the
    Curvature, `bytes_per_item` sizes the chunks."""

    structure = ""
    subset = "all"

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, subset: str | None = None) -> None:
        p = next(model.parameters())
        self.model, self.device, self.dtype = model, p.device, dtype or p.dtype
        self.subset = subset or self.subset
        self.names = jac.subset_names(model, self.subset)
        self.D = self._numel(self.names)
        self.stats = {"rows": 0, "param_kept": 0.0, "param_dropped": 0.0}

    @classmethod
    def check_supported(cls, hessian: str, distance: str) -> None:
        """BenchError (one line) when this accumulator cannot take the curvature (every one can by
        default)."""

    def _numel(self, names: list[str]) -> int:
        params = dict(self.model.named_parameters())
        return sum(params[n].numel() for n in names)

    def jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(f [n, d], the per-item quantity `add` needs) for the items x."""
        raise NotImplementedError

    def bytes_per_item(self, x1: torch.Tensor) -> int:
        """About how many bytes `jacobian` and `add` hold per item (x1 [1, ...] one item): the [d, D]
        Jacobian plus d copies of the forward's activations (vmap(jacrev) runs d backward passes)."""
        d, act = forward_footprint(self.model, x1)
        return d * (self.D + act) * torch.empty((), dtype=self.dtype).element_size()

    def add(self, chunk: Chunk) -> None:
        raise NotImplementedError

    def result(self) -> Curvature:
        raise NotImplementedError

    def _curvature(self, **kw: Any) -> Curvature:
        return Curvature(self.structure, self.subset, self.names, self.D, stats=self.stats, **kw)


class _RowAccumulator(Accumulator):
    """H = sum of M^T M over row blocks M [k, D] of the chunks' Jacobians.

    For a chunk of nb mining batches, with J_b [m*d, D] the stacked embedding Jacobian of batch b and
    L_b the (PSD-clamped) block Laplacian of its mined pairs (`bench.la.pairs`),

        H = sum_b J_b^T L_b J_b = sum_b M_b^T M_b,     M_b = V_b^T J_b,  L_b = V_b V_b^T  (eigh, r <= m*d
        rows),

    so the GGN costs one [B*d, D] Jacobian, one small batched product V^T J and one update per chunk,
    however many pairs the miner yields. For hessian="jtj" (the seed's proxy, identity output Hessian
    per item) M is J itself. The dropped (negative-pair) part is only measured: tr(J^T L- J).
    """

    measure_dropped = True  # measure tr(J^T L- J) (one more small eigh per chunk); online LA's steps skip it

    def jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        J = jac.subset_jacobian(self.model, x, self.subset, self.names)  # [n, d, D]
        with torch.no_grad():
            f = self.model(x)
        return f, J.to(self.dtype)

    def add(self, chunk: Chunk) -> None:
        J, D = chunk.J, self.D
        if chunk.pairs is None:
            M = (J * chunk.valid.reshape(-1)[:, None, None]).reshape(-1, D)
        else:
            nbc, m = chunk.valid.shape
            Jb = J.reshape(nbc, m * J.shape[1], D)
            if self.measure_dropped:
                L_kept, L_dropped = clamped_laplacians(chunk.pairs)
                Vd = laplacian_factor(-L_dropped)
                if Vd.shape[-1]:
                    self.stats["param_dropped"] += float(torch.bmm(Vd.transpose(1, 2), Jb).pow(2).sum())
            else:
                L_kept = kept_laplacian(chunk.pairs)
            M = torch.bmm(laplacian_factor(L_kept).transpose(1, 2), Jb).reshape(-1, D)
        self.stats["param_kept"] += float(M.pow(2).sum())
        self.stats["rows"] += M.shape[0]
        self.add_rows(M)

    def add_rows(self, M: torch.Tensor) -> None:
        """H += M^T M (or its diagonal) for rows M [k, D]."""
        raise NotImplementedError


class FullGGN(_RowAccumulator):
    """Full H [D, D] over the subset: M^T M through BLAS syrk on the upper triangle (CPU, half the
    GEMM flops) or a blocked upper-triangular addmm (CUDA), rows buffered into large updates. Refuses
    (before allocating) a D x D matrix that will not fit, naming smaller subsets that would."""

    structure, subset, method = "full", "all", "full_la"
    suggest_subsets = True  # a refusal names the smaller la_subset values that would fit

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, subset: str | None = None) -> None:
        super().__init__(model, dtype, subset)
        avail = available_memory(self.device)
        cheaper = fitting_subsets(model, self.D, self.dtype, avail) if self.suggest_subsets else []
        check_full_memory(self.D, self.dtype, self.device, self.method, avail, self.subset, cheaper)
        self.sym = SymmetricAccumulator(self.D, self.dtype, self.device)

    def add_rows(self, M: torch.Tensor) -> None:
        self.sym.update(M)

    def result(self) -> Curvature:
        H = self.sym.result()
        # H is a sum of squares of M's entries: finite iff every M was (checked through the sum)
        if not math.isfinite(self.stats["param_kept"]):
            raise BenchError("non-finite Hessian (the trained model or the data contains inf/NaN)")
        return self._curvature(H=H)


class LastLayerGGN(FullGGN):
    """Full H over the last Linear layer, on its closed-form Jacobian [I_d (x) phi^T, I_d]."""

    structure, subset, method = "last_layer", "last_layer", "last_layer_la"
    suggest_subsets = False  # its subset is fixed

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, subset: str | None = None) -> None:
        super().__init__(model, dtype, "last_layer")  # always the last Linear, whatever la_subset says


class DiagGGN(_RowAccumulator):
    """diag(H) [D]: the sum of squares of M's columns (J^T J is never formed)."""

    structure = "diag"

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, subset: str | None = None) -> None:
        super().__init__(model, dtype, subset)
        self.H = torch.zeros(self.D, dtype=self.dtype, device=self.device)

    def add_rows(self, M: torch.Tensor) -> None:
        self.H += M.pow(2).sum(0)

    def result(self) -> Curvature:
        _check_finite(self.H, "Hessian diagonal")
        return self._curvature(H=self.H)


def kron_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in') of a Linear/Conv2d's Kronecker factors: in' = in_features or C_in kh kw, plus 1 with a
    bias."""
    w = layer.weight
    return w.shape[0], w[0].numel() + (layer.bias is not None)


class KronGGN(Accumulator):
    """Kronecker factors per Linear/Conv2d layer of the subset (its [W | b], W as [out, in'] row-major,
    in' = C_in kh kw for a Conv2d): H_l ~= G (x) A. Other parameters of the subset (e.g. BatchNorm's)
    stay at theta_MAP (stats["excluded_params"] counts them).

    The layer's Jacobian for item i is sum_s B_is (x) U_is^T over its locations s (`jacobians.
    layer_quantities`: B = d f / d output [d, out], U = input or unfolded patch [in']). Its GGN block
    is approximated by a sum of Kronecker products over pseudo-samples k, sum_k X_k (x) Y_k with
    X_k = g_k^T Lam_k g_k [out, out] and Y_k = v_k v_k^T [in', in']:
      jtj: k = (item i, location s): g = B_is, Lam = I_d, v = U_is (KFC: cross-location terms dropped).
      ggn: a kept pair {a, b} with curvature block S_ab (the PSD-clamped block Laplacian, both orders)
           has Jacobian difference B_a (x) U_a - B_b (x) U_b = Bbar (x) dU + dB (x) Ubar exactly, with
           Bbar, Ubar the pair's means and dB, dU its differences; each term is a pseudo-sample per
           location (g = Bbar, v = dU and g = dB, v = Ubar; the cross terms are dropped). For the last
           layer dB = 0 and the pair term is exact; dU has no bias entry, so the last bias gets no curvature.
    KFAC's step, with c_k = tr X_k and X_k = c_k Xhat_k:
        sum_k X_k (x) Y_k = C E_c[Xhat (x) Y] ~= C E_c[Xhat] (x) E_c[Y] = G (x) A,
        G = sum_k X_k,    A = sum_k c_k Y_k / sum_k c_k    (C = sum_k c_k),
    so the input factor is averaged with the weights that build G, and tr(G (x) A) = sum_k tr X_k tr Y_k
    is the trace of the pseudo-sample sum, which is the exact block for the last layer (G (x) A itself is
    exact for one pair there, and for one item at one location with jtj).
    Why the weights c_k and the dB term: c_k ~ w_ab / d_ab is largest where a pair's inputs are closest,
    so a plain mean of dU dU^T over pairs without the dB term misses the trace (measured on the paper net:
    1.5x the exact last-layer trace, 0.4-0.9x the inner layers'). Standard KFAC (curvlinops, laplace-torch)
    weighs every pseudo-sample alike, c_k = 1; the two agree where tr X_k is the same for every
    pseudo-sample (jtj on a last layer, or on a layer followed by linear maps only).
    Vectorised per mining batch through Laplacians, never a list of pairs: with B_s [m d, out] stacked
    over the batch, L its block Laplacian and Q = 2 blockdiag(L) - L the signless one,
        G = sum_s (B_s^T Q B_s / 4 + B_s^T L B_s),
        A C = sum_s (U_s^T (diag(C1 1) - C1) U_s + U_s^T (diag(C2 1) + C2) U_s / 4),
    C1_ab = tr(Bbar^T S_ab Bbar), C2_ab = tr(dB^T S_ab dB) from the batch's Gram B_s B_s^T. reduce=True
    (kfac_conv=reduce): one location per item, U = mean_s U_s, B = sum_s B_s (KFAC-reduce).
    """

    structure = "kron"
    GRAM_NUMEL = 2**25  # entries of the per-location Grams B_s B_s^T computed at once

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype | None = None,
        subset: str | None = None,
        reduce: bool = False,
    ) -> None:
        super().__init__(model, dtype, subset)
        self.layers = jac.kron_layers(model, self.names)
        kept = jac.kron_names(model, self.layers)
        self.stats["excluded_params"] = self.D - self._numel(kept)
        self.names, self.D, self.reduce = kept, self._numel(kept), reduce
        kw = dict(dtype=self.dtype, device=self.device)
        dims = [kron_dims(layer) for layer in self.layers]
        self.G = [torch.zeros(o, o, **kw) for o, _ in dims]
        self.A = [torch.zeros(i, i, **kw) for _, i in dims]
        self.weight = [0.0 for _ in dims]  # C = sum_k c_k per layer (A's denominator)
        self.n = 0

    @classmethod
    def check_supported(cls, hessian: str, distance: str) -> None:
        """The Kronecker factors assume a pair loss of u = f_a - f_b, which the cosine distance is not (its
        J^T J proxy is fine)."""
        if hessian == "ggn" and distance != "euclidean":
            raise BenchError(
                "kfac_la: the Kronecker GGN needs distance=euclidean (a pair loss of f_a - f_b); "
                "with distance=cosine use hessian=jtj, or full_la, last_layer_la or diag_la"
            )

    def jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        return jac.layer_quantities(self.model, x, self.layers, reduce=self.reduce)

    def bytes_per_item(self, x1: torch.Tensor) -> int:
        """U and B of one item (B four times: stacked copies, Q B and L B) plus its activations."""
        _, qs = self.jacobian(x1)
        _, act = forward_footprint(self.model, x1)
        return (act + sum(U.numel() + 4 * B.numel() for U, B in qs)) * torch.empty(
            (), dtype=self.dtype
        ).element_size()

    def item_weights(self, B: torch.Tensor) -> torch.Tensor:
        """jtj's c_k = tr(B^T B) = ||B||_F^2 per item and location: [n, s] from B [n, s, d, out]."""
        return B.pow(2).sum((-2, -1))

    def add(self, chunk: Chunk) -> None:
        layers, pc, dtype = chunk.J, chunk.pairs, self.dtype
        if pc is None:  # jtj: items x locations
            keep = chunk.valid.reshape(-1)
            self.n += int(keep.sum())
            for i, (U, B) in enumerate(layers):
                U, B = U[keep].to(dtype), B[keep].to(dtype)
                c = self.item_weights(B)
                Bf, Uf = B.reshape(-1, B.shape[-1]), U.reshape(-1, U.shape[-1])
                self.G[i] += Bf.T @ Bf
                self.A[i] += (Uf * c.reshape(-1, 1)).T @ Uf
                self.weight[i] += float(c.sum())
            return
        nb, m = chunk.valid.shape
        L_kept, _ = clamped_laplacians(pc)  # [nb, m d, m d]
        d = L_kept.shape[-1] // m
        Lr = L_kept.to(dtype).reshape(nb, m, d, m, d)
        tol = 64 * m * torch.finfo(dtype).eps * float(Lr.abs().max())
        if float(Lr.sum(3).abs().max()) > tol:  # the rows of blocks of a Laplacian sum to zero
            raise BenchError(
                "kfac_la: the kept pair curvature is not a block graph Laplacian (a pair loss of "
                "f_a - f_b); its Kronecker factors are undefined"
            )
        same = torch.eye(m, dtype=torch.bool, device=Lr.device)
        Q = torch.where(same[None, :, None, :, None], Lr, -Lr).reshape(nb, m * d, m * d)
        S = (-Lr * ~same[None, :, None, :, None]).permute(0, 1, 3, 2, 4)  # [nb, a, b, d, d] pair blocks S_ab
        self.n += int((S.abs().sum((-2, -1)) > 0).sum()) // 2
        for i, (U, B) in enumerate(layers):
            n_loc, out, inp = U.shape[1], B.shape[-1], U.shape[-1]
            Bs = B.to(dtype).reshape(nb, m, n_loc, d, out).transpose(1, 2).reshape(nb, n_loc, m * d, out)
            Us = U.to(dtype).reshape(nb, m, n_loc, inp).transpose(1, 2)  # [nb, s, m, in']
            self.G[i] += Bs.reshape(-1, out).T @ (
                Q[:, None] @ Bs / 4 + L_kept.to(dtype)[:, None] @ Bs
            ).reshape(-1, out)
            C1, C2 = self._pair_weights(Bs, S)  # [nb, s, m, m]
            lap = torch.diag_embed(C1.sum(-1)) - C1 + (torch.diag_embed(C2.sum(-1)) + C2) / 4
            self.A[i] += Us.reshape(-1, inp).T @ (lap @ Us).reshape(-1, inp)
            self.weight[i] += float(C1.sum() + C2.sum()) / 2  # each unordered pair once

    def _pair_weights(self, Bs: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C1, C2) [nb, s, m, m]: C1_ab = tr(Bbar^T S_ab Bbar) = (<S, K_aa> + <S, K_bb> + 2 <S, K_ab>) / 4
        and
        C2_ab = tr(dB^T S_ab dB) = <S, K_aa> + <S, K_bb> - 2 <S, K_ab> per location, with K = B_s B_s^T the
        batch's Gram ([m d, m d]; locations in blocks of GRAM_NUMEL entries)."""
        nb, n_loc, md, _ = Bs.shape
        m, d = S.shape[1], S.shape[-1]
        step = max(1, self.GRAM_NUMEL // (nb * md * md))
        C1, C2 = [], []
        for s0 in range(0, n_loc, step):
            K = (Bs[:, s0 : s0 + step] @ Bs[:, s0 : s0 + step].transpose(-1, -2)).reshape(nb, -1, m, d, m, d)
            Kaa = K.diagonal(dim1=2, dim2=4).permute(0, 1, 4, 2, 3)  # [nb, s, m, d, d]
            saa = torch.einsum("zabij,zsaij->zsab", S, Kaa)
            sab = torch.einsum("zabij,zsaibj->zsab", S, K)
            sbb = saa.transpose(-1, -2)  # <S_ab, K_bb> = <S_ba, K_bb> (S_ab = S_ba)
            C1.append((saa + sbb + 2 * sab) / 4)
            C2.append(saa + sbb - 2 * sab)
        return torch.cat(C1, 1), torch.cat(C2, 1)

    def result(self) -> Curvature:
        factors = []
        for G, A, w in zip(self.G, self.A, self.weight):
            G, A = (G + G.T) / 2, (A + A.T) / 2 / (w if w > 0 else 1.0)
            _check_finite(G, "Kronecker factor")
            _check_finite(A, "Kronecker factor")
            factors.append(KronFactor(G, A))
        self.stats["pseudo_samples"] = self.n
        return self._curvature(kron=factors)


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


def _batches(n: int, m: int, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mining batches like training: a seeded permutation cut into consecutive batches of m; a last
    batch of >= 2 items is padded (valid mask False). Returns (idx [nb, m], valid [nb, m])."""
    perm = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    nb_full, rest = divmod(n, m)
    idx = perm[: nb_full * m].reshape(nb_full, m)
    valid = torch.ones(nb_full, m, dtype=torch.bool)
    if rest >= 2:
        last = torch.cat([perm[nb_full * m :], perm[: m - rest]])
        idx = torch.cat([idx, last[None]])
        v = torch.zeros(1, m, dtype=torch.bool)
        v[0, :rest] = True
        valid = torch.cat([valid, v])
    return idx, valid


def accumulate(
    acc: Accumulator,
    x,
    y: torch.Tensor,
    *,
    hessian: str = "ggn",
    loss: PairLoss | None = None,
    mining_batch: int = 16,
    chunk: int = 256,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Curvature:
    """Feed `acc` the curvature of the contrastive loss (hessian="ggn", in loss.distance's geometry)
    or JtJ ("jtj": sum_n J_n^T J_n, the regression GGN with sigma 1 summed over the N items, which is
    laplace-torch's `Laplace(model, "regression")` H; independent of the distance) of its model on
    (x [N, ...], y [N]); x is a tensor or a `bench.data.Split` (inputs fetched with `x.inputs(idx)`).

    Pairs are mined in batches of `mining_batch` items drawn like training (seeded permutation of the
    data), with the trained model's embeddings; `chunk` items (rounded to whole mining batches, fewer
    when their Jacobians would exceed `chunk_budget`, at least one batch) share one Jacobian.
    stats: items, rows of M, output/parameter-space kept and dropped curvature.
    """
    if hessian not in HESSIANS:
        raise BenchError(f"hessian must be ggn or jtj, got {hessian!r}")
    loss = loss or PairLoss()
    acc.check_supported(hessian, loss.distance)
    model = acc.model
    pdtype = next(model.parameters()).dtype
    m = max(2, int(mining_batch))
    idx, valid = _batches(len(y), m, generator)
    nb = idx.shape[0]
    if nb == 0:
        raise BenchError(f"need at least 2 training items for the Hessian, got {len(y)}")
    fetch = x.inputs if hasattr(x, "inputs") else x.__getitem__  # a Split or a tensor of inputs
    x1 = fetch(idx[0, :1]).to(device=acc.device, dtype=pdtype)
    item_bytes = acc.bytes_per_item(x1)
    per_chunk = max(1, items_within(chunk, item_bytes, chunk_budget(acc.device)) // m)
    avail = available_memory(acc.device)
    if m * item_bytes > 0.9 * avail:
        raise BenchError(
            f"{acc.structure} curvature over la_subset={acc.subset} (D={acc.D:,}): one mining batch of "
            f"{m} items needs about {m * item_bytes / 2**30:.1f} GiB of Jacobians but only "
            f"{avail / 2**30:.1f} GiB is free on {acc.device}; use a smaller la_subset (head, "
            f"last_k:<k>), kfac_la or a smaller batch_size"
        )
    stats = {"items": int(valid.sum()), "out_kept": 0.0, "out_dropped": 0.0}

    bar = tqdm(total=nb, desc=f"hessian {acc.structure}", disable=None if progress else True, leave=False)
    for c0 in range(0, nb, per_chunk):
        bidx, bval = idx[c0 : c0 + per_chunk], valid[c0 : c0 + per_chunk].to(acc.device)
        nbc = bidx.shape[0]
        xb = fetch(bidx.reshape(-1)).to(device=acc.device, dtype=pdtype)
        f, J = acc.jacobian(xb)
        with torch.no_grad():
            pairs = None
            if hessian == "ggn":
                F = f.reshape(nbc, m, f.shape[1]).to(acc.dtype)
                pairs = contrastive_pair_curvature(
                    F,
                    y[bidx].to(acc.device),
                    pos_margin=loss.pos_margin,
                    neg_margin=loss.neg_margin,
                    miner_margin=loss.miner_margin,
                    miner_type=loss.miner_type,
                    valid=bval,
                    distance=loss.distance,
                    reduction=loss.reduction,
                )
                kept, dropped = pairs.output_traces()
                stats["out_kept"] += kept
                stats["out_dropped"] += dropped
            acc.add(Chunk(J, bval, pairs))
        bar.update(nbc)
    bar.close()
    curv = acc.result()
    curv.stats = _finish({**stats, **curv.stats})
    return curv


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise BenchError(f"non-finite {what} (the trained model or the data contains inf/NaN)")


def _finish(stats: dict) -> dict:
    tot_o = stats["out_kept"] + stats["out_dropped"]
    tot_p = stats["param_kept"] + stats["param_dropped"]
    stats["dropped_fraction_output"] = stats["out_dropped"] / tot_o if tot_o > 0 else 0.0
    stats["dropped_fraction_param"] = stats["param_dropped"] / tot_p if tot_p > 0 else 0.0
    return stats
