"""One class per curvature structure, registered by key (laplace-torch's pattern of one class per
structure with a `_key`). A structure owns everything in which structures differ:

- its accumulator (`bench.la.curvature`), its posterior (`bench.la.posterior`) and the parameter
  subset `la_subset=auto` gives it (`resolve_subset`);
- what curvature it can take (`check_supported`: the hessian and the distance);
- its curvature's arithmetic: the trace, a copy scaled by a temperature (`scaled`), the in-place
  scaling (`scale_`) and the diagonal;
- its basis for the scaled family (`family_basis`: the eigenvalues of H and the projection of items'
  Jacobians onto the eigenvectors, `bench.la.family.ScaledFamily`);
- its online update (`bench.la.online`): the accumulator for a Bayesian module, the running sums'
  buffers, their update, the mean over posterior draws and the current curvature.

No other code compares structure names: adding a structure is one new subclass here, decorated with
`@register_structure`, plus its test (docs/architecture.md, "How to add a curvature structure").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from bench.errors import BenchError
from bench.la import jacobians as jac
from bench.la.curvature import (
    Accumulator,
    Curvature,
    DiagGGN,
    FullGGN,
    KronFactor,
    KronGGN,
    LastLayerGGN,
    accumulate,
)
from bench.la.lowrank import MAX_RANK_FRACTION, Eigenbasis, krylov_nystrom
from bench.la.online_heads import (
    LinearHeadFullGGN,
    LinearHeadKronGGN,
    LinearHeadLaplacianDiag,
    LinearHeadPairDiag,
    LinearHeadPairFull,
    single_linear,
)
from bench.la.posterior import (
    EXACT_EIG_MAX_D,
    DiagPosterior,
    FullPosterior,
    KronPosterior,
    Posterior,
    kron_eig,
)
from bench.la.spectrum import Spectrum, exact_spectrum
from bench.la.subsets import check_la_subset, declared_head

# project(x) -> (f [n, d] the MAP embeddings, A [n, d, k] the Jacobian in the basis, J [n, d, D] or None:
# the plain Jacobian when the basis does not span R^D, for the tail J (I - V V^T) J^T)
Project = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
FamilyBasis = tuple[torch.Tensor, Spectrum, Project, Eigenbasis | None]  # (lam, spectrum, project, basis)

STRUCTURES: dict[str, type[Structure]] = {}


def register_structure(cls: type[Structure]) -> type[Structure]:
    """Class decorator: make `cls` the structure of `cls.key` (its accumulator tags curvatures with it)."""
    if cls.key in STRUCTURES:
        raise ValueError(f"curvature structure {cls.key!r} registered twice")
    if cls.accumulator.structure != cls.key:
        raise ValueError(f"{cls.__name__}: its accumulator tags curvatures {cls.accumulator.structure!r}")
    STRUCTURES[cls.key] = cls
    return cls


def get_structure(key: str) -> type[Structure]:
    """The structure registered as `key`, or a one-line BenchError listing the registered keys."""
    if key not in STRUCTURES:
        raise BenchError(f"structure must be one of {', '.join(STRUCTURES)}, got {key!r}")
    return STRUCTURES[key]


def online_structures() -> tuple[str, ...]:
    """The keys of the structures online Laplace can keep up to date during training."""
    return tuple(k for k, s in STRUCTURES.items() if s.online)


class Structure:
    """A curvature structure (abstract): subclasses set the class attributes and override what differs.
    Every method is a classmethod: a structure is a policy, the data lives in `Curvature`."""

    key: ClassVar[str]
    accumulator: ClassVar[type[Accumulator]]
    posterior: ClassVar[type[Posterior]]
    auto_subset: ClassVar[str] = "all"  # la_subset=auto on a model without `head`
    auto_subset_with_head: ClassVar[str] = "all"  # ... and on a model with one (a CNN backbone)
    fixed_subset: ClassVar[bool] = False  # ignores la_subset (last_layer: always the last Linear)
    online: ClassVar[bool] = False  # online LA can keep it up to date in training

    # -- choice and checks ---------------------------------------------------------------
    @classmethod
    def resolve_subset(cls, la_subset: str, model: nn.Module) -> str:
        """The parameter subset for `la_subset` (auto: the structure's default for this model)."""
        check_la_subset(la_subset)
        if cls.fixed_subset:
            return cls.auto_subset
        if la_subset == "auto":
            return cls.auto_subset_with_head if declared_head(model) is not None else cls.auto_subset
        return la_subset

    @classmethod
    def check_supported(cls, hessian: str, distance: str) -> None:
        """BenchError (one line) when the structure cannot take this curvature (its accumulator's check)."""
        cls.accumulator.check_supported(hessian, distance)

    # -- curvature arithmetic ------------------------------------------------------------
    @classmethod
    def trace(cls, curv: Curvature) -> float:
        """tr(H)."""
        H = curv.H
        assert H is not None
        return float(H.diagonal().sum())

    @classmethod
    def diagonal(cls, curv: Curvature) -> torch.Tensor:
        """diag(H) [D]."""
        assert curv.H is not None
        return curv.H.diagonal()

    @classmethod
    def scaled(cls, curv: Curvature, t: float) -> Curvature:
        """A copy of `curv` multiplied by t; `curv` is untouched."""
        assert curv.H is not None
        return dataclasses.replace(curv, H=curv.H * t)

    @classmethod
    def scale_(cls, curv: Curvature, factor: float) -> Curvature:
        """Multiply `curv` by `factor` in place (e.g. N/n: the full-data GGN from a subset of n of N
        items)."""
        assert curv.H is not None
        curv.H.mul_(factor)
        return curv

    # -- the scaled family's basis -------------------------------------------------------
    @classmethod
    def family_basis(
        cls,
        model: nn.Module,
        curvature: Curvature,
        smallest_ratio: Callable[[Spectrum], float] | None,
        tol: float,
        generator: torch.Generator | None,
        max_rank: int | None,
    ) -> FamilyBasis:
        """(lam, spectrum, project, basis or None) of H ~= V diag(lam) V^T (`bench.la.family`)."""
        raise NotImplementedError

    # -- online --------------------------------------------------------------------------
    @classmethod
    def check_online(cls, subset: str, hessian: str, distance: str) -> None:
        """BenchError (one line) for online settings this structure cannot run."""
        if not cls.online:
            raise BenchError(
                f"online_structure must be one of {', '.join(online_structures())}, got {cls.key!r}"
            )

    @classmethod
    def online_accumulator(cls, module: nn.Module, pair_form: bool = False) -> type[Accumulator]:
        """The accumulator of one online step on the Bayesian module: closed-form Jacobians when it computes
        one nn.Linear (`single_linear`), and with pair_form (hessian=ggn, Euclidean distances) its block
        straight from the pairs (`bench.la.online_heads`)."""
        return cls.accumulator

    @classmethod
    def online_shapes(cls, probe: Accumulator) -> list[tuple[int, int]]:
        """The running sums' shapes for an accumulator of the Bayesian module."""
        return [(probe.D, probe.D)]

    @classmethod
    def init_online(
        cls, state: nn.Module, shapes: list[tuple[int, int]], init: float, dtype: torch.dtype
    ) -> None:
        """Register the running sum S as a buffer of `state` (init: its start, LAM's H_0 = N)."""
        ((D, _),) = shapes
        state.register_buffer("S", torch.eye(D, dtype=dtype) * init)

    @classmethod
    def online_dtype(cls, state: nn.Module) -> torch.dtype:
        return state.S.dtype

    @classmethod
    def online_add(cls, state: nn.Module, curv: Curvature, memory: float) -> None:
        """S <- m S + h for the step's curvature h."""
        state.S.mul_(memory).add_(curv.H.to(state.S.dtype))

    @classmethod
    def online_curvature(
        cls, state: nn.Module, names: list[str], subset: str, D: int, scale: float | None
    ) -> Curvature:
        """The current H = scale * S / Z (S itself when scale is None; 0 before the first step)."""
        return Curvature(cls.key, subset, names, D, H=_running(state.S, scale, float(state.weight)))

    @classmethod
    def mean_of_draws(cls, total: Curvature | None, curv: Curvature, S: int) -> Curvature:
        """total + curv, the curvature at one of S posterior draws (already carrying 1/S)."""
        if total is None:
            return curv
        total.H = total.H + curv.H
        return total


def _running(S: torch.Tensor, scale: float | None, z: float) -> torch.Tensor:
    """scale * S / z (0 while z = 0), or a copy of S when scale is None."""
    if scale is None:
        return S.clone()
    return S * (scale / z) if z > 0 else torch.zeros_like(S)


def _subset_jacobian(
    model: nn.Module, curvature: Curvature, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f [n, d], J [n, d, D]) over the curvature's parameters, in H's dtype."""
    with torch.no_grad():
        f = model(x)
    return f, jac.subset_jacobian(model, x, curvature.subset, curvature.names).to(curvature.H.dtype)


@register_structure
class Full(Structure):
    """Full H [D, D] over la_subset (auto: all weights, a CNN's head). Family basis: eigh(H) up to
    EXACT_EIG_MAX_D, else a block-Krylov Nystrom basis (`bench.la.lowrank`) grown until t ||H - H_k||
    <= tol delta at the smallest delta / t asked for, at most max_rank columns (D * MAX_RANK_FRACTION)."""

    key, accumulator, posterior = "full", FullGGN, FullPosterior
    auto_subset_with_head = "head"

    @classmethod
    def family_basis(cls, model, curvature, smallest_ratio, tol, generator, max_rank):
        H = curvature.H
        assert H is not None
        if curvature.D <= EXACT_EIG_MAX_D:
            lam, U = torch.linalg.eigh(H.double())
            lam, U = lam.clamp_min(0), U.to(H.dtype)

            def project(x):
                f, J = _subset_jacobian(model, curvature, x)
                return f, J @ U, None

            return lam, exact_spectrum(lam), project, None
        ratio = smallest_ratio or (lambda spectrum: 1.0)
        limit = int(max_rank or curvature.D * MAX_RANK_FRACTION)
        basis, _ = krylov_nystrom(
            H, lambda b: ratio(b.spectrum()), tol, max_rank=limit, generator=generator, keep_last=True
        )
        V = basis.eigenvectors(H.dtype)  # formed once; scaled copies share it

        def project_lowrank(x):
            f, J = _subset_jacobian(model, curvature, x)
            return f, J @ V, J

        return basis.lam, basis.spectrum(), project_lowrank, basis


@register_structure
class LastLayer(Full):
    """Full H over the last Linear layer whatever la_subset says (closed-form Jacobian); online: the
    full GGN of a head that is one Linear."""

    key, accumulator = "last_layer", LastLayerGGN
    auto_subset = auto_subset_with_head = "last_layer"
    fixed_subset, online = True, True

    @classmethod
    def check_online(cls, subset, hessian, distance):
        if subset != "head":
            raise BenchError(
                "online_structure=last_layer is the full GGN over the last layer: use online_subset=head"
            )

    @classmethod
    def online_accumulator(cls, module, pair_form=False):
        if not single_linear(module):
            return LastLayerGGN
        return LinearHeadPairFull if pair_form else LinearHeadFullGGN


@register_structure
class Diag(Structure):
    """diag(H) [D] over la_subset (auto: all weights). Family basis: the parameter axes, lam = diag(H)."""

    key, accumulator, posterior = "diag", DiagGGN, DiagPosterior
    online = True

    @classmethod
    def trace(cls, curv):
        return float(curv.H.sum())

    @classmethod
    def diagonal(cls, curv):
        return curv.H

    @classmethod
    def family_basis(cls, model, curvature, smallest_ratio, tol, generator, max_rank):
        H = curvature.H

        def project(x):
            f, J = _subset_jacobian(model, curvature, x)
            return f, J, None

        return H, exact_spectrum(H), project, None

    @classmethod
    def online_accumulator(cls, module, pair_form=False):
        if not single_linear(module):
            return DiagGGN
        return LinearHeadPairDiag if pair_form else LinearHeadLaplacianDiag

    @classmethod
    def init_online(cls, state, shapes, init, dtype):
        ((D, _),) = shapes
        state.register_buffer("S", torch.full((D,), init, dtype=dtype))


@register_structure
class Kron(Structure):
    """Kronecker factors per Linear/Conv2d layer, H_l ~= G (x) A (KFAC). Family basis per layer:
    V = Q_G (x) Q_A, lam = lam_G (x) lam_A; the Jacobian in that basis is (B Q_G) (x) (a^T Q_A), never J V.
    Online: the factors kept the KFAC way, S_G as S (scaled), A as the running mean S_A / Z."""

    key, accumulator, posterior = "kron", KronGGN, KronPosterior
    online = True

    @classmethod
    def check_online(cls, subset, hessian, distance):
        if subset != "head":
            raise BenchError(
                "online_structure=kron over all layers samples through an eigendecomposition of every "
                "layer's factors each step (about 40x a plain step on the paper net): use "
                "online_subset=head or diag"
            )
        if hessian == "ggn" and distance != "euclidean":
            raise BenchError(
                "online_structure=kron: the Kronecker GGN needs distance=euclidean (a pair loss of "
                "f_a - f_b); with distance=cosine use diag or last_layer, or hessian=jtj"
            )

    @classmethod
    def trace(cls, curv):
        return float(sum(float(k.G.diagonal().sum()) * float(k.A.diagonal().sum()) for k in curv.kron))

    @classmethod
    def diagonal(cls, curv):
        """diag(G (x) A) = diag(G) diag(A)^T per layer, row-major."""
        return torch.cat(
            [(f.G.diagonal()[:, None] * f.A.diagonal()[None]).reshape(-1) for f in curv.kron or []]
        )

    @classmethod
    def scaled(cls, curv, t):
        return dataclasses.replace(curv, kron=[KronFactor(k.G * t, k.A) for k in curv.kron])

    @classmethod
    def scale_(cls, curv, factor):
        for k in curv.kron:
            k.G.mul_(factor)
        return curv

    @classmethod
    def family_basis(cls, model, curvature, smallest_ratio, tol, generator, max_rank):
        eig = list(kron_eig(curvature))
        lam = torch.cat([Lam.reshape(-1) for _, _, Lam in eig])
        layers = jac.kron_layers(model, curvature.names)

        def project(x):
            f, qs = jac.layer_quantities(model, x, layers)
            parts = []
            for (U, B), (QG, QA, _) in zip(qs, eig):
                P, q = B.to(QG.dtype) @ QG, U.to(QA.dtype) @ QA  # [n, L, d, out], [n, L, in']
                M = torch.einsum("nsko,nsi->nkoi", P, q)  # sum over the layer's L locations
                parts.append(M.reshape(M.shape[0], M.shape[1], -1))
            return f, torch.cat(parts, -1), None

        return lam, exact_spectrum(lam), project, None

    @classmethod
    def online_accumulator(cls, module, pair_form=False):
        return LinearHeadKronGGN if single_linear(module) else KronGGN

    @classmethod
    def online_shapes(cls, probe):
        return [(G.shape[0], A.shape[0]) for G, A in zip(probe.G, probe.A)]

    @classmethod
    def init_online(cls, state, shapes, init, dtype):
        for i, (out, inp) in enumerate(shapes):
            state.register_buffer(f"G{i}", torch.eye(out, dtype=dtype) * init)
            state.register_buffer(f"A{i}", torch.zeros(inp, inp, dtype=dtype))

    @classmethod
    def online_dtype(cls, state):
        return state.G0.dtype

    @classmethod
    def online_add(cls, state, curv, memory):
        """S_G <- m S_G + G and S_A <- m S_A + A per layer."""
        for i, f in enumerate(curv.kron or []):
            getattr(state, f"G{i}").mul_(memory).add_(f.G.to(cls.online_dtype(state)))
            getattr(state, f"A{i}").mul_(memory).add_(f.A.to(cls.online_dtype(state)))

    @classmethod
    def online_curvature(cls, state, names, subset, D, scale):
        """G from S_G as `Structure.online_curvature` scales S; A = S_A / Z (the identity before the first
        step)."""
        z = float(state.weight)
        factors = []
        for i in range(state.n_layers):
            A = getattr(state, f"A{i}")
            A = A / z if z > 0 else torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            factors.append(KronFactor(_running(getattr(state, f"G{i}"), scale, z), A))
        return Curvature(cls.key, subset, names, D, kron=factors)

    @classmethod
    def mean_of_draws(cls, total, curv, S):
        """total + curv, the input factors A averaged over the S draws (G already carries 1/S)."""
        for f in curv.kron:
            f.A = f.A / S
        if total is None:
            return curv
        for a, b in zip(total.kron, curv.kron):
            a.G, a.A = a.G + b.G, a.A + b.A
        return total


# -- entry points by key --------------------------------------------------------------------


def resolve_subset(structure: str, la_subset: str, model: nn.Module) -> str:
    """The parameter subset of `structure` for `la_subset`: auto gives full -> head on a model with a
    head (all otherwise), diag and kron -> all, last_layer -> the last Linear whatever la_subset says."""
    return get_structure(structure).resolve_subset(la_subset, model)


def compute_curvature(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    structure: str = "full",
    dtype: torch.dtype | None = None,
    subset: str | None = None,
    accumulator_options: dict | None = None,
    **kw: Any,
) -> Curvature:
    """The curvature of `structure` (full | last_layer | diag | kron) over `subset` (the structure's
    default when None): `accumulate` (its keywords) into that structure's accumulator; dtype: the
    accumulation dtype (default: the model's); accumulator_options: e.g. kron's reduce."""
    acc = get_structure(structure).accumulator(model, dtype, subset, **(accumulator_options or {}))
    return accumulate(acc, x, y, **kw)


def make_posterior(model: nn.Module, curvature: Curvature, delta: float) -> Posterior:
    """The posterior matching the curvature's structure, with prior precision delta."""
    return get_structure(curvature.structure).posterior(model, curvature, delta)


def scale_curvature(curv: Curvature, factor: float) -> Curvature:
    """Multiply the curvature by `factor` in place (its structure's `scale_`)."""
    return get_structure(curv.structure).scale_(curv, factor)


def scaled_curvature(curv: Curvature, t: float) -> Curvature:
    """A copy of `curv` multiplied by t (its structure's `scaled`); `curv` is untouched."""
    return get_structure(curv.structure).scaled(curv, t)


def curvature_trace(curv: Curvature) -> float:
    """tr(H) (its structure's `trace`)."""
    return get_structure(curv.structure).trace(curv)
