"""What a grid worker runs: a base-model training into the shared cache, or one cell (`runner.run`
of one method and seed); errors come back as data, and a marker file shows the task is in flight."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from bench.atomic import atomic_write_json
from bench.errors import error_record
from bench.grid.spec import config_from_dict
from bench.run_folder import task_marker


def train_base(config: dict) -> dict:
    """Train (or find) the base model of config's dataset, weights and seed in the cache the cells
    read (`<cfg.out>/cache/models`, as `runner.run` does); returns how many models it trained."""
    import torch  # noqa: F401  (imported here: the driver never needs it)

    from bench.environment import resolve_device
    from bench.features import prepare_benchmark
    from bench.model_cache import ModelCache

    cfg = config_from_dict(config)
    device = resolve_device(cfg.device)
    data, _ = prepare_benchmark(cfg, device, Path(cfg.out) / "cache")  # a frozen trunk's features, cached too
    cache = ModelCache(Path(cfg.out) / "cache" / "models", cfg, data.train_id, device)
    _, info, cached = cache.get(cfg.seed)
    return {"models_trained": cache.trained, "train_seconds": info["seconds"], "cached": cached}


def run_cell(config: dict) -> dict:
    """One cell: `runner.run` of its config (one method, one seed), quietly, resuming an unfinished
    run folder of the same config; returns its folder, status, failures and models trained."""
    from bench.run_folder import RunFolder
    from bench.runner import run

    path = run(config_from_dict(config), log=lambda *a, **k: None)
    meta = RunFolder(path).meta
    return {
        "run_dir": str(path),
        "status": meta["status"],
        "failures": meta.get("failures", []),
        "models_trained": meta.get("models_trained", 0),
    }


TASKS = {"base": train_base, "cell": run_cell}


def run_task(kind: str, config: dict, grid: str, task: str, threads: int = 0) -> dict:
    """Run task `task` of the grid folder `grid` in this worker: {"ok": True, ...the task's result,
    seconds} or {"ok": False, error, traceback}. While it runs, `running/<task>.json` names this host
    and process (the marker is removed before the result is returned)."""
    marker = task_marker(grid, task)
    atomic_write_json(
        marker, {"task": task, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    )
    start = time.perf_counter()
    try:
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        out = {"ok": True, **TASKS[kind](config)}
    except Exception as e:  # the grid records it; the other tasks go on
        out = {"ok": False, **error_record(e)}
    finally:
        marker.unlink(missing_ok=True)
    return {**out, "seconds": time.perf_counter() - start}
