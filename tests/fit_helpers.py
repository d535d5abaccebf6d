"""Fitting one method outside the runner, wired the way bench/runner.py wires it (for unit tests)."""
from __future__ import annotations

from pathlib import Path

import torch

from bench.method import FitContext, Method
from bench.registry import METHODS
from bench.timing import StageTimer
from bench.train import ModelCache

CPU = torch.device("cpu")


def make_ctx(cfg, data, cache: ModelCache, timer: StageTimer, name: str, seed: int = 0) -> FitContext:
    """A FitContext whose nets come from `cache`, their recorded training seconds charged to (name, "train")."""

    def train_model(seed: int, dropout: float = 0.0, charge_to: str | None = None):
        model, info, _cached = cache.get(seed, dropout)
        timer.add(charge_to or name, "train", info["seconds"])
        return model

    return FitContext(cfg=cfg, data=data, device=CPU, timer=timer, method=name, train_model=train_model, seed=seed)


def fit_method(name: str, cfg, data, root: Path, seed: int = 0) -> tuple[Method, ModelCache, StageTimer]:
    """(method, cache, timer) after fitting `name` with a fresh ModelCache on `root`."""
    cfg = cfg.replace(seed=seed)
    cache = ModelCache(root, cfg, data.train_id, CPU)
    timer = StageTimer(CPU)
    method = METHODS.get(name)(cfg)
    method.fit(make_ctx(cfg, data, cache, timer, name, seed))
    return method, cache, timer
