"""pytest-benchmark of online Laplace's training step at the paper preset's net and batch (784-16-16-16-16-2,
batch 16) next to its reference, the plain step of the same net (the issue's bound: at most 3x): the
vectorised contrastive loss + fused Adam, and the same plus posterior sampling and the curvature
at the sample (`bench.la.online.OnlineStep`) for each structure over the head, and diag over all weights.
Run with `make perf` (excluded from the default test run)."""

from __future__ import annotations

import pytest
import torch

from bench.config import preset_config
from bench.la.online import OnlineLaplaceNet, OnlineSettings
from bench.loss import contrastive_loss
from bench.model import build_model
from bench.train import make_optimizer
from methods.online_la import OnlineStep

STEPS = 200  # steps per timed round
CFG = preset_config("paper")
N_TRAIN = 42_000


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (STEPS * 16,), generator=g)
    x = torch.randn(STEPS * 16, 1, 28, 28, generator=g) * 0.5 + torch.randn(7, 1, 28, 28, generator=g)[y]
    return x.reshape(STEPS, 16, 1, 28, 28), y.reshape(STEPS, 16)


def _steps(model, loss, opt, x, y):
    for s in range(STEPS):
        out = loss(model, x[s], y[s])
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()


@pytest.mark.parametrize(
    "path",
    [
        "plain (reference)",
        "online diag head",
        "online kron head",
        "online last_layer head",
        "online diag all",
    ],
)
def test_bench_online_step(benchmark, batches, path):
    torch.set_num_threads(1)
    x, y = batches
    net = build_model(CFG, (1, 28, 28), seed=0)
    if path.startswith("plain"):
        model, loss = net, contrastive_loss(CFG)
    else:
        _, structure, subset = path.split()
        s = OnlineSettings(structure=structure, subset=subset)
        model, loss = OnlineLaplaceNet(net, s, CFG.epochs, N_TRAIN), OnlineStep(CFG, s, N_TRAIN, seed=0)
    opt = make_optimizer(model.parameters(), CFG)
    benchmark.group = "online LA train step x200"
    benchmark.pedantic(_steps, args=(model, loss, opt, x, y), rounds=3, iterations=1, warmup_rounds=1)


CIFAR = preset_config("cifar")


@pytest.fixture(scope="module")
def feature_batches():
    """The cifar preset's head inputs: 1280-d frozen-trunk features (non-negative, as after the trunk's
    activation), batches of 64 from 7 classes."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (STEPS * 64,), generator=g)
    x = (torch.randn(STEPS * 64, 1280, generator=g) * 0.5 + torch.randn(7, 1280, generator=g)[y]).relu()
    return x.reshape(STEPS, 64, 1280), y.reshape(STEPS, 64)


@pytest.mark.parametrize("path", ["plain head (reference)", "online diag head"])
def test_bench_online_step_on_the_cifar_head(benchmark, feature_batches, path):
    """The cifar preset's EmbeddingHead (Linear 1280 -> 8, D = 10,248): the pair-form diagonal, all mined
    pairs."""
    from backbones._cnn import EmbeddingHead

    torch.set_num_threads(1)
    x, y = feature_batches
    net = EmbeddingHead(1280, CIFAR.embed_dim)
    if path.startswith("plain"):
        model, loss = net, contrastive_loss(CIFAR)
    else:
        s = OnlineSettings()
        model, loss = OnlineLaplaceNet(net, s, CIFAR.epochs, 10_000), OnlineStep(CIFAR, s, 10_000, seed=0)
    opt = make_optimizer(model.parameters(), CIFAR)
    benchmark.group = "online LA train step, cifar head x200"
    benchmark.pedantic(_steps, args=(model, loss, opt, x, y), rounds=3, iterations=1, warmup_rounds=1)
