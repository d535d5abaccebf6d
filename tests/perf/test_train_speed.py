"""pytest-benchmark of the training hot paths at the paper preset's net and batch (784-16-16-16-16-2,
batch 16), each next to its reference: one step with pytorch-metric-learning's miner + loss and
plain Adam (the previous path) vs the vectorised loss + fused Adam; an ensemble of M = 5
as M separate steps vs one step of the nets trained side by side; a dropout net's step.
Run with `make perf` (excluded from the default test run)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from bench.config import preset_config
from bench.loss import batched_contrastive_loss, contrastive_loss, make_loss_and_miner
from bench.model import build_model
from bench.train import make_optimizer

STEPS = 200  # steps per timed round
M = 5  # ensemble members
CFG = preset_config("paper")


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 16, 1, 28, 28, generator=g)
    y = torch.randint(0, 7, (STEPS * 16,), generator=g)
    return x.reshape(STEPS, 16, 1, 28, 28), y.reshape(STEPS, 16)


def _pml_loss():
    loss_fn, miner = make_loss_and_miner(CFG)

    def f(model, xb, yb):
        emb = model(xb)
        return loss_fn(emb, yb, miner(emb, yb))

    return f


def _steps(models, loss, optimizers, x, y):
    for s in range(STEPS):
        for model, opt in zip(models, optimizers):
            out = loss(model, x[s], y[s])
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()


@pytest.mark.parametrize("path", ["pml+adam (reference)", "vectorised+fused"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bench_train_step(benchmark, batches, path, dropout):
    torch.set_num_threads(1)
    x, y = batches
    model = build_model(CFG, (1, 28, 28), seed=0, dropout=dropout)
    if path.startswith("pml"):
        loss, opt = _pml_loss(), torch.optim.Adam(model.parameters(), lr=CFG.lr)
    else:
        loss, opt = contrastive_loss(CFG), make_optimizer(model.parameters(), CFG)
    benchmark.group = "train step x200"
    benchmark.pedantic(_steps, args=([model], loss, [opt], x, y), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("path", ["5 separate nets (reference)", "5 nets side by side"])
def test_bench_ensemble_step(benchmark, batches, path):
    torch.set_num_threads(1)
    x, y = batches
    models = [build_model(CFG, (1, 28, 28), seed=s) for s in range(M)]
    benchmark.group = "ensemble step x200 (M=5)"
    if path.startswith("5 separate"):
        loss = contrastive_loss(CFG)
        opts = [make_optimizer(m.parameters(), CFG) for m in models]
        benchmark.pedantic(_steps, args=(models, loss, opts, x, y), rounds=3, iterations=1, warmup_rounds=1)
        return
    params, buffers = stack_module_state(models)
    template = copy.deepcopy(models[0]).to("meta")
    forward = vmap(lambda p, b, xb: functional_call(template, (p, b), (xb,)))
    opt = make_optimizer(list(params.values()), CFG)
    xs, ys = x[:, None].expand(-1, M, -1, -1, -1, -1), y[:, None].expand(-1, M, -1)

    def joint():
        for s in range(STEPS):
            losses = batched_contrastive_loss(forward(params, buffers, xs[s]), ys[s], CFG)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()

    benchmark.pedantic(joint, rounds=3, iterations=1, warmup_rounds=1)
