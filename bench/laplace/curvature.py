"""The Hessian hot path: GGN (or JtJ) of the contrastive loss, full / diagonal / Kronecker-factored.

For a chunk of nb mining batches of m items, with J_b [m*d, D] the stacked embedding Jacobian of
batch b and L_b the (PSD-clamped) block Laplacian of its mined pairs (`bench.laplace.pairs`),

    H = sum_b J_b^T L_b J_b = sum_b M_b^T M_b,     M_b = V_b^T J_b,  L_b = V_b V_b^T  (eigh, r <= m*d rows),

so the full GGN costs one [B*d, D] Jacobian, one small batched product V^T J and one symmetric
rank-k update per chunk, however many pairs the miner yields. For hessian="jtj" (the seed's proxy,
identity output Hessian per item) M is J itself. Full: H += M^T M through BLAS syrk on the upper
triangle (CPU, half the GEMM flops) or a blocked upper-triangular addmm (CUDA); diag: H += sum of
squares of M's columns (never forms J^T J); last layer: the same on the closed-form Jacobian.

Kronecker factors per Linear layer l (parameters [W | b], row-major), with B_i = df_i/ds_l [d, out]
and a_i the layer input with a 1 appended:
  jtj:  G = sum_i B_i^T B_i,  A = mean_i a_i a_i^T             (standard KFAC, exact for one item)
  ggn:  G = sum_pairs w (B_a + B_b)^T A+ (B_a + B_b) / 4,  A = mean_pairs (a_a - a_b)(a_a - a_b)^T
The pair form approximates the pair's exact contribution sum_e (B_a^T u_e (x) a_a - B_b^T u_e (x) a_b)
(...)^T by g (x) (a_a - a_b) with g the mean of the two output-Jacobian terms: exact for the last
layer (B_a = B_b = I) and one pair; it keeps the translation invariance (the last bias gets none).
H_l ~= G (x) A.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bench.errors import BenchError
from bench.laplace import jacobians as jac
from bench.laplace.pairs import contrastive_pair_curvature, laplacian_factor, psd_split

STRUCTURES = ("full", "diag", "kron")
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
    psd: str = "clamp"

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
    curv.stats["scale"] = curv.stats.get("scale", 1.0) * factor
    return curv


def compute_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, structure: str = "full",
                      subset: str = "all", hessian: str = "ggn", loss: PairLoss | None = None,
                      mining_batch: int = 16, chunk: int = 256, dtype: torch.dtype | None = None,
                      generator: torch.Generator | None = None, progress: bool = False) -> Curvature:
    """The curvature of the contrastive loss (or JtJ) of `model` on (x [N, in], y [N]).

    structure: full | diag | kron; subset: all | last_layer (kron needs all); hessian: ggn | jtj.
    Pairs are mined in batches of `mining_batch` items drawn like training (seeded permutation of
    the data), with the trained model's embeddings; `chunk` items (rounded to whole mining batches)
    share one Jacobian. dtype: accumulation dtype (default: the model's). Formulas: module docstring.
    stats: items, rows of M, output/parameter-space kept and dropped curvature.
    """
    if structure not in STRUCTURES:
        raise BenchError(f"structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
    if hessian not in HESSIANS:
        raise BenchError(f"hessian must be ggn or jtj, got {hessian!r}")
    if structure == "kron" and subset != "all":
        raise BenchError("the Kronecker-factored structure covers all layers (subset='all')")
    loss = loss or PairLoss()
    if structure == "kron" and loss.psd != "clamp":
        raise BenchError("the Kronecker-factored structure needs psd='clamp'")
    device = next(model.parameters()).device
    pdtype = next(model.parameters()).dtype
    dtype = dtype or pdtype
    names = jac.subset_names(model, subset)
    D = sum(dict(model.named_parameters())[n].numel() for n in names)
    m = max(2, int(mining_batch))
    idx, valid = _batches(len(y), m, generator)
    per_chunk = max(1, chunk // m)
    nb = idx.shape[0]
    if nb == 0:
        raise BenchError(f"need at least 2 training items for the Hessian, got {len(y)}")

    acc: SymmetricAccumulator | None = None
    Hd: torch.Tensor | None = None
    kron_G: list[torch.Tensor] = []
    kron_A: list[torch.Tensor] = []
    kron_n = 0
    if structure == "full":
        check_full_memory(D, dtype, device, "full_la" if subset == "all" else "last_layer_la")
        acc = SymmetricAccumulator(D, dtype, device)
    elif structure == "diag":
        Hd = torch.zeros(D, dtype=dtype, device=device)
    else:
        for layer in jac.linear_layers(model):
            kron_G.append(torch.zeros(layer.out_features, layer.out_features, dtype=dtype, device=device))
            kron_A.append(torch.zeros(layer.in_features + 1, layer.in_features + 1, dtype=dtype, device=device))
    stats = {"items": int(valid.sum()), "rows": 0, "out_kept": 0.0, "out_dropped": 0.0,
             "param_kept": 0.0, "param_dropped": 0.0}

    bar = tqdm(total=nb, desc=f"hessian {structure}", disable=None if progress else True, leave=False)
    for c0 in range(0, nb, per_chunk):
        bidx, bval = idx[c0:c0 + per_chunk], valid[c0:c0 + per_chunk]
        nbc = bidx.shape[0]
        xb = x[bidx.reshape(-1)].to(device=device, dtype=pdtype)
        yb = y[bidx].to(device)
        bval = bval.to(device)
        if structure == "kron":
            f, layers = jac.layer_quantities(model, xb)
        else:
            J = (jac.last_layer_jacobian(model, xb) if subset == "last_layer"
                 else jac.embedding_jacobian(model, xb, names))  # [nbc*m, d, D]
            with torch.no_grad():
                f = model(xb)
            J = J.to(dtype)
        d = f.shape[1]
        F = f.reshape(nbc, m, d).to(dtype)
        with torch.no_grad():
            if hessian == "ggn":
                pc = contrastive_pair_curvature(F, yb, pos_margin=loss.pos_margin, neg_margin=loss.neg_margin,
                                                miner_margin=loss.miner_margin, miner_type=loss.miner_type,
                                                valid=bval)
            if structure == "kron":
                _kron_update(kron_G, kron_A, layers, pc if hessian == "ggn" else None, bval, nbc, m, dtype)
                kron_n += int(pc.W_pos.gt(0).sum()) if hessian == "ggn" else int(bval.sum())
                if hessian == "ggn":
                    _, _, st = psd_split(pc, loss.psd)
                    stats["out_kept"] += st["out_kept"]
                    stats["out_dropped"] += st["out_dropped"]
                bar.update(nbc)
                continue
            if hessian == "ggn":
                Lk, Ld, st = psd_split(pc, loss.psd)
                stats["out_kept"] += st["out_kept"]
                stats["out_dropped"] += st["out_dropped"]
                Jb = J.reshape(nbc, m * d, D)
                if loss.psd == "none":
                    # indefinite L: split into +/- parts so M^T M - N^T N = J^T L J
                    ev, Q = torch.linalg.eigh(Lk)
                    Vp = Q * ev.clamp_min(0).sqrt()[:, None, :]
                    Vn = Q * (-ev).clamp_min(0).sqrt()[:, None, :]
                    M = torch.bmm(Vp.transpose(1, 2), Jb).reshape(-1, D)
                    Mn = torch.bmm(Vn.transpose(1, 2), Jb).reshape(-1, D)
                    stats["param_kept"] += float(M.pow(2).sum() - Mn.pow(2).sum())
                    if structure == "full":
                        acc.update(M)  # type: ignore[union-attr]
                        _neg_update(acc, Mn)  # type: ignore[arg-type]
                    else:
                        Hd += M.pow(2).sum(0) - Mn.pow(2).sum(0)  # type: ignore[operator]
                    stats["rows"] += M.shape[0]
                    bar.update(nbc)
                    continue
                V = laplacian_factor(Lk)
                M = torch.bmm(V.transpose(1, 2), Jb).reshape(-1, D)
                Vd = laplacian_factor(-Ld)
                if Vd.shape[-1]:
                    stats["param_dropped"] += float(torch.bmm(Vd.transpose(1, 2), Jb).pow(2).sum())
            else:
                M = (J * bval.reshape(-1)[:, None, None]).reshape(-1, D)
            stats["param_kept"] += float(M.pow(2).sum())
            stats["rows"] += M.shape[0]
            if structure == "full":
                acc.update(M)  # type: ignore[union-attr]
            else:
                Hd += M.pow(2).sum(0)  # type: ignore[operator]
        bar.update(nbc)
    bar.close()

    if structure == "full":
        H = acc.result()  # type: ignore[union-attr]
        # H is a sum of squares of M's entries: finite iff every M was (checked through the sum)
        if not math.isfinite(stats["param_kept"]):
            raise BenchError("non-finite Hessian (the trained model or the data contains inf/NaN)")
        return Curvature(structure, subset, names, D, H=H, stats=_finish(stats))
    if structure == "diag":
        _check_finite(Hd, "Hessian diagonal")  # type: ignore[arg-type]
        return Curvature(structure, subset, names, D, H=Hd, stats=_finish(stats))
    factors = []
    for G, A in zip(kron_G, kron_A):
        A = A / max(kron_n, 1)
        _check_finite(G, "Kronecker factor")
        _check_finite(A, "Kronecker factor")
        factors.append(KronFactor(G, A))
    stats["pseudo_samples"] = kron_n
    return Curvature(structure, subset, names, D, kron=factors, stats=_finish(stats))


def _neg_update(acc: SymmetricAccumulator, Mn: torch.Tensor) -> None:
    """H -= Mn^T Mn (only for psd='none', tests): a syrk with alpha=-1."""
    if Mn.shape[0] == 0:
        return
    acc.flush()
    if acc.use_blas:
        a = Mn.to(acc.dtype).detach().cpu().numpy().T
        out = acc._syrk(-1.0, a, beta=1.0, c=acc._np, trans=0, lower=0, overwrite_c=1)
        if not np.shares_memory(out, acc._np):
            acc._np[...] = out
    else:
        acc.H -= (Mn.T @ Mn).triu()


def _kron_update(Gs: list[torch.Tensor], As: list[torch.Tensor], layers: list, pc, valid: torch.Tensor,
                 nbc: int, m: int, dtype: torch.dtype) -> None:
    """Accumulate the per-layer factors of one chunk (formulas in the module docstring)."""
    if pc is None:  # jtj: items
        keep = valid.reshape(-1)
        for G, A, (a, B) in zip(Gs, As, layers):
            a, B = a[keep].to(dtype), B[keep].to(dtype)
            G += torch.einsum("nko,nkp->op", B, B)
            A += a.T @ a
        return
    bi, ai, bj = torch.nonzero(pc.W_pos > 0, as_tuple=True)  # active (kept) pairs
    if bi.numel() == 0:
        return
    w = pc.W_pos[bi, ai, bj]
    Ap = pc.A_pos[bi, ai, bj] * w[:, None, None]  # [P, d, d]
    ia, ib = bi * m + ai, bi * m + bj
    for G, A, (a, B) in zip(Gs, As, layers):
        a, B = a.to(dtype), B.to(dtype)
        Bbar = 0.5 * (B[ia] + B[ib])  # [P, d, out]
        G += torch.einsum("pko,pkl,plq->oq", Bbar, Ap, Bbar)
        da = a[ia] - a[ib]
        A += da.T @ da


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise BenchError(f"non-finite {what} (the trained model or the data contains inf/NaN)")


def _finish(stats: dict) -> dict:
    tot_o = stats["out_kept"] + stats["out_dropped"]
    tot_p = stats["param_kept"] + stats["param_dropped"]
    stats["dropped_fraction_output"] = stats["out_dropped"] / tot_o if tot_o > 0 else 0.0
    stats["dropped_fraction_param"] = stats["param_dropped"] / tot_p if tot_p > 0 else 0.0
    return stats
