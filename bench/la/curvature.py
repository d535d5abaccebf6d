"""The Hessian hot path: the GGN (or JtJ) of the contrastive loss, one accumulator per structure
(full, last layer, diagonal, Kronecker) fed chunk by chunk by one driver, `accumulate`."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bench.errors import BenchError
from bench.la import jacobians as jac
from bench.la.pairs import (PairCurvature, clamped_laplacians, contrastive_pair_curvature, kept_laplacian,
                            laplacian_factor)

HESSIANS = ("ggn", "jtj")


@dataclass
class KronFactor:
    """One Linear layer's factors: H_l ~= G (x) A for the layer's [W | b] flattened row-major."""

    G: torch.Tensor  # [out, out]
    A: torch.Tensor  # [in+1, in+1]


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


@dataclass
class PairLoss:
    """What defines the pairs (the training loss and miner, `bench.train.make_loss_and_miner`)."""

    pos_margin: float = 0.0
    neg_margin: float = 1.0
    miner_margin: float = 0.2
    miner_type: str = "all"

    @classmethod
    def from_config(cls, cfg) -> "PairLoss":
        return cls(cfg.pos_margin, cfg.neg_margin, cfg.miner_margin, cfg.miner_type)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------

def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device` (CUDA: mem_get_info; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def full_memory_bytes(D: int, dtype: torch.dtype) -> int:
    """Peak bytes of a full posterior: H and its Cholesky factor, two D x D matrices."""
    return 2 * D * D * torch.empty((), dtype=dtype).element_size()


def check_full_memory(D: int, dtype: torch.dtype, device: torch.device, method: str = "full_la",
                      available: int | None = None) -> None:
    """BenchError (one line) when two D x D matrices will not fit in 90% of the free memory."""
    need = full_memory_bytes(D, dtype)
    avail = available_memory(device) if available is None else available
    if need > 0.9 * avail:
        raise BenchError(
            f"{method}: a full {D}x{D} {str(dtype).replace('torch.', '')} posterior needs about "
            f"{need / 2**30:.1f} GiB but only {avail / 2**30:.1f} GiB is free on {device}; "
            f"use last_layer_la, diag_la or kfac_la (or a smaller net)")


# ---------------------------------------------------------------------------------------------
# symmetric rank-k update
# ---------------------------------------------------------------------------------------------

class SymmetricAccumulator:
    """H [D, D] += M^T M for row blocks M [k, D], touching only the upper triangle.

    CPU: BLAS ?syrk (scipy) into a column-major buffer: k*D*(D+1) flops instead of 2*k*D^2.
    Other devices: upper-triangular blocks by addmm (about half the flops for many blocks).
    `result()` mirrors the upper triangle into the lower one (in place, block by block).
    """

    def __init__(self, D: int, dtype: torch.dtype, device: torch.device, block: int = 2048,
                 use_blas: bool | None = None, flush_rows: int = 2048) -> None:
        self.D, self.dtype, self.device = D, dtype, device
        self.flush_rows = flush_rows
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0
        self.use_blas = (device.type == "cpu" and dtype in (torch.float32, torch.float64)) if use_blas is None else use_blas
        if self.use_blas:
            from scipy.linalg import blas
            self._np = np.zeros((D, D), dtype=np.float32 if dtype == torch.float32 else np.float64, order="F")
            self._syrk = blas.ssyrk if dtype == torch.float32 else blas.dsyrk
            self.H = torch.from_numpy(self._np)  # strides (1, D): H[i, j] is _np[i, j]
        else:
            self.H = torch.zeros(D, D, dtype=dtype, device=device)
        nblk = max(1, math.ceil(D / block))
        size = math.ceil(D / nblk)
        self.bounds = [(i, min(i + size, D)) for i in range(0, D, size)]

    def update(self, M: torch.Tensor) -> None:
        """H += M^T M (upper triangle only). Rows are buffered up to `flush_rows` so that each BLAS
        call is a large rank-k update (syrk runs at ~20 GFLOP/s for k=256, ~70 for k>=1024 here)."""
        if M.shape[0] == 0:
            return
        self._pending.append(M.to(self.dtype))
        self._pending_rows += M.shape[0]
        if self._pending_rows >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Apply the buffered rows."""
        if not self._pending:
            return
        M = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_rows = [], 0
        if self.use_blas:
            a = M.detach().cpu().numpy().T  # [D, k] column-major view, no copy
            out = self._syrk(1.0, a, beta=1.0, c=self._np, trans=0, lower=0, overwrite_c=1)
            if not np.shares_memory(out, self._np):  # f2py copied: keep the result
                self._np[...] = out
            return
        for bi, (i0, i1) in enumerate(self.bounds):
            Mi = M[:, i0:i1].T
            for (j0, j1) in self.bounds[bi:]:
                self.H[i0:i1, j0:j1].addmm_(Mi, M[:, j0:j1])

    def result(self) -> torch.Tensor:
        """The symmetric H (the accumulator's memory, mirrored in place)."""
        self.flush()
        H = self.H
        for bi, (i0, i1) in enumerate(self.bounds):
            blk = H[i0:i1, i0:i1]
            blk.copy_(blk.triu() + blk.triu(1).T)
            for (j0, j1) in self.bounds[bi + 1:]:
                H[j0:j1, i0:i1] = H[i0:i1, j0:j1].T
        return H


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
    """Curvature of one structure over the parameter subset `subset`: `jacobian` says what the driver
    computes per item, `add` takes a chunk, `result` returns the Curvature."""

    structure = ""
    subset = "all"

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        p = next(model.parameters())
        self.model, self.device, self.dtype = model, p.device, dtype or p.dtype
        self.names = jac.subset_names(model, self.subset)
        params = dict(model.named_parameters())
        self.D = sum(params[n].numel() for n in self.names)
        self.stats = {"rows": 0, "param_kept": 0.0, "param_dropped": 0.0}

    def jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(f [n, d], the per-item quantity `add` needs) for the items x."""
        raise NotImplementedError

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

        H = sum_b J_b^T L_b J_b = sum_b M_b^T M_b,     M_b = V_b^T J_b,  L_b = V_b V_b^T  (eigh, r <= m*d rows),

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
    """Full H [D, D] over all weights: M^T M through BLAS syrk on the upper triangle (CPU, half the
    GEMM flops) or a blocked upper-triangular addmm (CUDA), rows buffered into large updates."""

    structure, subset, method = "full", "all", "full_la"

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        super().__init__(model, dtype)
        check_full_memory(self.D, self.dtype, self.device, self.method)
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


class DiagGGN(_RowAccumulator):
    """diag(H) [D]: the sum of squares of M's columns (J^T J is never formed)."""

    structure = "diag"

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        super().__init__(model, dtype)
        self.H = torch.zeros(self.D, dtype=self.dtype, device=self.device)

    def add_rows(self, M: torch.Tensor) -> None:
        self.H += M.pow(2).sum(0)

    def result(self) -> Curvature:
        _check_finite(self.H, "Hessian diagonal")
        return self._curvature(H=self.H)


