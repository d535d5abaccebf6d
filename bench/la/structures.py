"""The structure choice, made once: each structure name maps to its curvature accumulator, its posterior
and the parameter subset `la_subset=auto` gives it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.errors import BenchError
from bench.la.curvature import Accumulator, Curvature, DiagGGN, FullGGN, KronGGN, LastLayerGGN, accumulate
from bench.la.posterior import DiagPosterior, FullPosterior, KronPosterior, Posterior
from bench.la.subsets import check_la_subset, head_module


@dataclass(frozen=True)
class Structure:
    accumulator: type[Accumulator]
    posterior: type[Posterior]
    auto_subset: str = "all"  # la_subset=auto on a model without `head`
    auto_subset_with_head: str = "all"  # ... and on a model with one (a CNN backbone)
    fixed_subset: bool = False  # ignores la_subset (last_layer_la: always the last Linear)


STRUCTURES = {s.accumulator.structure: s for s in (
    Structure(FullGGN, FullPosterior, auto_subset_with_head="head"),
    Structure(LastLayerGGN, FullPosterior, "last_layer", "last_layer", fixed_subset=True),
    Structure(DiagGGN, DiagPosterior), Structure(KronGGN, KronPosterior))}


def get_structure(name: str) -> Structure:
    if name not in STRUCTURES:
        raise BenchError(f"structure must be one of {', '.join(STRUCTURES)}, got {name!r}")
    return STRUCTURES[name]


def resolve_subset(structure: str, la_subset: str, model: nn.Module) -> str:
    """The parameter subset of `structure` for `la_subset`: auto gives full -> head on a model with a
    head (all otherwise), diag and kron -> all, last_layer -> the last Linear whatever la_subset says."""
    check_la_subset(la_subset)
    s = get_structure(structure)
    if s.fixed_subset:
        return s.auto_subset
    if la_subset == "auto":
        return s.auto_subset_with_head if head_module(model) is not None else s.auto_subset
    return la_subset


def compute_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, structure: str = "full",
                      dtype: torch.dtype | None = None, subset: str | None = None,
                      accumulator_options: dict | None = None, **kw: Any) -> Curvature:
    """The curvature of `structure` (full | last_layer | diag | kron) over `subset` (the structure's
    default when None): `accumulate` (its keywords) into that structure's accumulator; dtype: the
    accumulation dtype (default: the model's); accumulator_options: e.g. kron's reduce."""
    acc = get_structure(structure).accumulator(model, dtype, subset, **(accumulator_options or {}))
    return accumulate(acc, x, y, **kw)


def make_posterior(model: nn.Module, curvature: Curvature, delta: float) -> Posterior:
    """The posterior matching the curvature's structure, with prior precision delta."""
    return get_structure(curvature.structure).posterior(model, curvature, delta)
