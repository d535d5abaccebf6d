"""One factorisation of the curvature H serving the Laplace posterior at every likelihood temperature t
and prior precision delta, Sigma(t, delta) = (t H + delta I)^-1, so a search over (t, delta) or a
sensitivity sweep never refactorises per point.

In an eigenbasis H ~= V diag(lam) V^T (V [D, k]):
    Sigma(t, delta) = V diag(1 / (t lam + delta)) V^T + (I - V V^T) / delta,
    J Sigma J^T     = A diag(1 / (t lam + delta)) A^T + J (I - V V^T) J^T / delta,    A = J V,
so the joint predictive covariance of any group of items is one product with A per (t, delta).
The basis per structure: full with D <= EXACT_EIG_MAX_D (and last layer): eigh(H), V = I_D's rotation
(exact, no tail); full above it: the block-Krylov Nyström basis of `bench.la.lowrank` (rank k, every
covariance within 1 + t ||H - H_k|| / delta of the exact one: `bound`); diag: V = I, lam = diag(H);
Kronecker: per layer V = Q_G (x) Q_A, lam = lam_G (x) lam_A (the Jacobian in that basis is
(B Q_G) (x) (a^T Q_A), never J V).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bench.data import Split
from bench.la.curvature import Curvature
from bench.la.lowrank import Eigenbasis
from bench.la.posterior import LowRankPosterior, Posterior
from bench.la.spectrum import Spectrum
from bench.la.structures import Project, get_structure

CHUNK_ITEMS = 256  # items per Jacobian chunk while projecting


@dataclass
class Projection:
    """Groups of items seen through a family's eigenbasis: f [nb, m, d] the MAP embeddings,
    A [nb, m d, k] their Jacobian in the basis (item-major rows), T [nb, m d, m d] = J (I - V V^T) J^T
    (float64; None when the basis spans R^D), idx [nb, m] the items' indices in their set."""

    f: torch.Tensor
    A: torch.Tensor
    T: torch.Tensor | None
    idx: torch.Tensor


def scaled_basis(basis: Eigenbasis, t: float) -> Eigenbasis:
    """The eigenbasis of t H from that of H (the same vectors)."""
    return dataclasses.replace(
        basis, lam=basis.lam * t, trace=basis.trace * t, residual=basis.residual * t, nu=basis.nu * t
    )


class ScaledFamily:
    """Posteriors N(theta_MAP, (t H + delta I)^-1) for every (t, delta) from one factorisation of H.

    `carried`: the temperature the curvature's H already carries (a caller may have scaled it in
    place); every t given to the family is relative to the accumulated H, i.e. divided by `carried`."""

    def __init__(
        self,
        model: nn.Module,
        curvature: Curvature,
        lam: torch.Tensor,
        spectrum: Spectrum,
        project: Project,
        basis: Eigenbasis | None = None,
        carried: float = 1.0,
    ) -> None:
        self.model, self.curvature, self.lam, self._spectrum = model, curvature, lam.double(), spectrum
        self._project, self.basis, self.carried = project, basis, float(carried)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        curvature: Curvature,
        smallest_ratio: Callable[[Spectrum], float] | None = None,
        tol: float = 0.2,
        generator: torch.Generator | None = None,
        max_rank: int | None = None,
        carried: float = 1.0,
    ) -> ScaledFamily:
        """The family of `curvature`'s structure, on the basis the structure gives
        (`bench.la.structures.Structure.family_basis`). A full H above EXACT_EIG_MAX_D gets a Krylov basis
        grown until t ||H - H_k|| <= tol delta at the smallest delta / t the caller will ask for
        (`smallest_ratio`(spectrum of the basis so far), relative to the curvature as it is), at most
        `max_rank` columns (default D * MAX_RANK_FRACTION; then the last basis, its `bound` recorded)."""
        lam, spectrum, project, basis = get_structure(curvature.structure).family_basis(
            model, curvature, smallest_ratio, tol, generator, max_rank
        )
        return cls(model, curvature, lam, spectrum, project, basis=basis, carried=carried)

    # -- queries ---------------------------------------------------------------------------
    def spectrum(self, t: float = 1.0) -> Spectrum:
        """The spectrum of t H (deflated for a low-rank basis), for the marginal likelihood at t."""
        return self._spectrum.scaled(t / self.carried)

    def bound(self, t: float, delta: float) -> float:
        """Relative bound on the predictive covariance error at (t, delta): 0 for an exact basis, else
        max(t ||H - H_k||, nu) / delta (`bench.la.lowrank.Eigenbasis`)."""
        return 0.0 if self.basis is None else scaled_basis(self.basis, t / self.carried).rel_bound(delta)

    def project(self, x: "torch.Tensor | Split", groups: torch.Tensor) -> Projection:
        """The groups of items x[groups] (a tensor, or a Split's inputs) ([nb, m] indices) through the basis,
        CHUNK_ITEMS items per Jacobian."""
        nb, m = groups.shape
        per = max(1, CHUNK_ITEMS // m)
        fs, As, Ts = [], [], []
        dev = next(self.model.parameters()).device
        fetch = (
            x.inputs if hasattr(x, "inputs") else x.__getitem__
        )  # a Split (images read in batches) or a tensor
        for g0 in range(0, nb, per):
            idx = groups[g0 : g0 + per]
            f, A, J = self._project(fetch(idx.reshape(-1)).to(dev))
            k, d = idx.shape[0], f.shape[1]
            fs.append(f.reshape(k, m, d))
            As.append(A.reshape(k, m * d, A.shape[-1]))
            if J is not None:
                Jg, Ag = J.double().reshape(k, m * d, -1), A.double().reshape(k, m * d, -1)
                Ts.append(Jg @ Jg.mT - Ag @ Ag.mT)
        return Projection(torch.cat(fs), torch.cat(As), torch.cat(Ts) if Ts else None, groups)

    def joint_cov(self, proj: Projection, t: float, delta: float) -> torch.Tensor:
        """[nb, m d, m d] float64: the joint linearised predictive covariance J Sigma(t, delta) J^T of each
        group."""
        g = (1.0 / (self.lam * (t / self.carried) + delta)).to(proj.A.dtype)
        C = torch.bmm(proj.A * g, proj.A.mT).double()
        return C if proj.T is None else C + proj.T / delta

    def posterior(self, t: float, delta: float) -> Posterior:
        """The posterior at (t, delta) from the shared factorisation: a low-rank basis scaled by t, else the
        structure's own posterior on a t-scaled copy of the curvature (no change to the family's)."""
        s = t / self.carried
        if self.basis is not None:
            return LowRankPosterior(self.model, self.curvature, delta, scaled_basis(self.basis, s))
        struct = get_structure(self.curvature.structure)
        return struct.posterior(self.model, struct.scaled(self.curvature, s), delta)
