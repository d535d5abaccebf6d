"""Fitting one method outside the runner, wired the way the runner wires it (for unit tests)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bench.method import Method
from bench.model_cache import ModelCache
from bench.registry import METHODS
from bench.runner import fit_context
from bench.timing import StageTimer

CPU = torch.device("cpu")
DEVICE_ENV = "BENCH_TEST_DEVICE"  # set by tests/conftest.py from `pytest --device`


def run_device() -> torch.device:
    """The device of the method-fitting tests: `pytest --device` (cpu by default)."""
    return torch.device(os.environ.get(DEVICE_ENV, "cpu"))


def predict_on(method: Method, x: torch.Tensor):
    """method.predict(x) on `run_device()`, the prediction back on the CPU."""
    return method.predict(x.to(run_device())).to("cpu")


def fit_method(name: str, cfg, data, root: Path, seed: int = 0) -> tuple[Method, ModelCache, StageTimer]:
    """(method, cache, timer) after fitting `name` with a fresh ModelCache on `root`, on `run_device()`."""
    cfg, device = cfg.replace(seed=seed), run_device()
    cache = ModelCache(root, cfg, data.train_id, device)
    timer = StageTimer(device)
    method = METHODS.get(name)(cfg)
    method.fit(fit_context(cfg, data, device, cache, timer, name, method.reuses_base_model, set()))
    return method, cache, timer
