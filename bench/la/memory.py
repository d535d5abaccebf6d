"""Memory budgeting of the curvature and posterior code: free memory on a device, the size of a full
D x D posterior and the refusal (before allocating) of one that will not fit, and the items one Jacobian
chunk may hold."""

from __future__ import annotations

import os

import torch
from torch import nn

from bench.errors import BenchError
from bench.la import jacobians as jac


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


def check_full_memory(
    D: int,
    dtype: torch.dtype,
    device: torch.device,
    method: str = "full_la",
    available: int | None = None,
    subset: str = "all",
    cheaper: list[str] | None = None,
) -> None:
    """BenchError (one line, before anything is allocated) when two D x D matrices will not fit in 90%
    of the free memory, naming the cheaper choices (`cheaper`, e.g. smaller la_subset values that fit)."""
    need = full_memory_bytes(D, dtype)
    avail = available_memory(device) if available is None else available
    if need > 0.9 * avail:
        alt = "".join(f"{c}, " for c in (cheaper or []))
        raise BenchError(
            f"{method}: a full {D}x{D} {str(dtype).replace('torch.', '')} posterior over "
            f"la_subset={subset} needs "
            f"about {need / 2**30:.1f} GiB but only {avail / 2**30:.1f} GiB is free on {device}; "
            f"use {alt}last_layer_la, diag_la or kfac_la (or a smaller net)"
        )


def fitting_subsets(
    model: nn.Module,
    D: int,
    dtype: torch.dtype,
    available: int,
    candidates: tuple[str, ...] = ("head", "last_k:1"),
) -> list[str]:
    """'la_subset=S (D=...)' for the candidate subsets smaller than D whose full matrix fits in 90% of
    `available`."""
    params, out, seen = dict(model.named_parameters()), [], {D}
    for s in candidates:
        Ds = sum(params[n].numel() for n in jac.subset_names(model, s))
        if Ds not in seen and full_memory_bytes(Ds, dtype) <= 0.9 * available:
            out.append(f"la_subset={s} (D={Ds:,})")
        seen.add(Ds)
    return out


def chunk_budget(device: torch.device) -> int:
    """Bytes one chunk's per-item quantities (Jacobians, layer factors, sampled activations) may take:
    an eighth of the free memory, within [64 MiB, 4 GiB]."""
    return int(min(max(available_memory(device) / 8, 64 * 2**20), 4 * 2**30))


def items_within(requested: int, bytes_per_item: int, budget: int) -> int:
    """min(requested, budget // bytes_per_item), at least 1: the items one chunk may hold."""
    return max(1, min(int(requested), budget // max(int(bytes_per_item), 1)))


def forward_footprint(model: nn.Module, x1: torch.Tensor) -> tuple[int, int]:
    """(d, a) for one item x1 [1, ...]: the embedding dim and the number of activations the forward
    produces (outputs of the leaf modules), to size chunks on any backbone."""
    sizes: list[int] = []
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    hooks = [
        m.register_forward_hook(lambda mod, i, o: sizes.append(o.numel() if torch.is_tensor(o) else 0))
        for m in leaves
    ]
    try:
        with torch.no_grad():
            f = model(x1)
    finally:
        for h in hooks:
            h.remove()
    return int(f.shape[-1]), sum(sizes) // max(len(x1), 1)
