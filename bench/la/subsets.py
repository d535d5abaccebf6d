"""Which parameters a Laplace posterior covers (`la_subset`): all trainable weights, the model's head, the
last k Linear/Conv2d layers, or last_layer_la's last Linear; the rest stay at theta_MAP.

Contract with the backbones: a CNN model exposes `model.trunk` and `model.head` (an nn.Module); a model
without `head` (the MLP) uses its last nn.Linear as the head.
"""

from __future__ import annotations

import re

from torch import nn

from bench.errors import BenchError
from bench.model import last_linear

LA_SUBSETS = "auto | all | head | last_k:<k>"
_SYNTAX = re.compile(r"auto|all|head|last_k:[1-9][0-9]*")
PARAM_LAYERS = (nn.Linear, nn.Conv2d)  # the "parameterised layers" that last_k counts


def check_la_subset(text: str) -> None:
    """BenchError (one line) unless text is auto, all, head or last_k:<k> with k >= 1."""
    if not isinstance(text, str) or not _SYNTAX.fullmatch(text):
        raise BenchError(f"la_subset must be one of {LA_SUBSETS} (k >= 1), got {text!r}")


NEEDED_BY = "Laplace methods"  # names the methods in `bench.model.last_linear`'s refusal


def declared_head(model: nn.Module) -> nn.Module | None:
    """`model.head` when the model has one with parameters (the backbone contract), else None."""
    head = getattr(model, "head", None)
    return head if isinstance(head, nn.Module) and any(True for _ in head.parameters()) else None


def la_head(model: nn.Module) -> nn.Module:
    """The module la_subset=head covers: the declared head (the CNN backbones), else the last nn.Linear
    (the MLP's output layer)."""
    head = declared_head(model)
    return head if head is not None else last_linear(model, NEEDED_BY)


def param_layers(model: nn.Module) -> list[nn.Module]:
    """The Linear and Conv2d layers in module order (each once)."""
    return [m for m in model.modules() if isinstance(m, PARAM_LAYERS)]


def subset_modules(model: nn.Module, subset: str) -> list[nn.Module] | None:
    """The modules whose parameters form `subset` (None for 'all'): head = `model.head` or else the last
    Linear; last_layer = the last Linear; last_k:k = the last k Linear/Conv2d layers in module order."""
    if subset == "all":
        return None
    if subset == "last_layer":
        return [last_linear(model, NEEDED_BY)]
    if subset == "head":
        return [la_head(model)]
    if subset.startswith("last_k:") and subset[7:].isdigit() and int(subset[7:]) >= 1:
        k, layers = int(subset[7:]), param_layers(model)
        if k > len(layers):
            raise BenchError(f"la_subset={subset}: the model has only {len(layers)} Linear/Conv2d layers")
        return layers[-k:]
    raise BenchError(f"subset must be one of all, head, last_k:<k>, last_layer, got {subset!r}")


def subset_names(model: nn.Module, subset: str) -> list[str]:
    """Parameter names of `subset` in `named_parameters` order: 'all' = every trainable parameter;
    'head', 'last_k:<k>', 'last_layer' = every parameter of those modules (`subset_modules`)."""
    mods = subset_modules(model, subset)
    if mods is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        ids = {id(p) for m in mods for p in m.parameters()}
        names = [n for n, p in model.named_parameters() if id(p) in ids]
    if not names:
        raise BenchError(f"la_subset={subset} selects no trainable parameter of the model")
    return names
