"""Embedding Jacobians over a parameter subset (`bench.la.subsets`): torch.func per-sample Jacobians
(the other parameters held fixed), the closed forms for the last layer and for Linear stacks, and the
per-layer quantities Kronecker factors need (Linear inputs and Conv2d's unfolded patches, KFC-style).

A flat parameter vector concatenates the subset's parameters in `named_parameters` order, each
flattened row-major (Linear weight [out, in], Conv2d weight [out, in, kh, kw], then bias [out]).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from bench.environment import cpu_threads
from bench.errors import BenchError
from bench.la.subsets import NEEDED_BY, param_layers, subset_names  # noqa: F401 (subset_names: jac.subset_names)
from bench.model import last_linear

SMALL_OP_THREADS = 1


def flat_params(model: nn.Module, names: list[str]) -> torch.Tensor:
    """The flat vector [D] of the named parameters (detached copy)."""
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names])


def unflatten(model: nn.Module, names: list[str], theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Name -> tensor views of a flat vector [D] (or a batch [S, D] -> [S, *shape])."""
    params = dict(model.named_parameters())
    out, i = {}, 0
    lead = theta.shape[:-1]
    for n in names:
        k = params[n].numel()
        out[n] = theta[..., i : i + k].reshape(*lead, *params[n].shape)
        i += k
    return out


def subset_jacobian(model: nn.Module, x: torch.Tensor, subset: str, names: list[str]) -> torch.Tensor:
    """J [n, d, D] w.r.t. the named parameters: the closed form of the last layer when the embedding is
    its output (`last_layer_jacobian`), of Linear layers (`linear_jacobian`), else torch.func
    (`embedding_jacobian`) on any backbone."""
    J = last_layer_jacobian(model, x) if subset == "last_layer" else None
    if J is None:
        J = linear_jacobian(model, x, names)
    return embedding_jacobian(model, x, names) if J is None else J


def small_op_threads(device: torch.device):
    """A context with SMALL_OP_THREADS CPU threads for the many small ops of a chunk's Jacobian factors
    (a no-op on a GPU): with 2 threads and the other core busy, a [256, 784] x [784, 16] product took
    20-30 ms instead of 0.15 ms (OpenMP barriers); the closed-form Jacobian of 1024 items 1.0 s vs 0.12 s."""
    return cpu_threads(SMALL_OP_THREADS, device)


def _batchnorm_in_train_mode(model: nn.Module) -> bool:
    return any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def linear_factors(
    model: nn.Module, x: torch.Tensor, names: list[str]
) -> list[tuple[torch.Tensor | None, torch.Tensor]] | None:
    """Per named parameter (a [n, in] for a weight, None for a bias; B [n, d, out]) when every named
    parameter is the weight or bias of an nn.Linear layer that runs once per forward on [n, in] inputs
    and no BatchNorm in train mode couples the items: with a the layer's input and B = d f / d s for
    its output s, d f / d W = B (x) a^T (row-major) and d f / d b = B. B comes from d batched backward
    passes (`_layer_quantities`): about d + 1 forward passes for the whole chunk, whatever the backbone
    before the layers (a CNN's trunk runs once). None otherwise."""
    if _batchnorm_in_train_mode(model):
        return None
    owner = {}
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            owner[id(layer.weight)] = (layer, True)
            if layer.bias is not None:
                owner[id(layer.bias)] = (layer, False)
    params = dict(model.named_parameters())
    if not all(id(params[n]) in owner for n in names):
        return None
    layers = list(dict.fromkeys(owner[id(params[n])][0] for n in names))
    with small_op_threads(x.device):
        found = _layer_quantities(model, x, layers, strict=False)
    if found is None or any(a.dim() != 2 for a, _ in found[1]):
        return None
    q = dict(zip(map(id, layers), found[1]))
    out = []
    for name in names:
        layer, is_weight = owner[id(params[name])]
        a, B = q[id(layer)]
        out.append((a if is_weight else None, B))
    return out


