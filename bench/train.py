"""The shared training loop: Adam on a batch loss (by default the contrastive loss of `bench.loss`)
over seeded shuffled batches, one net or several side by side; seeded and device-agnostic. Trained
nets are cached by `bench.model_cache`."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from bench.config import RunConfig
from bench.data import Split
from bench.environment import cpu_threads
from bench.errors import BenchError
from bench.images import item_seeds
from bench.loss import BatchLoss, batched_contrastive_loss, contrastive_loss
from bench.model import build_model
from bench.optim import LeanAdam


@dataclass(frozen=True)
class Recipe:
    """How a method trains its own net through the shared loop: `build(cfg, in_shape, seed)` makes the
    net, `loss(cfg)` gives its batch loss. `name` and `options` (JSON-safe) enter the cache key.
    `stages(model)` (optional): seconds of the training time that the trained net measured itself as
    parts of it ({stage: seconds}, e.g. online curvature), cached with the net and charged by the
    runner to those stages instead of "train". `modules`: further (imported) modules whose code
    determines the trained net, besides those defining build and loss (their code enters the key)."""

    name: str
    build: Callable[..., nn.Module]
    loss: Callable[[RunConfig], BatchLoss]
    options: tuple[tuple[str, Any], ...] = ()
    stages: Callable[[nn.Module], dict[str, float]] | None = None
    modules: tuple[str, ...] = ()


def make_optimizer(params, cfg: RunConfig) -> torch.optim.Optimizer:
    """Adam with the config's learning rate and weight decay, its fused kernel (one call per tensor
    for the whole update): a small net's step is bound by per-operator dispatch, and on CPU the fused
    step of the paper net takes ~0.4x the time of the multi-tensor (foreach) one, which there falls
    back to a loop of single-tensor operators (`python -m bench step-profile`); stepped through
    `bench.optim.LeanAdam`, which calls that kernel without the optimiser's per-call overhead (~120 us of
    the paper net's ~850 us step). Same updates as the single-tensor reference up to float rounding, and
    as torch's fused Adam bit for bit (tested)."""
    return LeanAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def resident(train: Split, device: torch.device) -> Split:
    """The split the training loop draws batches from: an in-memory split without train-time
    augmentation is moved to `device` once, so that its batches are index slices of tensors already
    there (no host-to-device copy per step on a GPU); any other split as it is (its batches are made on
    the host, e.g. by a DataLoader, and copied)."""
    if not train.in_memory or train.augments or train.x.device == device:
        return train
    return Split(train.x.to(device), train.y.to(device))


