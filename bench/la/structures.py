"""The structure choice, made once: each structure name maps to its curvature accumulator and posterior."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.errors import BenchError
from bench.la.curvature import Accumulator, Curvature, DiagGGN, FullGGN, KronGGN, LastLayerGGN, accumulate
from bench.la.posterior import DiagPosterior, FullPosterior, KronPosterior, Posterior


@dataclass(frozen=True)
class Structure:
    accumulator: type[Accumulator]
    posterior: type[Posterior]


STRUCTURES = {s.accumulator.structure: s for s in (
    Structure(FullGGN, FullPosterior), Structure(LastLayerGGN, FullPosterior),
    Structure(DiagGGN, DiagPosterior), Structure(KronGGN, KronPosterior))}


def get_structure(name: str) -> Structure:
    if name not in STRUCTURES:
        raise BenchError(f"structure must be one of {', '.join(STRUCTURES)}, got {name!r}")
    return STRUCTURES[name]


def compute_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, structure: str = "full",
                      dtype: torch.dtype | None = None, **kw: Any) -> Curvature:
    """The curvature of `structure` (full | last_layer | diag | kron): `accumulate` (its keywords) into
    that structure's accumulator; dtype: the accumulation dtype (default: the model's)."""
    return accumulate(get_structure(structure).accumulator(model, dtype), x, y, **kw)


def make_posterior(model: nn.Module, curvature: Curvature, delta: float) -> Posterior:
    """The posterior matching the curvature's structure, with prior precision delta."""
    return get_structure(curvature.structure).posterior(model, curvature, delta)
