"""pytest-benchmark of the full-LA prior and GLM predictive, each next to its reference: the exact
Cholesky path (triangular solves; SLQ 40 x 16 + Cholesky, the previous prior), exact eigvalsh, and bare
matrix products of the same shapes. Net 256-16-16-16-16-2 (D = 4,962 > EXACT_EIG_MAX_D, so the Krylov
paths run) with an H of the paper GGN's spectral shape; 2,048 queries. Excluded from the default run:
    pytest -o addopts="" tests/perf --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from backbones.mlp import EmbeddingNet
from bench.la.curvature import Curvature
from bench.la.jacobians import subset_names
from bench.la.posterior import FullPosterior, LowRankPosterior, jittered_cholesky
from bench.la.prior import optimize_marglik
from bench.la.spectrum import exact_spectrum, slq_spectrum
from tests.laplace_helpers import PAPER_D, PAPER_THETA_SQ, paper_like_spectrum, psd_with_spectrum

N_QUERIES, TOL = 2048, 0.1


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = EmbeddingNet(256, (16, 16, 16, 16), 2).eval()
    names = subset_names(model, "all")
    D = sum(p.numel() for p in model.parameters())
    H = psd_with_spectrum(paper_like_spectrum(D)).float()
    curv = Curvature("full", "all", names, D, H=H)
    theta_sq = PAPER_THETA_SQ * D / PAPER_D
    x = torch.rand(N_QUERIES, 256, generator=torch.Generator().manual_seed(1))

    def marglik(spec):
        return optimize_marglik(spec, theta_sq)

    lowrank, delta, _ = FullPosterior.fit(
        model, curv, marglik, torch.Generator().manual_seed(0), rank_tol=TOL
    )
    assert isinstance(lowrank, LowRankPosterior)
    exact_delta, _ = marglik(exact_spectrum(torch.linalg.eigvalsh(H.double())))
    return dict(
        model=model,
        curv=curv,
        H=H,
        x=x,
        marglik=marglik,
        delta=delta,
        exact_delta=exact_delta,
        lowrank=lowrank,
        exact=FullPosterior(model, curv, delta),
    )


def _once(benchmark, fn):
    return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("path", ["lowrank", "exact_solves"])
def test_bench_glm_predictive(benchmark, setup, path):
    post = setup["lowrank" if path == "lowrank" else "exact"]
    cov = _once(benchmark, lambda: post.glm_cov(setup["x"], 256))
    benchmark.extra_info.update(
        D=setup["curv"].D, queries=N_QUERIES, rank=getattr(post, "basis", None) and post.basis.rank
    )
    assert cov.shape == (N_QUERIES, 2, 2)


@pytest.mark.parametrize("shape", ["solve_shape", "lowrank_shape"])
def test_bench_glm_floor_gemm(benchmark, setup, shape):
    """Bare products: [D, D] x [D, n d] (what the triangular solves cost at GEMM speed, twice their
    flops) and [n d, D] x [D, k] (the low-rank path's product)."""
    D, k = setup["curv"].D, setup["lowrank"].basis.rank
    A = torch.randn(D, D) if shape == "solve_shape" else torch.randn(2 * N_QUERIES, D)
    B = torch.randn(D, 2 * N_QUERIES) if shape == "solve_shape" else torch.randn(D, k)
    _once(benchmark, lambda: A @ B)


@pytest.mark.parametrize("path", ["krylov_lowrank", "krylov_cholesky", "slq_cholesky", "exact_eigvalsh"])
def test_bench_prior(benchmark, setup, path):
    """The prior stage: delta and the posterior's factorisation. krylov_lowrank is the default
    (one basis for both); krylov_cholesky is posterior_rank_tol=0; slq_cholesky the previous path;
    exact_eigvalsh the reference spectrum (without a factorisation)."""
    model, curv, H, marglik = setup["model"], setup["curv"], setup["H"], setup["marglik"]

    def gen():
        return torch.Generator().manual_seed(0)

    def slq_cholesky():
        delta, _ = marglik(slq_spectrum(H, generator=gen()))
        return delta, jittered_cholesky(H + delta * torch.eye(curv.D))

    run = {
        "krylov_lowrank": lambda: FullPosterior.fit(model, curv, marglik, gen(), rank_tol=TOL)[1],
        "krylov_cholesky": lambda: FullPosterior.fit(model, curv, marglik, gen(), rank_tol=0.0)[1],
        "slq_cholesky": lambda: slq_cholesky()[0],
        "exact_eigvalsh": lambda: marglik(exact_spectrum(torch.linalg.eigvalsh(H.double())))[0],
    }[path]
    delta = _once(benchmark, run)
    benchmark.extra_info.update(D=curv.D, delta=delta, delta_rel_err=delta / setup["exact_delta"] - 1)
    assert delta > 0