def train_net(
    model: nn.Module,
    batch_loss: BatchLoss,
    cfg: RunConfig,
    train: Split,
    device: torch.device,
    seed: int,
    desc: str = "train",
) -> dict:
    """Train `model` in place with Adam on `batch_loss` over seeded shuffled batches; returns info
    (per-epoch mean losses, wall time). A non-finite loss raises BenchError."""
    opt = make_optimizer(model.parameters(), cfg)
    train = resident(train, device)
    y = train.y.to(device)
    n = len(train)
    g = torch.Generator().manual_seed(seed)  # the data order is drawn on the CPU on every device
    steps = math.ceil(n / cfg.batch_size)
    history: list[float] = []
    start = time.perf_counter()
    model.train()
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        cpu_threads(cfg.train_threads, device),
    ):
        torch.manual_seed(seed + 1)  # dropout masks and any sampling inside the loss
        bar = tqdm(total=cfg.epochs * steps, desc=desc, disable=True if cfg.quiet else None, leave=False)
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=g).to(train.y.device)
            total = torch.zeros((), device=device)
            batches = [b for b in perm.split(cfg.batch_size) if b.numel() >= 2]
            seeds = (
                [item_seeds(seed, epoch, s, len(b)) for s, b in enumerate(batches)]
                if train.augments
                else None
            )
            for idx, xb in zip(batches, train.batches(batches, seeds)):
                idx = idx.to(device)
                loss = batch_loss(model, xb.to(device), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach()
                bar.update(1)
            mean_loss = float(total) / steps
            if not math.isfinite(mean_loss):
                bar.close()
                raise BenchError(
                    f"non-finite training loss in epoch {epoch + 1} ({desc}); try a smaller --set lr="
                )
            history.append(mean_loss)
        bar.close()
    model.eval()
    return {"loss_history": history, "seconds": time.perf_counter() - start}


def train_embedding(
    cfg: RunConfig, train: Split, device: torch.device, seed: int, dropout: float = 0.0, desc: str = "train"
) -> tuple[nn.Module, dict]:
    """Train one `cfg.backbone` embedding net on the shared contrastive objective; (model, info)."""
    model = build_model(cfg, train.in_shape, seed, dropout).to(device)
    return model, train_net(model, contrastive_loss(cfg), cfg, train, device, seed, desc)


def train_nets_jointly(
    models: list[nn.Module],
    cfg: RunConfig,
    train: Split,
    device: torch.device,
    seeds: list[int],
    desc: str = "train jointly",
) -> list[dict]:
    """Train M nets of one architecture side by side, in place: one vmapped forward over the stacked
    parameters (`torch.func.stack_module_state`), the batched loss over [M, B, d], one backward and
    one Adam over the stacked tensors (Adam is elementwise, so each net keeps its own moments).
    Net m keeps its own init, data order (Generator(seeds[m])) and optimiser state: it equals
    `train_net` of that net alone up to float rounding (tested). Returns one info per net; each is
    charged 1/M of the joint wall time."""
    if not models:
        return []
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules()):
        # batch-norm statistics are updated in place, which vmap cannot batch: train one by one
        return [
            train_net(model, contrastive_loss(cfg), cfg, train, device, s, f"{desc} {i + 1}/{len(models)}")
            for i, (model, s) in enumerate(zip(models, seeds))
        ]
    params, buffers = stack_module_state(models)  # name -> [M, ...] leaves that require grad
    template = copy.deepcopy(models[0]).to("meta")

    def forward(p: dict, b: dict, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(template, (p, b), (xb,))

    if getattr(models[0], "stackable", False) and not buffers:  # the backbone's own batched matmuls
        batched_forward = lambda p, b, xb: models[0].stacked_forward(p, xb)  # noqa: E731
    else:
        batched_forward = vmap(forward)
    opt = make_optimizer(list(params.values()), cfg)
    train = resident(train, device)
    y = train.y.to(device)
    n, M = len(train), len(models)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    steps = math.ceil(n / cfg.batch_size)
    history: list[list[float]] = [[] for _ in models]
    start = time.perf_counter()
    with cpu_threads(cfg.train_threads, device):
        bar = tqdm(total=cfg.epochs * steps, desc=desc, disable=True if cfg.quiet else None, leave=False)
        for epoch in range(cfg.epochs):
            perms = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(train.y.device)  # [M, n]
            total = torch.zeros(M, device=device)
            batches = [b for b in perms.split(cfg.batch_size, dim=1) if b.shape[1] >= 2]  # [M, b] each
            seeds_ = (
                [
                    torch.cat([item_seeds(sd, epoch, s, b.shape[1]) for sd in seeds])
                    for s, b in enumerate(batches)
                ]
                if train.augments
                else None
            )  # member m's items get the seeds train_net would give them
            for idx, xb in zip(batches, train.batches([b.reshape(-1) for b in batches], seeds_)):
                xb = xb.reshape(*idx.shape, *xb.shape[1:]).to(device)
                idx = idx.to(device)
                losses = batched_contrastive_loss(batched_forward(params, buffers, xb), y[idx], cfg)
                opt.zero_grad(set_to_none=True)
                losses.sum().backward()
                opt.step()
                total += losses.detach()
                bar.update(1)
            mean = (total / steps).tolist()
            if not all(math.isfinite(v) for v in mean):
                bar.close()
                raise BenchError(
                    f"non-finite training loss in epoch {epoch + 1} ({desc}); try a smaller --set lr="
                )
            for h, v in zip(history, mean):
                h.append(v)
        bar.close()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for m, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(params[name][m])
            model.eval()
    return [
        {"loss_history": h, "seconds": seconds / M, "joint_seconds": seconds, "joint_size": M}
        for h in history
    ]
