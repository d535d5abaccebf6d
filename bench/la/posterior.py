"""Gaussian posteriors N(theta_MAP, (H + delta I)^-1) for full, diagonal and Kronecker curvature:
the spectrum of H, log det of the precision, sampling, and the chunked GLM predictive covariance."""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, vmap

from bench.errors import BenchError
from bench.la import jacobians as jac
from bench.la.curvature import Curvature
from bench.la.spectrum import Spectrum, exact_spectrum, full_spectrum

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


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int, dim: int = 0) -> torch.Tensor:
    """fn over consecutive chunks of `chunk` rows of x, concatenated along `dim`."""
    step = max(1, int(chunk))
    return torch.cat([fn(x[i:i + step]) for i in range(0, len(x), step)], dim=dim)


class Posterior:
    """N(theta_MAP, (H + delta I)^-1) over the curvature's parameters (the rest stay at theta_MAP)."""

    def __init__(self, model: nn.Module, curvature: Curvature, delta: float) -> None:
        self.model, self.curvature, self.delta = model, curvature, float(delta)

    @classmethod
    def spectrum(cls, curvature: Curvature, generator: torch.Generator | None = None) -> Spectrum:
        """The spectrum of H (for log det(H + delta I) at any delta, before a posterior exists)."""
        raise NotImplementedError

    def logdet_precision(self) -> float:
        raise NotImplementedError

    def sample_params(self, S: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """S parameter sets theta_MAP + eps: name -> [S, *shape] (only the posterior's subset)."""
        raise NotImplementedError

    def glm_cov(self, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Linearised predictive covariance J(x) Sigma J(x)^T [n, d, d], `chunk` items per Jacobian."""
        return _chunked(self._glm_cov, x, chunk)

    def _glm_cov(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sampled_embeddings(self, params: dict[str, torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
        """f(x) under each of S sampled parameter sets (from `sample_params`): [S, n, d]."""
        base = {k: v.detach() for k, v in self.model.named_parameters()}

        def f(p: dict[str, torch.Tensor], xc: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, {**base, **p}, (xc,))

        with torch.no_grad():
            return _chunked(lambda xc: vmap(f, in_dims=(0, None))(params, xc), x, chunk, dim=1)


class _FlatPosterior(Posterior):
    """Deviations are flat vectors [D] in the curvature's parameter layout."""

    def __init__(self, model: nn.Module, curvature: Curvature, delta: float) -> None:
        super().__init__(model, curvature, delta)
        self.theta = jac.flat_params(model, curvature.names)

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        return jac.subset_jacobian(self.model, x, self.curvature.subset, self.curvature.names)

    def sample_flat(self, S: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def sample_params(self, S: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        eps = self.sample_flat(S, generator).to(self.theta.dtype)
        return jac.unflatten(self.model, self.curvature.names, self.theta[None] + eps)


class FullPosterior(_FlatPosterior):
    """Full covariance from the Cholesky factor of P = H + delta I = L L^T (H is kept, not copied;
    jitter escalated if needed). A sample is theta_MAP + L^-T z (one triangular solve); the GLM
    covariance of a query is (L^-1 J^T)^T (L^-1 J^T) (triangular solves, Sigma is never formed)."""

    def __init__(self, model: nn.Module, curvature: Curvature, delta: float) -> None:
        super().__init__(model, curvature, delta)
        H = curvature.H
        assert H is not None and H.dim() == 2
        self.dtype = H.dtype
        H.diagonal().add_(self.delta)
        try:
            self.L, self.jitter = jittered_cholesky(H)
        finally:
            H.diagonal().sub_(self.delta)

    @classmethod
    def spectrum(cls, curvature: Curvature, generator: torch.Generator | None = None) -> Spectrum:
        return full_spectrum(curvature.H, generator=generator)  # type: ignore[arg-type]

    def logdet_precision(self) -> float:
        return float(2 * self.L.diagonal().log().sum())

    def sample_flat(self, S: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(self.L.shape[0], S, generator=generator, device=generator.device, dtype=self.dtype)
        z = z.to(self.L.device)
        return torch.linalg.solve_triangular(self.L.T, z, upper=True).T  # [S, D], cov (L L^T)^-1

    def _glm_cov(self, x: torch.Tensor) -> torch.Tensor:
        J = self.jacobian(x)
        n, d, D = J.shape
        Z = torch.linalg.solve_triangular(self.L, J.reshape(n * d, D).T.to(self.dtype), upper=False)
        Z = Z.reshape(D, n, d)
        return torch.einsum("kia,kib->iab", Z, Z)


class DiagPosterior(_FlatPosterior):
    """Sigma = diag(1 / (h + delta))."""

    def __init__(self, model: nn.Module, curvature: Curvature, delta: float) -> None:
        super().__init__(model, curvature, delta)
        assert curvature.H is not None and curvature.H.dim() == 1
        prec = curvature.H + self.delta
        if not bool((prec > 0).all()):
            raise BenchError("diagonal posterior precision is not positive; use a larger prior precision")
        self.var = 1.0 / prec

    @classmethod
    def spectrum(cls, curvature: Curvature, generator: torch.Generator | None = None) -> Spectrum:
        return exact_spectrum(curvature.H)  # type: ignore[arg-type]

    def logdet_precision(self) -> float:
        return float((self.curvature.H + self.delta).log().sum())  # type: ignore[operator]

    def sample_flat(self, S: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(S, self.var.shape[0], generator=generator, device=generator.device, dtype=self.var.dtype)
        return z.to(self.var.device) * self.var.sqrt()

    def _glm_cov(self, x: torch.Tensor) -> torch.Tensor:
        J = self.jacobian(x).to(self.var.dtype)
        return torch.einsum("nak,k,nbk->nab", J, self.var, J)


def _kron_eig(curvature: Curvature) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer (Q_G, Q_A, Lam [out, in+1]): G = Q_G diag(lam) Q_G^T, A = Q_A diag(mu) Q_A^T and
    Lam = lam mu^T (clamped at 0), the eigenvalues of G (x) A in the basis Q_G (x) Q_A."""
    for f in curvature.kron or []:
        lam, QG = torch.linalg.eigh(f.G)
        mu, QA = torch.linalg.eigh(f.A)
        yield QG, QA, lam.clamp_min(0)[:, None] * mu.clamp_min(0)[None, :]


class KronPosterior(Posterior):
    """Block-diagonal over Linear layers, each (G (x) A + delta I)^-1 through the factors' eigenbases:
    H_l + delta I = (Q_G (x) Q_A)(lam (x) mu + delta)(...)^T, so samples are Q_G (Z / sqrt(lam mu^T + delta)) Q_A^T
    and, with J_l = B (x) a^T, cov = sum_{o,i} (B Q_G)[:, o] (B Q_G)[:, o]^T (a^T Q_A)_i^2 / (lam_o mu_i + delta)."""

    def __init__(self, model: nn.Module, curvature: Curvature, delta: float) -> None:
        assert curvature.kron is not None
        super().__init__(model, curvature, delta)
        self.layers = jac.linear_layers(model)
        names = {id(p): n for n, p in model.named_parameters()}
        self.layer_names = [(names[id(l.weight)], names[id(l.bias)] if l.bias is not None else None)
                            for l in self.layers]
        self.eig = list(_kron_eig(curvature))
        if self.delta <= 0:
            raise BenchError("the Kronecker posterior needs a positive prior precision")

    @classmethod
    def spectrum(cls, curvature: Curvature, generator: torch.Generator | None = None) -> Spectrum:
        return exact_spectrum(torch.cat([Lam.reshape(-1) for (_, _, Lam) in _kron_eig(curvature)]))

    def logdet_precision(self) -> float:
        return float(torch.cat([(Lam + self.delta).log().reshape(-1) for (_, _, Lam) in self.eig]).sum())

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

    def _glm_cov(self, x: torch.Tensor) -> torch.Tensor:
        _, qs = jac.layer_quantities(self.model, x)
        cov = None
        for (a, B), (QG, QA, Lam) in zip(qs, self.eig):
            P = B.to(QG.dtype) @ QG  # [n, d, out]
            q2 = (a.to(QA.dtype) @ QA).pow(2)  # [n, in+1]
            c = torch.einsum("nko,nlo,ni,oi->nkl", P, P, q2, 1.0 / (Lam + self.delta))
            cov = c if cov is None else cov + c
        return cov  # type: ignore[return-value]
