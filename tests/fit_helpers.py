"""Fitting one method outside the runner, wired the way the runner wires it (for unit tests)."""
from __future__ import annotations

from pathlib import Path

import torch

from bench.method import Method
from bench.registry import METHODS
from bench.runner import fit_context
from bench.timing import StageTimer
from bench.train import ModelCache

CPU = torch.device("cpu")


def fit_method(name: str, cfg, data, root: Path, seed: int = 0) -> tuple[Method, ModelCache, StageTimer]:
    """(method, cache, timer) after fitting `name` with a fresh ModelCache on `root`."""
    cfg = cfg.replace(seed=seed)
    cache = ModelCache(root, cfg, data.train_id, CPU)
    timer = StageTimer(CPU)
    method = METHODS.get(name)(cfg)
    method.fit(fit_context(cfg, data, CPU, cache, timer, name, method.post_hoc, set()))
    return method, cache, timer
