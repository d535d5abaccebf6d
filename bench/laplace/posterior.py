"""Gaussian posteriors N(theta_MAP, (H + delta I)^-1) for full, diagonal and Kronecker curvature:
sampling, the linearised (GLM) predictive covariance J(x) Sigma J(x)^T and log det of the precision.

Full: P = H + delta I = L L^T (Cholesky, jitter escalated if needed); a sample is theta_MAP + L^-T z
(one triangular solve), the GLM covariance of a query is (L^-1 J^T)^T (L^-1 J^T) (triangular solves,
Sigma is never formed). Diagonal: Sigma = diag(1 / (h + delta)). Kronecker, per layer: with
G = Q_G diag(lam) Q_G^T and A = Q_A diag(mu) Q_A^T, H_l + delta I = (Q_G (x) Q_A)(lam (x) mu + delta)(...)^T,
so samples are Q_G (Z / sqrt(lam mu^T + delta)) Q_A^T and, with J_l = B (x) a^T,
cov = sum_{o,i} (B Q_G)[:, o] (B Q_G)[:, o]^T (a^T Q_A)_i^2 / (lam_o mu_i + delta).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from bench.errors import BenchError
from bench.laplace import jacobians as jac
from bench.laplace.curvature import Curvature


log = logging.getLogger("bench")


def jittered_cholesky(P: torch.Tensor, what: str = "posterior precision") -> tuple[torch.Tensor, float]:
    """(L, jitter) with L L^T = P + jitter I; jitter escalates from 0 through 1e-10..1e-4 x mean diag.
    BenchError when P is not positive definite even then."""
    scale = float(P.diagonal().abs().mean()) or 1.0
    for jitter in (0.0, 1e-10, 1e-8, 1e-6, 1e-4):
        P.diagonal().add_(jitter * scale)  # in place: no D x D copy
        try:
            L, info = torch.linalg.cholesky_ex(P)
        finally:
            P.diagonal().sub_(jitter * scale)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            if jitter > 0:
                log.warning("%s was not positive definite; added jitter %.3g to its diagonal", what, jitter * scale)
            return L, jitter * scale
    raise BenchError(f"{what} is not positive definite even with jitter {1e-4 * scale:.3g}; "
                     "try a larger prior precision or hessian_dtype=float64")


class Posterior:
    """Common interface. Deviations are flat vectors in the posterior's own parameter layout."""

    curvature: Curvature
    delta: float

    def logdet_precision(self) -> float:
        raise NotImplementedError

    def sample_params(self, S: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """S parameter sets theta_MAP + eps: name -> [S, *shape] (only the posterior's subset)."""
        raise NotImplementedError

    def glm_cov(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Linearised predictive covariance [n, d, d] = J(x) Sigma J(x)^T."""
        raise NotImplementedError


class _FlatPosterior(Posterior):
    def __init__(self, model: nn.Module, curvature: Curvature) -> None:
        self.model, self.curvature, self.names = model, curvature, curvature.names
        self.theta = jac.flat_params(model, self.names)

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        if self.curvature.subset == "last_layer":
            return jac.last_layer_jacobian(self.model, x)
        return jac.embedding_jacobian(self.model, x, self.names)

    def sample_flat(self, S: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def sample_params(self, S: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        eps = self.sample_flat(S, generator).to(self.theta.dtype)
        return jac.unflatten(self.model, self.names, self.theta[None] + eps)


class FullPosterior(_FlatPosterior):
    """Full covariance from the Cholesky factor of H + delta I (H is kept, not copied)."""

    def __init__(self, model: nn.Module, curvature: Curvature, delta: float, dtype: torch.dtype | None = None) -> None:
        super().__init__(model, curvature)
        H = curvature.H
        assert H is not None and H.dim() == 2
        self.delta = float(delta)
        self.dtype = dtype or H.dtype
        Hd = H if H.dtype == self.dtype else H.to(self.dtype)
        Hd.diagonal().add_(self.delta)
        try:
            self.L, self.jitter = jittered_cholesky(Hd)
        finally:
            Hd.diagonal().sub_(self.delta)

    def logdet_precision(self) -> float:
        return float(2 * self.L.diagonal().log().sum())

    def sample_flat(self, S: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(self.L.shape[0], S, generator=generator, device=generator.device, dtype=self.dtype)
        z = z.to(self.L.device)
        return torch.linalg.solve_triangular(self.L.T, z, upper=True).T  # [S, D], cov (L L^T)^-1

    def glm_cov_from_jacobian(self, J: torch.Tensor) -> torch.Tensor:
        n, d, D = J.shape
        Z = torch.linalg.solve_triangular(self.L, J.reshape(n * d, D).T.to(self.dtype), upper=False)
        Z = Z.reshape(D, n, d)
        return torch.einsum("kia,kib->iab", Z, Z)

    def glm_cov(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.glm_cov_from_jacobian(self.jacobian(x))


class DiagPosterior(_FlatPosterior):
    """Sigma = diag(1 / (h + delta))."""

    def __init__(self, model: nn.Module, curvature: Curvature, delta: float) -> None:
        super().__init__(model, curvature)
        assert curvature.H is not None and curvature.H.dim() == 1
        self.delta = float(delta)
        prec = curvature.H + self.delta
        if not bool((prec > 0).all()):
            raise BenchError("diagonal posterior precision is not positive; use a larger prior precision")
        self.var = 1.0 / prec

    def logdet_precision(self) -> float:
        return float((self.curvature.H + self.delta).log().sum())  # type: ignore[operator]

    def sample_flat(self, S: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(S, self.var.shape[0], generator=generator, device=generator.device, dtype=self.var.dtype)
        return z.to(self.var.device) * self.var.sqrt()

    def glm_cov_from_jacobian(self, J: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nak,k,nbk->nab", J.to(self.var.dtype), self.var, J.to(self.var.dtype))

    def glm_cov(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.glm_cov_from_jacobian(self.jacobian(x))


class KronPosterior(Posterior):
    """Block-diagonal over Linear layers, each (G (x) A + delta I)^-1 through the factors' eigenbases."""

    def __init__(self, model: nn.Module, curvature: Curvature, delta: float) -> None:
        assert curvature.kron is not None
        self.model, self.curvature, self.delta = model, curvature, float(delta)
        self.layers = jac.linear_layers(model)
        names = {id(p): n for n, p in model.named_parameters()}
        self.layer_names = [(names[id(l.weight)], names[id(l.bias)] if l.bias is not None else None)
                            for l in self.layers]
        self.eig = []
        for f in curvature.kron:
            lam, QG = torch.linalg.eigh(f.G)
            mu, QA = torch.linalg.eigh(f.A)
            Lam = lam.clamp_min(0)[:, None] * mu.clamp_min(0)[None, :]  # [out, in+1]
            self.eig.append((QG, QA, Lam))
        if self.delta <= 0:
            raise BenchError("the Kronecker posterior needs a positive prior precision")

    def eigenvalues(self) -> torch.Tensor:
        """All eigenvalues of the block-diagonal Kronecker H [D]."""
        return torch.cat([Lam.reshape(-1) for (_, _, Lam) in self.eig])

    def logdet_precision(self) -> float:
        return float((self.eigenvalues() + self.delta).log().sum())

    def sample_params(self, S: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for layer, (wn, bn), (QG, QA, Lam) in zip(self.layers, self.layer_names, self.eig):
            Z = torch.randn(S, *Lam.shape, generator=generator, device=generator.device, dtype=Lam.dtype)
            Z = Z.to(Lam.device) / (Lam + self.delta).sqrt()
            E = QG @ Z @ QA.T  # [S, out, in+1]
            W = layer.weight.detach()
            out[wn] = W + E[:, :, :-1].to(W.dtype)
            if bn is not None:
                out[bn] = layer.bias.detach() + E[:, :, -1].to(W.dtype)
        return out

    def glm_cov(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        _, qs = jac.layer_quantities(model, x)
        cov = None
        for (a, B), (QG, QA, Lam) in zip(qs, self.eig):
            P = B.to(QG.dtype) @ QG  # [n, d, out]
            q2 = (a.to(QA.dtype) @ QA).pow(2)  # [n, in+1]
            c = torch.einsum("nko,nlo,ni,oi->nkl", P, P, q2, 1.0 / (Lam + self.delta))
            cov = c if cov is None else cov + c
        return cov  # type: ignore[return-value]


def make_posterior(model: nn.Module, curvature: Curvature, delta: float, dtype: torch.dtype | None = None) -> Posterior:
    """The posterior matching the curvature's structure."""
    if curvature.structure == "full":
        return FullPosterior(model, curvature, delta, dtype)
    if curvature.structure == "diag":
        return DiagPosterior(model, curvature, delta)
    return KronPosterior(model, curvature, delta)


def theta_map(model: nn.Module, curvature: Curvature) -> torch.Tensor:
    """theta_MAP [D] over the curvature's parameters (any layout: only its norm is used)."""
    names = curvature.names if curvature.structure != "kron" else jac.subset_names(model, "all")
    return jac.flat_params(model, names)