class KronGGN(Accumulator):
    """Kronecker factors per Linear layer l (parameters [W | b], row-major): H_l ~= G (x) A.

    With B_i = df_i/ds_l [d, out] and a_i the layer input with a 1 appended:
      jtj:  G = sum_i B_i^T B_i,  A = mean_i a_i a_i^T             (standard KFAC, exact for one item)
      ggn:  G = sum_pairs w (B_a + B_b)^T A+ (B_a + B_b) / 4,  A = mean_pairs (a_a - a_b)(a_a - a_b)^T
    The pair form approximates the pair's exact contribution sum_e (B_a^T u_e (x) a_a - B_b^T u_e (x) a_b)
    (...)^T by g (x) (a_a - a_b) with g the mean of the two output-Jacobian terms: exact for the last
    layer (B_a = B_b = I) and one pair; it keeps the translation invariance (the last bias gets none).
    The mean of A runs over the kept pairs (ggn) or the items (jtj): the "pseudo-samples".
    """

    structure = "kron"

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        super().__init__(model, dtype)
        kw = dict(dtype=self.dtype, device=self.device)
        self.G = [torch.zeros(l.out_features, l.out_features, **kw) for l in jac.linear_layers(model)]
        self.A = [torch.zeros(l.in_features + 1, l.in_features + 1, **kw) for l in jac.linear_layers(model)]
        self.n = 0

    def jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        return jac.layer_quantities(self.model, x)

    def add(self, chunk: Chunk) -> None:
        layers, pc, dtype = chunk.J, chunk.pairs, self.dtype
        if pc is None:  # jtj: items
            keep = chunk.valid.reshape(-1)
            self.n += int(chunk.valid.sum())
            for G, A, (a, B) in zip(self.G, self.A, layers):
                a, B = a[keep].to(dtype), B[keep].to(dtype)
                G += torch.einsum("nko,nkp->op", B, B)
                A += a.T @ a
            return
        self.n += int(pc.W_pos.gt(0).sum())
        bi, ai, bj = torch.nonzero(pc.W_pos > 0, as_tuple=True)  # active (kept) pairs
        if bi.numel() == 0:
            return
        m = chunk.valid.shape[1]
        w = pc.W_pos[bi, ai, bj]
        Ap = pc.A_pos[bi, ai, bj] * w[:, None, None]  # [P, d, d]
        ia, ib = bi * m + ai, bi * m + bj
        for G, A, (a, B) in zip(self.G, self.A, layers):
            a, B = a.to(dtype), B.to(dtype)
            Bbar = 0.5 * (B[ia] + B[ib])  # [P, d, out]
            G += torch.einsum("pko,pkl,plq->oq", Bbar, Ap, Bbar)
            da = a[ia] - a[ib]
            A += da.T @ da

    def result(self) -> Curvature:
        factors = []
        for G, A in zip(self.G, self.A):
            A = A / max(self.n, 1)
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
        last = torch.cat([perm[nb_full * m:], perm[:m - rest]])
        idx = torch.cat([idx, last[None]])
        v = torch.zeros(1, m, dtype=torch.bool)
        v[0, :rest] = True
        valid = torch.cat([valid, v])
    return idx, valid


