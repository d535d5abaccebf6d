"""Embedding Jacobians: torch.func per-sample Jacobians over a parameter subset, the last layer's
closed form, and the per-layer quantities Kronecker factors need.

A flat parameter vector concatenates the subset's parameters in `named_parameters` order, each
flattened row-major (Linear weight [out, in], then bias [out]).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from bench.errors import BenchError
from bench.environment import cpu_threads

SUBSETS = ("all", "last_layer")
SMALL_OP_THREADS = 1


def last_linear(model: nn.Module) -> nn.Linear:
    """The output Linear layer (`model.last_linear` when defined, else the last nn.Linear)."""
    layer = getattr(model, "last_linear", None)
    if isinstance(layer, nn.Linear):
        return layer
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BenchError("the model has no nn.Linear layer; Laplace methods need one")
    return linears[-1]


def subset_names(model: nn.Module, subset: str) -> list[str]:
    """Parameter names of `subset`: 'all' trainable parameters or the 'last_layer' (weight, bias)."""
    if subset == "all":
        return [n for n, p in model.named_parameters() if p.requires_grad]
    if subset == "last_layer":
        ids = {id(p) for p in last_linear(model).parameters()}
        return [n for n, p in model.named_parameters() if id(p) in ids]
    raise BenchError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")


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
        out[n] = theta[..., i:i + k].reshape(*lead, *params[n].shape)
        i += k
    return out


def subset_jacobian(model: nn.Module, x: torch.Tensor, subset: str, names: list[str]) -> torch.Tensor:
    """J [n, d, D] w.r.t. the named parameters: the closed form for the last layer or for a stack of
    Linear layers (`linear_jacobian`), else torch.func (`embedding_jacobian`)."""
    if subset == "last_layer":
        return last_layer_jacobian(model, x)
    J = linear_jacobian(model, x, names)
    return embedding_jacobian(model, x, names) if J is None else J


def small_op_threads(device: torch.device):
    """A context with SMALL_OP_THREADS CPU threads for the many small ops of a chunk's Jacobian factors
    (a no-op on a GPU): with 2 threads and the other core busy, a [256, 784] x [784, 16] product took
    20-30 ms instead of 0.15 ms (OpenMP barriers); the closed-form Jacobian of 1024 items 1.0 s vs 0.12 s."""
    return cpu_threads(SMALL_OP_THREADS, device)


def linear_factors(model: nn.Module, x: torch.Tensor, names: list[str]
                   ) -> list[tuple[torch.Tensor | None, torch.Tensor]] | None:
    """Per named parameter (a [n, in] for a weight, None for a bias; B [n, d, out]) when every named
    parameter is the weight or bias of an nn.Linear layer that runs once per forward and no BatchNorm
    in train mode couples the items: with a the layer's input and B = d f / d s for its output s,
    d f / d W = B (x) a^T (row-major) and d f / d b = B. B comes from d batched backward passes
    (`_layer_quantities`): about d + 1 forward passes for the whole chunk. None otherwise."""
    if any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
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
    calls = {id(l): 0 for l in layers}
    hooks = [l.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls[id(m)] + 1)) for l in layers]
    try:
        with small_op_threads(x.device):
            found = _layer_quantities(model, x, layers)
    finally:
        for h in hooks:
            h.remove()
    if found is None or any(c != 1 for c in calls.values()):
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
        return torch.cat([B if a is None else (B[:, :, :, None] * a[:, None, None, :]).reshape(n, B.shape[1], -1)
                          for a, B in factors], dim=-1)


def embedding_jacobian(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Per-sample Jacobians J [n, d, D] of f(x_i) w.r.t. the named parameters (vmap(jacrev)).

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
def _capture_inputs(layers: list[nn.Linear]) -> Iterator[list]:
    store: list = [None] * len(layers)
    hooks = []
    for i, layer in enumerate(layers):
        def hook(mod: nn.Module, inp: tuple, out: torch.Tensor, i: int = i) -> None:
            store[i] = (inp[0], out)
        hooks.append(layer.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def last_layer_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi [n, h], f [n, d]): the input of the last Linear layer and the embedding."""
    with torch.no_grad(), _capture_inputs([last_linear(model)]) as store:
        f = model(x)
    return store[0][0], f


def last_layer_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Closed form J [n, d, d*h + d] of f = W phi + b w.r.t. (W row-major, b): J = [I_d (x) phi^T, I_d]."""
    phi, f = last_layer_features(model, x)
    n, h = phi.shape
    d = f.shape[1]
    eye = torch.eye(d, dtype=phi.dtype, device=phi.device)
    JW = (eye[None, :, :, None] * phi[:, None, None, :]).reshape(n, d, d * h)
    return torch.cat([JW, eye.expand(n, d, d)], dim=-1)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The nn.Linear layers in forward order (the Kronecker-factored structure works per layer)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    other = [n for n, p in model.named_parameters()
             if p.requires_grad and not any(p is q for m in layers for q in m.parameters())]
    if other:
        raise BenchError(f"kfac_la supports nets of Linear layers only; unsupported parameters: {other[:3]}")
    return layers


def layer_quantities(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(f [n, d], [(a_tilde [n, in+1], B [n, d, out]) per Linear layer]).

    a_tilde is the layer input with a trailing 1 (bias), B = d f / d s the Jacobian of the embedding
    w.r.t. the layer's output s. The Jacobian w.r.t. the layer's [W | b] (row-major) is B (x) a_tilde^T.
    B comes from d backward passes of f[:, k].sum() (samples are independent: no batch coupling).
    """
    found = _layer_quantities(model, x, linear_layers(model))
    if found is None:
        raise BenchError("the Linear layers' outputs do not require grad; Laplace needs trainable weights")
    f, qs = found
    return f, [(torch.cat([a, torch.ones_like(a[:, :1])], dim=1), B) for a, B in qs]


def _layer_quantities(model: nn.Module, x: torch.Tensor, layers: list[nn.Linear]
                      ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """(f [n, d], [(a [n, in], B [n, d, out]) per layer]): the embedding, each layer's input and
    d f / d (its output), by d backward passes of f[:, k].sum(); None when an output does not require grad."""
    with torch.enable_grad(), _capture_inputs(layers) as store:
        f = model(x)
        outs = [s for (_, s) in store]
        if not all(s is not None and s.requires_grad for s in outs):
            return None
        d = f.shape[1]
        Bs: list[list[torch.Tensor]] = [[] for _ in layers]
        for k in range(d):
            grads = torch.autograd.grad(f[:, k].sum(), outs, retain_graph=k < d - 1)
            for i, g in enumerate(grads):
                Bs[i].append(g)
    return f.detach(), [(a.detach(), torch.stack(B, dim=1)) for (a, _), B in zip(store, Bs)]
