"""Gaussian posteriors N(theta_MAP, (H + delta I)^-1) for full (Cholesky or low-rank), diagonal and
Kronecker curvature: the spectrum of H, log det of the precision, sampling, the GLM predictive covariance."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from bench.errors import BenchError
from bench.la import jacobians as jac
from bench.la.curvature import Curvature
from bench.la.lowrank import Eigenbasis, krylov_nystrom
from bench.la.memory import chunk_budget, forward_footprint, items_within

with warnings.catch_warnings():  # torch's forward AD loads these on its first jvp, and they warn that
    warnings.filterwarnings(
        "ignore", message=".*torch.jit.script.*", category=FutureWarning
    )  # torch.jit.script
    try:  # is deprecated: a torch-internal line in every run's log, loaded here once, quietly
        from torch._decomp import decompositions_for_jvp  # noqa: F401
    except ImportError:  # another torch layout: at worst the warning shows
        pass
from bench.la.spectrum import (
    EIG_LOGDET_TOL,
    EXACT_EIG_MAX_D,
    EXACT_EIGVALS_MAX_D,
    Spectrum,
    exact_spectrum,
    full_spectrum,
)

log = logging.getLogger("bench")

PRIOR_TOL = 0.2  # exact full posterior: its prior from a Krylov basis with ||H - H_k|| <= PRIOR_TOL delta
# right-hand sides per triangular solve (n d in all). At D = 13,410 on 2 cores: 113 GF/s from 256 to 2,048
# columns when the machine is idle; with other load, 56 GF/s at 512 against 45 at 4,096.
SOLVE_COLUMNS = 512

Prior = Callable[[Spectrum], tuple[float, dict]]  # spectrum of H -> (prior precision, info)


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
                log.warning(
                    "%s was not positive definite; added jitter %.3g to its diagonal", what, jitter * scale
                )
            return L, jitter * scale
    raise BenchError(
        f"{what} is not positive definite even with jitter {1e-4 * scale:.3g}; "
        "try a larger prior precision or hessian_dtype=float64"
    )


def _chunked(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int, dim: int = 0
) -> torch.Tensor:
    """fn over consecutive chunks of `chunk` rows of x, concatenated along `dim`."""
    step = max(1, int(chunk))
    return torch.cat([fn(x[i : i + step]) for i in range(0, len(x), step)], dim=dim)


class Posterior:
    """N(theta_MAP, (H + delta I)^-1) over the curvature's parameters (the rest stay at theta_MAP)."""

    def __init__(self, model: nn.Module, curvature: Curvature, delta: float) -> None:
        self.model, self.curvature, self.delta = model, curvature, float(delta)

    @classmethod
    def spectrum(cls, curvature: Curvature, generator: torch.Generator | None = None) -> Spectrum:
        """The spectrum of H (for log det(H + delta I) at any delta, before a posterior exists)."""
        raise NotImplementedError

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        curvature: Curvature,
        prior: Prior | float,
        generator: torch.Generator | None = None,
        rank_tol: float = 0.0,
    ) -> tuple["Posterior", float, dict]:
        """(posterior, delta, info): the prior precision delta, info = prior(spectrum of H) (or prior
        itself when a number), then the posterior at delta. rank_tol > 0 lets a full posterior use a
        low-rank eigenbasis (`FullPosterior.fit`)."""
        if not callable(prior):  # a fixed prior precision needs no spectrum
            return cls(model, curvature, float(prior)), float(prior), {}
        delta, info = prior(cls.spectrum(curvature, generator))
        return cls(model, curvature, delta), delta, info

    def logdet_precision(self) -> float:
        raise NotImplementedError

    def sample_params(self, S: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """S parameter sets theta_MAP + eps: name -> [S, *shape] (only the posterior's subset)."""
        raise NotImplementedError

    def glm_cov(self, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Linearised predictive covariance J(x) Sigma J(x)^T [n, d, d], `chunk` items per Jacobian
        (fewer when their Jacobians would exceed `chunk_budget`)."""
        return _chunked(self._glm_cov, x, self._items(x, chunk))

    def _glm_cov(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _items(self, x: torch.Tensor, chunk: int) -> int:
        """Items per Jacobian chunk: `chunk`, capped so that their per-item quantities fit `chunk_budget`."""
        return items_within(chunk, self._bytes_per_item(x[:1]), chunk_budget(x.device))

    def _bytes_per_item(self, x1: torch.Tensor) -> int:
        """The [d, D] Jacobian of one item plus d copies of its activations (float64 at most)."""
        d, act = forward_footprint(self.model, x1)
        return 8 * d * (self.curvature.D + act)

    def sampled_embeddings(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        """f(x) under each of S sampled parameter sets (from `sample_params`; the other parameters and
        the buffers at their MAP values): [S, n, d]. `chunk` items per vmapped forward of the S networks,
        fewer when S copies of their activations would exceed `chunk_budget`."""
        base = {k: v.detach() for k, v in self.model.named_parameters()}

        def f(p: dict[str, torch.Tensor], xc: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, {**base, **p}, (xc,))

        with torch.no_grad():
            return _chunked(
                lambda xc: vmap(f, in_dims=(0, None))(params, xc),
                x,
                self._sample_items(params, x, chunk, copies=1),
                dim=1,
            )

    def _sample_items(self, params: dict[str, torch.Tensor], x: torch.Tensor, chunk: int, copies: int) -> int:
        """Items per vmapped forward of the S parameter sets: `chunk`, fewer when `copies` x S copies of
        the items' activations would exceed `chunk_budget`."""
        S = next(iter(params.values())).shape[0]
        _, act = forward_footprint(self.model, x[:1])
        return items_within(chunk, copies * S * act * x.element_size(), chunk_budget(x.device))

    def linearized_embeddings(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        """Samples of the linearised (GLM) predictive, f_MAP(x) + J(x) (theta_s - theta_MAP), for the S
        parameter sets of `sample_params`: [S, n, d]. Exact samples of N(f_MAP(x), J Sigma J^T), jointly
        over the n items (one theta_s serves every item), unlike sampled networks f(x; theta_s), which
        leave the region where the linearisation (and the Laplace posterior) is meaningful.
        J(x) (theta_s - theta_MAP) is one forward-mode product (torch.func.jvp) per sample over the
        posterior's parameter subset, vmapped; `chunk` items at a time, fewer when the S primal and
        tangent activations would exceed `chunk_budget`."""
        base = {k: v.detach() for k, v in self.model.named_parameters()}
        primal = {k: base[k] for k in params}
        tangents = {k: (v - base[k]).to(base[k].dtype) for k, v in params.items()}  # [S, *shape]

        def f(p: dict[str, torch.Tensor], xc: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, {**base, **p}, (xc,))

        def chunk_samples(xc: torch.Tensor) -> torch.Tensor:
            mean = f(primal, xc)
            jt = vmap(lambda t: jvp(lambda p: f(p, xc), (primal,), (t,))[1])(tangents)  # [S, n, d]
            return mean[None] + jt

        with torch.no_grad():
            return _chunked(chunk_samples, x, self._sample_items(params, x, chunk, copies=2), dim=1)


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

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        curvature: Curvature,
        prior: Prior | float,
        generator: torch.Generator | None = None,
        rank_tol: float = 0.0,
    ) -> tuple[Posterior, float, dict]:
        """For D > EXACT_EIG_MAX_D one block Krylov basis of H serves the prior (its deflated spectrum)
        and, with rank_tol > 0, the posterior (`LowRankPosterior`, grown until every predictive covariance
        is within a factor 1 + rank_tol of the exact one); otherwise, or when that rank would not pay,
        the exact Cholesky posterior, its prior from the exact eigenvalues up to EXACT_EIGVALS_MAX_D (a J^T J
        spectrum decays too slowly for a basis to pay; float32 ones for a float32 H, checked by the
        posterior's factor: `_fit_exact`), above it from the basis grown to PRIOR_TOL (delta within 1%)."""
        H = curvature.H
        assert H is not None and H.dim() == 2
        if callable(prior) and curvature.D <= EXACT_EIG_MAX_D:
            return cls._fit_exact(model, curvature, prior)
        if curvature.D <= EXACT_EIG_MAX_D:  # a fixed prior
            post, delta, info = super().fit(model, curvature, prior, generator, rank_tol)
            return post, delta, {**info, "posterior": "cholesky"}
        prior_of = prior if callable(prior) else (lambda spec: (float(prior), {}))

        def delta_of(b: Eigenbasis) -> float:
            return prior_of(b.spectrum())[0]

        if rank_tol > 0:
            basis, _ = krylov_nystrom(H, delta_of, rank_tol, generator=generator)
            if basis is not None:
                delta, info = prior_of(basis.spectrum())
                return LowRankPosterior(model, curvature, delta, basis), delta, {**info, **basis.info(delta)}
            log.info(
                "full posterior: tolerance %g needs a rank above the share of D where a low rank pays; "
                "using the exact Cholesky factor",
                rank_tol,
            )
        if callable(prior) and curvature.D <= EXACT_EIGVALS_MAX_D:  # a slowly decaying spectrum (J^T J):
            return cls._fit_exact(model, curvature, prior)  # exact is cheaper
        if callable(prior):
            basis, _ = krylov_nystrom(H, delta_of, PRIOR_TOL, generator=generator)
            delta, info = prior(
                basis.spectrum() if basis is not None else full_spectrum(H, generator=generator)
            )
        else:
            delta, info = float(prior), {}
        return cls(model, curvature, delta), delta, {**info, "posterior": "cholesky"}

    @classmethod
    def _fit_exact(
        cls, model: nn.Module, curvature: Curvature, prior: Prior
    ) -> tuple["FullPosterior", float, dict]:
        """The prior from the exact eigenvalues of H (`full_spectrum`: float32 LAPACK for a float32 H),
        then the Cholesky posterior at that delta, whose factor L L^T = H + (delta + jitter) I checks the
        spectrum for free: |spectrum log det(H + (delta + jitter) I) - 2 sum log diag L| above
        EIG_LOGDET_TOL nats, or any jitter (H + delta I was not positive definite in float32 arithmetic:
        delta is down at float32's rounding of H, where float32 eigenvalues are not to be trusted), and
        a float32 spectrum is recomputed in float64, the prior chosen again and the posterior rebuilt.
        info adds eig_dtype (the dtype of the spectrum the prior came from) and eig_logdet_error (the
        first spectrum's error, as laplace_torch records it: the float32 one that failed, after a redo).

        The reference is the posterior's own Cholesky factor in H's dtype (float32 by default), not a
        float64 one: Cholesky's backward error is relative to the diagonal (|E| <= c D eps |L| |L^T|), where
        eigvalsh's is relative to lambda_max, so its log det is far more accurate than the float32
        spectrum's. Measured on a rank-deficient J^T J, D = 10,248 (lambda_max 8.5e6, 2 cores): at the
        marglik delta 531 the float32 factor's log det is within 7e-5 nats of a float64 Cholesky's (0.006
        at delta / 100, 0.5 at delta / 1e4, where the float32 spectrum is off by 1,850), while a float64
        Cholesky would add 9 s (copy and factor) to the 23 s of float32 eigenvalues; the float32 factor
        comes free (4.7 s, the posterior's)."""
        H = curvature.H
        assert H is not None
        spec = full_spectrum(H)
        delta, info = prior(spec)
        post = cls(model, curvature, delta)
        err = abs(spec.logdet(delta + post.jitter) - post.logdet_precision())
        if spec.eig_dtype == "float32" and (post.jitter > 0 or not err <= EIG_LOGDET_TOL):
            log.info(
                "full posterior: the float32 spectrum's log det(H + delta I) is off by %.3g nats at delta "
                "%.4g (jitter %.3g); recomputing the eigenvalues in float64",
                err,
                delta,
                post.jitter,
            )
            del post  # its factor goes before float64 eigvalsh's D x D copy of H
            spec = full_spectrum(H, float64=True)
            delta, info = prior(spec)
            post = cls(model, curvature, delta)
        info = {**info, "posterior": "cholesky", "eig_dtype": spec.eig_dtype, "eig_logdet_error": err}
        return post, delta, info

    def logdet_precision(self) -> float:
        return float(2 * self.L.diagonal().double().log().sum())

    def sample_flat(self, S: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(self.L.shape[0], S, generator=generator, device=generator.device, dtype=self.dtype)
        z = z.to(self.L.device)
        return torch.linalg.solve_triangular(self.L.T, z, upper=True).T  # [S, D], cov (L L^T)^-1

    def glm_cov(self, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """J Sigma J^T. When every parameter belongs to nn.Linear layers (`jac.linear_factors`: a last
        layer, a head) and the queries outnumber D / d, from Sigma formed once and the layers' factors
        (`_glm_cov_factors`: n D^2 flops as GEMMs, d times fewer than the solves); otherwise Z^T Z with
        Z = L^-1 J^T, triangular solves with SOLVE_COLUMNS right-hand sides (n d of them; `chunk` items per
        Jacobian within), Sigma never formed."""
        d = self._out_dim(x)
        if self._sigma is not None or len(x) * d >= self.curvature.D:
            cov = self._glm_cov_factors(x, chunk)
            if cov is not None:
                return cov
        items = max(1, SOLVE_COLUMNS // d)
        chunk = self._items(x, chunk)
        return _chunked(lambda xc: self._glm_cov_solve(xc, chunk), x, items)

    _sigma: list | None = None  # Sigma's blocks as the factor route reads them, formed by its first call

    def _glm_cov_factors(self, x: torch.Tensor, chunk: int) -> torch.Tensor | None:
        """J Sigma J^T from the Linear layers' factors (None when they do not apply). Parameter p's
        Jacobian is B_p (x) a_p^T (a_p = 1 for a bias), so block (p, q) contributes B_p T_pq B_q^T with
        T_pq[o, o'] = a_p^T Sigma_pq[o, :, o', :] a_q: Sigma_pq is kept as [in_p, out_p out_q in_q] (formed
        once), so T_pq is one GEMM a_p @ Sigma_pq per chunk, then a batched dot with a_q (measured, last
        layer D = 10,248, 2000 items, 2 threads: 3.0 s against 11 s of triangular solves)."""
        params = dict(self.model.named_parameters())
        sizes = [params[n].numel() for n in self.curvature.names]
        probe = jac.linear_factors(self.model, x[:1], self.curvature.names)
        if probe is None:
            return None
        if self._sigma is None:
            self._sigma = self._sigma_blocks(torch.cholesky_inverse(self.L), probe, sizes)
        items = max(1, min(len(x), int(chunk)))
        parts = []
        for i in range(0, len(x), items):
            factors = jac.linear_factors(self.model, x[i : i + items], self.curvature.names)
            assert factors is not None
            parts.append(self._factor_cov(factors))
        return torch.cat(parts)

    @staticmethod
    def _sigma_blocks(sigma: torch.Tensor, probe: list, sizes: list[int]) -> list:
        """Sigma's (p, q) blocks as [in_p, out_p out_q in_q] (in = 1 for a bias; `_glm_cov_factors`)."""
        shapes = [(B.shape[2], 1 if a is None else a.shape[1]) for a, B in probe]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        blocks = []
        for p, (op, ip) in enumerate(shapes):
            row = []
            for q, (oq, iq) in enumerate(shapes):
                b = sigma[offsets[p] : offsets[p + 1], offsets[q] : offsets[q + 1]].reshape(op, ip, oq, iq)
                row.append(b.permute(1, 0, 2, 3).reshape(ip, op * oq * iq).contiguous())
            blocks.append(row)
        return blocks

    def _factor_cov(self, factors: list) -> torch.Tensor:
        """sum_pq B_p T_pq B_q^T for one chunk's factors (`_glm_cov_factors`)."""
        dtype = self._sigma[0][0].dtype
        n = factors[0][1].shape[0]
        dev = self._sigma[0][0].device
        ins = [
            torch.ones(n, 1, dtype=dtype, device=dev) if a is None else a.to(dev, dtype) for a, _ in factors
        ]
        Bs = [B.to(dev, dtype) for _, B in factors]
        cov = torch.zeros(n, Bs[0].shape[1], Bs[0].shape[1], dtype=dtype, device=dev)
        for p, (ap, Bp) in enumerate(zip(ins, Bs)):
            for q, (aq, Bq) in enumerate(zip(ins, Bs)):
                op, oq, iq = Bp.shape[2], Bq.shape[2], aq.shape[1]
                M = (ap @ self._sigma[p][q]).reshape(n, op * oq, iq)
                T = torch.bmm(M, aq[:, :, None]).reshape(n, op, oq)
                cov += Bp @ T @ Bq.transpose(1, 2)
        return cov

    def _glm_cov_solve(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        J = _chunked(self.jacobian, x, chunk)
        n, d, D = J.shape
        Z = torch.linalg.solve_triangular(self.L, J.reshape(n * d, D).T.to(self.dtype), upper=False)
        Z = Z.reshape(D, n, d)
        return torch.einsum("kia,kib->iab", Z, Z)

    def _out_dim(self, x: torch.Tensor) -> int:
        with torch.no_grad():
            return int(self.model(x[:1]).shape[-1])


class LowRankPosterior(_FlatPosterior):
    """Sigma_k = (H_k + delta I)^-1 for a Nyström eigenbasis H_k = U diag(lam) U^T of H (`bench.la.lowrank`,
    which bounds Sigma_k / Sigma in Loewner order): with w = lam / (lam + delta),

        Sigma_k = U diag(1 / (lam + delta)) U^T + (I - U U^T) / delta = (I - U diag(w) U^T) / delta,
        J Sigma_k J^T = (J J^T - A diag(w) A^T) / delta,   A = J U [n, d, k],

    n d D k flops instead of the n d D^2 of triangular solves. For a stack of Linear layers A and J J^T
    come from the layer factors (J_l = B (x) a^T): A = sum_l B_l (a_l U_l), J J^T = sum_l (B_l B_l^T)(a_l .
    a_l),
    J never formed and the widest layer's product costs n in out k, not n d in out k (any subset of
    Linear layers, e.g. a CNN's head; other subsets form J by `jacobian`)."""

    def __init__(self, model: nn.Module, curvature: Curvature, delta: float, basis: Eigenbasis) -> None:
        super().__init__(model, curvature, delta)
        self.basis, self.jitter = basis, 0.0
        self.dtype = curvature.H.dtype if curvature.H is not None else torch.float32
        self.lam, self.U = basis.lam, basis.eigenvectors(self.dtype)
        self.w = self.lam / (self.lam + self.delta)  # float64 [k]
        params = dict(model.named_parameters())
        self.U_layers, i = (
            [],
            0,
        )  # per parameter: a 2-d weight's [in, out * k] (a @ it = a U_l), else [numel, k]
        for name in curvature.names:
            p, k = params[name], self.U.shape[1]
            block = self.U[i : i + p.numel()]
            i += p.numel()
            self.U_layers.append(
                block.reshape(*p.shape, k).transpose(0, 1).reshape(p.shape[1], -1).contiguous()
                if p.dim() == 2
                else block
            )

    def logdet_precision(self) -> float:
        return float((self.lam + self.delta).log().sum()) + (self.basis.D - self.basis.rank) * math.log(
            self.delta
        )

    def sample_flat(self, S: int, generator: torch.Generator) -> torch.Tensor:
        """Sigma_k^(1/2) z = z / sqrt(delta) + U diag(1/sqrt(lam + delta) - 1/sqrt(delta)) U^T z."""
        z = torch.randn(S, self.basis.D, generator=generator, device=generator.device, dtype=torch.float64)
        z = z.to(self.U.device)
        U = self.U.double()
        c = 1 / (self.lam + self.delta).sqrt() - 1 / math.sqrt(self.delta)
        return (z / math.sqrt(self.delta) + ((z @ U) * c) @ U.T).to(self.dtype)

    def _glm_cov(self, x: torch.Tensor) -> torch.Tensor:
        A, JJ = self.jacobian_products(x)
        A = A.double()
        return (JJ - torch.einsum("nak,k,nbk->nab", A, self.w, A)) / self.delta

    def jacobian_products(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A = J U [n, d, k], J J^T [n, d, d] float64), from the Linear-layer factors when they apply."""
        factors = jac.linear_factors(self.model, x, self.curvature.names)
        if factors is None:
            J = self.jacobian(x).to(self.dtype)
            Jd = J.double()
            return J @ self.U, Jd @ Jd.transpose(1, 2)
        n, d = x.shape[0], factors[0][1].shape[1]
        A = torch.zeros(n, d, self.U.shape[1], dtype=self.dtype, device=self.U.device)
        JJ = torch.zeros(n, d, d, dtype=torch.float64, device=self.U.device)
        for (a, B), Ul in zip(factors, self.U_layers):
            B = B.to(self.dtype)
            BB = B.double() @ B.double().transpose(1, 2)
            if a is None:
                A += B @ Ul
                JJ += BB
            else:
                A += torch.bmm(B, (a.to(self.dtype) @ Ul).reshape(n, B.shape[2], -1))
                JJ += BB * a.double().pow(2).sum(1)[:, None, None]
        return A, JJ


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
        z = torch.randn(
            S, self.var.shape[0], generator=generator, device=generator.device, dtype=self.var.dtype
        )
        return z.to(self.var.device) * self.var.sqrt()

    def _glm_cov(self, x: torch.Tensor) -> torch.Tensor:
        J = self.jacobian(x).to(self.var.dtype)
        return torch.einsum("nak,k,nbk->nab", J, self.var, J)


def kron_eig(curvature: Curvature) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer (Q_G, Q_A, Lam [out, in']): G = Q_G diag(lam) Q_G^T, A = Q_A diag(mu) Q_A^T and
    Lam = lam mu^T (clamped at 0), the eigenvalues of G (x) A in the basis Q_G (x) Q_A."""
    for f in curvature.kron or []:
        lam, QG = _eigh(f.G)
        mu, QA = _eigh(f.A)
        yield QG, QA, lam.clamp_min(0)[:, None] * mu.clamp_min(0)[None, :]


def _eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of a symmetric PSD factor in float64, cast back. Rows and columns that are exactly zero (the
    padding taps of a conv's patch factor on small images) are split off first, as eigenvalue-0 unit
    vectors: LAPACK's divide-and-conquer fails to converge on such matrices even in float64 (and float32
    fails on the rank-deficient input factor of a wide head). A failure even then is a one-line BenchError."""
    n = M.shape[0]
    live = (M != 0).any(dim=1).nonzero().squeeze(1)
    lam = torch.zeros(n, dtype=torch.float64, device=M.device)
    Q = torch.zeros(n, n, dtype=torch.float64, device=M.device)
    dead = torch.ones(n, dtype=torch.bool, device=M.device)
    dead[live] = False
    dead_idx = dead.nonzero().squeeze(1)
    Q[dead_idx, torch.arange(len(dead_idx), device=M.device)] = 1.0
    if len(live):
        try:
            sub_lam, sub_Q = torch.linalg.eigh(M[live][:, live].double())
        except RuntimeError as e:  # torch.linalg.LinAlgError
            raise BenchError(
                f"eigendecomposition of a Kronecker factor failed: {str(e).splitlines()[0]}"
            ) from None
        cols = torch.arange(len(dead_idx), n, device=M.device)
        lam[cols] = sub_lam
        Q[live[:, None], cols[None, :]] = sub_Q
    return lam.to(M.dtype), Q.to(M.dtype)


class KronPosterior(Posterior):
    """Block-diagonal over the subset's Linear/Conv2d layers, each (G (x) A + delta I)^-1 through the
    factors' eigenbases: H_l + delta I = (Q_G (x) Q_A)(lam (x) mu + delta)(...)^T, so a sample of the
    layer's [W | b] is Q_G (Z / sqrt(lam mu^T + delta)) Q_A^T. The GLM covariance uses the exact Jacobian
    J_l = sum_s B_s (x) U_s^T over the layer's locations s (`jacobians.layer_quantities`, whatever
    approximation built the factors): with P_s = B_s Q_G [d, out], q_s = Q_A^T U_s [in'] and
    M = sum_s P_s (x) q_s [d, out, in'], cov = sum_{o,i} M[:, o, i] M[:, o, i]^T / (lam_o mu_i + delta);
    for one location (a Linear) that is sum_{o,i} P[:, o] P[:, o]^T q_i^2 / (lam_o mu_i + delta), M never
    formed."""

    def __init__(self, model: nn.Module, curvature: Curvature, delta: float) -> None:
        assert curvature.kron is not None
        super().__init__(model, curvature, delta)
        self.layers = jac.kron_layers(model, curvature.names)
        names = {id(p): n for n, p in model.named_parameters()}
        self.layer_names = [
            (names[id(layer.weight)], names[id(layer.bias)] if layer.bias is not None else None)
            for layer in self.layers
        ]
        self.eig = list(kron_eig(curvature))
        if self.delta <= 0:
            raise BenchError("the Kronecker posterior needs a positive prior precision")

    @classmethod
    def spectrum(cls, curvature: Curvature, generator: torch.Generator | None = None) -> Spectrum:
        return exact_spectrum(torch.cat([Lam.reshape(-1) for (_, _, Lam) in kron_eig(curvature)]))

    def logdet_precision(self) -> float:
        return float(torch.cat([(Lam + self.delta).log().reshape(-1) for (_, _, Lam) in self.eig]).sum())

    def sample_params(self, S: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for layer, (wn, bn), (QG, QA, Lam) in zip(self.layers, self.layer_names, self.eig):
            Z = torch.randn(S, *Lam.shape, generator=generator, device=generator.device, dtype=Lam.dtype)
            Z = Z.to(Lam.device) / (Lam + self.delta).sqrt()
            E = QG @ Z @ QA.T  # [S, out, in']
            W = layer.weight.detach()
            k = W[0].numel()
            out[wn] = W + E[:, :, :k].reshape(S, *W.shape).to(W.dtype)
            if bn is not None:
                out[bn] = layer.bias.detach() + E[:, :, k].to(W.dtype)
        return out

    def _bytes_per_item(self, x1: torch.Tensor) -> int:
        """One item's U and B (float64 at most) plus, for layers with several locations, its M."""
        _, qs = jac.layer_quantities(self.model, x1, self.layers)
        _, act = forward_footprint(self.model, x1)
        m = sum(B.shape[2] * B.shape[3] * U.shape[2] for U, B in qs if U.shape[1] > 1)
        return 8 * (act + m + sum(U.numel() + 2 * B.numel() for U, B in qs))

    def _glm_cov(self, x: torch.Tensor) -> torch.Tensor:
        _, qs = jac.layer_quantities(self.model, x, self.layers)
        cov = None
        for (U, B), (QG, QA, Lam) in zip(qs, self.eig):
            P = B.to(QG.dtype) @ QG  # [n, s, d, out]
            q = U.to(QA.dtype) @ QA  # [n, s, in']
            inv = 1.0 / (Lam + self.delta)
            if P.shape[1] == 1:
                c = torch.einsum("nko,nlo,ni,oi->nkl", P[:, 0], P[:, 0], q[:, 0].pow(2), inv)
            else:
                M = torch.einsum("nsko,nsi->nkoi", P, q)
                c = torch.einsum("nkoi,nloi,oi->nkl", M, M, inv)
            cov = c if cov is None else cov + c
        return cov  # type: ignore[return-value]