def scale_curvature(curv: Curvature, factor: float) -> Curvature:
    """Multiply the curvature by `factor` in place (for Kronecker factors, G_l is scaled so that
    G_l (x) A_l is); used to estimate the full-data GGN from a subset of n of N items (factor N/n)."""
    if curv.H is not None:
        curv.H.mul_(factor)
    for k in curv.kron or []:
        k.G.mul_(factor)
    return curv


def accumulate(acc: Accumulator, x: torch.Tensor, y: torch.Tensor, *, hessian: str = "ggn",
               loss: PairLoss | None = None, mining_batch: int = 16, chunk: int = 256,
               generator: torch.Generator | None = None, progress: bool = False) -> Curvature:
    """Feed `acc` the curvature of the contrastive loss (hessian="ggn") or JtJ ("jtj") of its model
    on (x [N, ...], y [N]).

    Pairs are mined in batches of `mining_batch` items drawn like training (seeded permutation of the
    data), with the trained model's embeddings; `chunk` items (rounded to whole mining batches) share
    one Jacobian. stats: items, rows of M, output/parameter-space kept and dropped curvature.
    """
    if hessian not in HESSIANS:
        raise BenchError(f"hessian must be ggn or jtj, got {hessian!r}")
    loss = loss or PairLoss()
    model = acc.model
    pdtype = next(model.parameters()).dtype
    m = max(2, int(mining_batch))
    idx, valid = _batches(len(y), m, generator)
    per_chunk = max(1, chunk // m)
    nb = idx.shape[0]
    if nb == 0:
        raise BenchError(f"need at least 2 training items for the Hessian, got {len(y)}")
    stats = {"items": int(valid.sum()), "out_kept": 0.0, "out_dropped": 0.0}

    bar = tqdm(total=nb, desc=f"hessian {acc.structure}", disable=None if progress else True, leave=False)
    for c0 in range(0, nb, per_chunk):
        bidx, bval = idx[c0:c0 + per_chunk], valid[c0:c0 + per_chunk].to(acc.device)
        nbc = bidx.shape[0]
        xb = x[bidx.reshape(-1)].to(device=acc.device, dtype=pdtype)
        f, J = acc.jacobian(xb)
        with torch.no_grad():
            pairs = None
            if hessian == "ggn":
                F = f.reshape(nbc, m, f.shape[1]).to(acc.dtype)
                pairs = contrastive_pair_curvature(F, y[bidx].to(acc.device), pos_margin=loss.pos_margin,
                                                   neg_margin=loss.neg_margin, miner_margin=loss.miner_margin,
                                                   miner_type=loss.miner_type, valid=bval)
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
