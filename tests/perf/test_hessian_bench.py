"""pytest-benchmark of the Hessian per structure at the paper preset's net size (784-16-16-16-16-2,
D = 13,410), plus the floor GEMM of the same [N*d, D] shape. Slow: excluded from the default run
(pyproject addopts has --ignore=tests/perf). Run with:
    pytest -o addopts="" tests/perf --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from backbones.mlp import EmbeddingNet
from bench.la.structures import STRUCTURES, compute_curvature
from bench.loss import PairLoss
from bench.model import num_params

N = 512  # training items (the full set scales linearly)


@pytest.fixture(scope="module")
def paper_setup():
    torch.manual_seed(0)
    model = EmbeddingNet(784, (16, 16, 16, 16), 2)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 784, generator=g)
    y = torch.randint(0, 7, (N,), generator=g)
    assert num_params(model) == 13410
    return model, x, y


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("hessian", ["ggn", "jtj"])
def test_bench_hessian(benchmark, paper_setup, structure, hessian):
    model, x, y = paper_setup
    run = lambda: compute_curvature(  # noqa: E731
        model,
        x,
        y,
        structure=structure,
        hessian=hessian,
        loss=PairLoss(),
        mining_batch=16,
        chunk=256,
        generator=torch.Generator().manual_seed(0),
    )
    curv = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(D=curv.D, rows=curv.stats["rows"])
    assert curv.D > 0


def test_bench_floor_gemm(benchmark, paper_setup):
    model, _, _ = paper_setup
    J = torch.randn(N * 2, num_params(model))
    out = benchmark.pedantic(lambda: torch.mm(J.T, J), rounds=1, iterations=1, warmup_rounds=0)
    assert out.shape == (J.shape[1], J.shape[1])