def linear_jacobian(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor | None:
    """Closed-form J [n, d, D] from `linear_factors` (None when they do not apply): writing its
    n d D entries is most of the cost, about half of vmap(jacrev)'s on the paper net (1 thread)."""
    factors = linear_factors(model, x, names)
    if factors is None:
        return None
    n = x.shape[0]
    with small_op_threads(x.device):
        return torch.cat(
            [
                B if a is None else (B[:, :, :, None] * a[:, None, None, :]).reshape(n, B.shape[1], -1)
                for a, B in factors
            ],
            dim=-1,
        )


def embedding_jacobian(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Per-sample Jacobians J [n, d, D] of f(x_i) w.r.t. the named parameters (vmap(jacrev)), the
    other parameters and the buffers (BatchNorm statistics, in eval mode) held fixed.

    Reverse mode costs d backward passes per sample, which beats D forward passes (jacfwd) since
    d << D. The caller chunks x so the [n, d, D] block stays bounded.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    sub = {k: params[k] for k in names}

    def f(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**params, **p}, (xi[None],))[0]

    jac = vmap(jacrev(f), in_dims=(None, 0))(sub, x)
    n = x.shape[0]
    return torch.cat([jac[k].reshape(n, jac[k].shape[1], -1) for k in names], dim=-1)


@contextmanager
def _capture(layers: list[nn.Module]) -> Iterator[list[dict]]:
    """Per layer {"inp", "out", "calls"} of the forwards run inside the context (the last call's tensors)."""
    store: list[dict] = [{"calls": 0} for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):

        def hook(mod: nn.Module, inp: tuple, out: torch.Tensor, i: int = i) -> None:
            store[i].update(inp=inp[0], out=out, calls=store[i]["calls"] + 1)

        hooks.append(layer.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def last_layer_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(phi [n, h], f [n, d], is_output): the input of the last Linear layer, the embedding, and whether
    the embedding is that layer's output itself (no normalisation or whitening after it)."""
    with torch.no_grad(), _capture([last_linear(model, NEEDED_BY)]) as store:
        f = model(x)
    s = store[0]
    return s["inp"], f, s["calls"] == 1 and s["inp"].dim() == 2 and s["out"] is f


def last_layer_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Closed form J [n, d, d*h + d] of f = W phi + b w.r.t. (W row-major, b): J = [I_d (x) phi^T, I_d];
    None when the embedding is not the last Linear's output (then `linear_jacobian` applies)."""
    phi, f, is_output = last_layer_features(model, x)
    if not is_output:
        return None
    n, h = phi.shape
    d = f.shape[1]
    eye = torch.eye(d, dtype=phi.dtype, device=phi.device)
    JW = (eye[None, :, :, None] * phi[:, None, None, :]).reshape(n, d, d * h)
    return torch.cat([JW, eye.expand(n, d, d)], dim=-1)


# ---------------------------------------------------------------------------------------------
# per-layer quantities of the Kronecker-factored structure (Linear and Conv2d)
# ---------------------------------------------------------------------------------------------


def kron_layers(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The Linear and Conv2d layers whose weight is among `names`, in module order: the blocks of the
    Kronecker-factored structure (each covers its weight and bias). BenchError for a Conv2d that the
    unfolded-patch factors do not describe (groups > 1, a padding mode other than zeros)."""
    params = dict(model.named_parameters())
    ids = {id(params[n]) for n in names}
    layers = [layer for layer in param_layers(model) if id(layer.weight) in ids]
    for layer in layers:
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
            raise BenchError(
                f"kfac_la: Conv2d with groups={layer.groups}, padding_mode={layer.padding_mode!r} is not "
                "supported (groups=1, zero padding only); use diag_la or la_subset=head"
            )
    if not layers:
        raise BenchError("kfac_la: the parameter subset has no Linear or Conv2d layer")
    return layers


def kron_names(model: nn.Module, layers: list[nn.Module]) -> list[str]:
    """The names of the layers' weights and biases, in `named_parameters` order."""
    ids = {id(p) for layer in layers for p in layer.parameters(recurse=False)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def conv_patches(layer: nn.Conv2d, inp: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches U [n, L, C_in*kh*kw] of a Conv2d (L output locations, patch entries in the
    weight's row-major order), so that the layer's output at location l is W.reshape(out, -1) @ U[:, l] +
    b."""
    pad = layer.padding
    if isinstance(pad, str):  # 'valid' or 'same' (stride 1): torch pads any odd excess at the end
        if pad == "same":
            total = [d * (k - 1) for k, d in zip(layer.kernel_size, layer.dilation)]
            inp = F.pad(
                inp, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
            )
        pad = 0
    U = F.unfold(inp, layer.kernel_size, dilation=layer.dilation, padding=pad, stride=layer.stride)
    return U.transpose(1, 2)


def layer_quantities(
    model: nn.Module, x: torch.Tensor, layers: list[nn.Module], reduce: bool = False
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(f [n, d], per layer (U [n, L, in'], B [n, L, d, out])).

    U holds the layer's inputs at its L weight-sharing locations (a Conv2d's unfolded patches, L =
    H_out W_out; L = 1 for a Linear on [n, in]) with a trailing 1 when the layer has a bias, and
    B[:, l] = d f / d s_l the Jacobian of the embedding w.r.t. the layer's output at location l, so
    the Jacobian w.r.t. the layer's [W | b] (row-major) is exactly sum_l B_l (x) U_l^T. reduce=True
    returns L = 1 with U = mean_l U_l and B = sum_l B_l (KFAC-reduce, Eschenhagen et al. 2023).
    B comes from d backward passes of f[:, k].sum() (items are independent: BatchNorm in eval mode).
    """
    with small_op_threads(x.device):
        f, raw = _layer_quantities(model, x, layers, strict=True)
    out = []
    for layer, (inp, B) in zip(layers, raw):
        n, d = B.shape[:2]
        if isinstance(layer, nn.Conv2d):
            U = conv_patches(layer, inp)
            B = B.flatten(3).permute(0, 3, 1, 2)  # [n, d, out, H, W] -> [n, L, d, out]
        else:
            U = inp.reshape(n, -1, inp.shape[-1])
            B = B.reshape(n, d, -1, B.shape[-1]).transpose(1, 2)
        if layer.bias is not None:
            U = torch.cat([U, torch.ones_like(U[:, :, :1])], dim=2)
        if reduce:
            U, B = U.mean(1, keepdim=True), B.sum(1, keepdim=True)
        out.append((U, B))
    return f, out


def _layer_quantities(
    model: nn.Module, x: torch.Tensor, layers: list[nn.Module], strict: bool
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """(f [n, d], [(input, B [n, d, *output shape]) per layer]): the embedding, each layer's input and
    d f / d (its output), by d backward passes of f[:, k].sum(). When they would be wrong or cannot be
    formed (BatchNorm in train mode couples the items, a layer runs more than once per forward, an
    output does not require grad): None, or with strict=True a BenchError saying which."""

    def fail(why: str) -> None:
        if strict:
            raise BenchError(f"Kronecker-factored Laplace: {why}")

    if _batchnorm_in_train_mode(model):
        return fail("BatchNorm in train mode couples the items; put the model in eval mode")
    with torch.enable_grad(), _capture(layers) as store:
        f = model(x)
        if any(s["calls"] != 1 for s in store):
            return fail("every Linear/Conv2d layer of the subset must run exactly once per forward")
        outs = [s["out"] for s in store]
        if not all(s.requires_grad for s in outs):
            return fail("a layer's output does not require grad (are its weights trainable?)")
        d = f.shape[1]
        Bs: list[list[torch.Tensor]] = [[] for _ in layers]
        for k in range(d):
            grads = torch.autograd.grad(f[:, k].sum(), outs, retain_graph=k < d - 1)
            for i, g in enumerate(grads):
                Bs[i].append(g)
    return f.detach(), [(s["inp"].detach(), torch.stack(B, dim=1)) for s, B in zip(store, Bs)]
