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

SUBSETS = ("all", "last_layer")


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
    """J [n, d, D] w.r.t. the named parameters: the closed form for the last layer, else torch.func."""
    return last_layer_jacobian(model, x) if subset == "last_layer" else embedding_jacobian(model, x, names)


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
    layers = linear_layers(model)
    with torch.enable_grad(), _capture_inputs(layers) as store:
        f = model(x)
        outs = [s for (_, s) in store]
        d = f.shape[1]
        Bs: list[list[torch.Tensor]] = [[] for _ in layers]
        for k in range(d):
            grads = torch.autograd.grad(f[:, k].sum(), outs, retain_graph=k < d - 1)
            for i, g in enumerate(grads):
                Bs[i].append(g)
    res = []
    for (a, _), B in zip(store, Bs):
        a = a.detach()
        res.append((torch.cat([a, torch.ones_like(a[:, :1])], dim=1), torch.stack(B, dim=1)))
    return f.detach(), res
