"""The shared run loop: one dataset, one cached base model, every method fitted and scored the same
way, results saved per method as they complete so a killed run resumes where it stopped."""
from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench import RUN_FORMAT_VERSION, __version__
from bench.config import ALL_METHODS, RunConfig
from bench.environment import device_description, git_commit, package_versions, resolve_device
from bench.errors import BenchError
from bench.evaluate import evaluate
from bench.metrics.aggregate import paired_differences, seed_summary
from bench.method import EmbeddingPrediction, FitContext, Method
from bench.registry import METHODS
from bench.atomic import atomic_savez, atomic_write_csv, atomic_write_json
from bench.timing import StageTimer
from bench.conventions import BASE_METHOD as BASE, REFERENCE_METHOD
from bench.data import Dataset, load_benchmark
from bench.train import ModelCache


def resolve_methods(cfg: RunConfig) -> list[str]:
    """Expand 'all', check every name against the registry (BenchError lists the known ones) and
    let each method validate its options."""
    out: list[str] = []
    registered = sorted(METHODS.names(), key=lambda m: m != REFERENCE_METHOD)  # the reference first
    for n in cfg.methods:
        for m in (registered if n == ALL_METHODS else [n]):
            METHODS.get(m).validate(cfg)
            if m not in out:
                out.append(m)
    if not out:
        raise BenchError("empty method list: give at least one method (see `python -m bench list`)")
    return out


@dataclass
class RunState:
    """What one run carries from seed to seed: the folder, the timings and the failures."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    methods: list[str]
    failures: list[dict] = field(default_factory=list)
    caches: list[ModelCache] = field(default_factory=list)


def _find_resumable(cfg: RunConfig) -> Path | None:
    out = Path(cfg.out)
    if not out.is_dir():
        return None
    digest = cfg.digest()
    for d in sorted(out.iterdir(), reverse=True):
        cj = d / "config.json"
        if d.is_dir() and cj.is_file():
            try:
                meta = json.loads(cj.read_text())
            except (OSError, ValueError):
                continue
            if meta.get("config_digest") == digest and meta.get("status") != "complete" \
                    and meta.get("format_version") == RUN_FORMAT_VERSION:
                return d
    return None


def make_run_dir(cfg: RunConfig) -> tuple[Path, bool]:
    """(run folder, resumed): an unfinished folder of the same config is resumed, else a new
    `<out>/<timestamp>-<name>/` is made."""
    found = _find_resumable(cfg)
    if found is not None:
        return found, True
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    d = Path(cfg.out) / f"{stamp}-{cfg.name}"
    i = 1
    while d.exists():
        d = Path(cfg.out) / f"{stamp}-{cfg.name}-{i}"
        i += 1
    d.mkdir(parents=True)
    return d, False


def write_config(state: RunState, status: str, extra: dict | None = None) -> None:
    """config.json: the resolved config, versions, commit, device and the run's status."""
    meta = {
        "format_version": RUN_FORMAT_VERSION,
        "bench_version": __version__,
        "status": status,
        "config": state.cfg.to_dict(),
        "config_digest": state.cfg.digest(),
        "methods": state.methods,
        "device": str(state.device),
        "device_description": device_description(state.device),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "command": "python -m bench " + " ".join(sys.argv[1:]) if sys.argv and "bench" in sys.argv[0] else None,
        "failures": state.failures,
        **(extra or {}),
    }
    atomic_write_json(state.run_dir / "config.json", meta)


def _predict_all(method: Method, data: Dataset, device: torch.device) -> tuple[EmbeddingPrediction, dict[str, EmbeddingPrediction]]:
    with torch.no_grad():  # torch.func transforms (GLM Jacobians) still work inside
        pid = method.predict(data.test_id.x.to(device)).to("cpu")
        pood = {k: method.predict(s.x.to(device)).to("cpu") for k, s in data.test_ood.items()}
    return pid, pood


def _prediction_arrays(prefix: str, pred: EmbeddingPrediction, labels: torch.Tensor) -> dict[str, np.ndarray]:
    arrs = {f"{prefix}_mean": pred.mean.numpy(), f"{prefix}_labels": labels.numpy()}
    if pred.var is not None:
        arrs[f"{prefix}_var"] = pred.var.numpy()
    return arrs


def run_method(state: RunState, name: str, seed: int, data: Dataset, cache: ModelCache, timer: StageTimer,
               charged_base: set) -> tuple[list[dict], dict]:
    """Fit, predict and score one method for one seed; saves its per-query arrays and rows."""
    cfg = state.cfg.replace(seed=seed)
    method: Method = METHODS.get(name)(cfg)

    def train_model(seed: int, dropout: float = 0.0, charge_to: str | None = None):
        model, info, _cached = cache.get(seed, dropout)
        who = charge_to or (BASE if (dropout == 0.0 and seed == cfg.seed and method.post_hoc) else name)
        if who != BASE or (seed, dropout) not in charged_base:
            timer.add(who, "train", info["seconds"])  # recorded cost, also when loaded from cache
            if who == BASE:
                charged_base.add((seed, dropout))
        return model

    ctx = FitContext(cfg=cfg, data=data, device=state.device, timer=timer, method=name,
                     train_model=train_model, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method.fit(ctx)
        with timer.stage(name, "predict"):
            pred_id, pred_ood = _predict_all(method, data, state.device)
    with timer.stage(name, "evaluate"):
        ev = evaluate(pred_id, pred_ood, data, cfg)
        rows = [{"method": name, "seed": seed, **r} for r in ev.rows(cfg)]
    arrays = _prediction_arrays("id", pred_id, data.test_id.y)
    for k, p in pred_ood.items():
        arrays.update(_prediction_arrays(f"ood_{k}", p, data.test_ood[k].y))
    arrays.update({f"pq_{k}": v for k, v in ev.per_query.items()})
    arrays.update({f"extra_{k}": v for k, v in ev.extras.items()})
    atomic_savez(state.run_dir / "perquery" / f"{name}-seed{seed}.npz", **arrays)
    return rows, method.diagnostics


def run(cfg: RunConfig, log=print) -> Path:
    """Run every method of cfg over every seed; returns the run folder."""
    methods = resolve_methods(cfg)
    device = resolve_device(cfg.device)
    data = load_benchmark(cfg)  # bad data fails here, before any run folder exists
    run_dir, resumed = make_run_dir(cfg)
    state = RunState(cfg, run_dir, device, methods)
    write_config(state, "running")
    log(f"run folder: {run_dir}" + (" (resuming)" if resumed else ""))
    cache_root = Path(cfg.out) / "cache" / "models"
    all_rows: list[dict] = []
    all_times: list[dict] = []
    diagnostics: dict[str, dict] = {}
    t0 = time.perf_counter()
    for seed in cfg.resolved_seeds():
        cache = ModelCache(cache_root, cfg.replace(seed=seed), data.train_id, device)
        state.caches.append(cache)
        timer = StageTimer(device)
        charged_base: set = set()
        for name in methods:
            done = run_dir / "methods" / f"{name}-seed{seed}.json"
            if done.is_file():
                saved = json.loads(done.read_text())
                all_rows += saved["rows"]
                all_times += saved["timings"]
                diagnostics[f"{name}-seed{seed}"] = saved.get("diagnostics", {})
                if any(t["method"] == BASE for t in saved["timings"]):
                    charged_base.add((seed, 0.0))
                log(f"  {name} (seed {seed}): done earlier, reused")
                continue
            log(f"  {name} (seed {seed}) ...")
            before = set(timer.records)
            try:
                rows, diag = run_method(state, name, seed, data, cache, timer, charged_base)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one failing method must not lose the others
                msg = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
                state.failures.append({"method": name, "seed": seed, "error": msg,
                                       "traceback": traceback.format_exc() if not isinstance(e, BenchError) else ""})
                log(f"  {name} (seed {seed}) FAILED: {msg}")
                if (BASE, "train") not in before and timer.records.pop((BASE, "train"), None) is not None:
                    charged_base.discard((seed, 0.0))  # the next method that uses the base model records it
                continue
            # this method's stages, plus the shared base training when it was first charged here
            times = [{"method": m, "seed": seed, "stage": st, "seconds": t}
                     for (m, st), t in timer.records.items() if (m, st) not in before]
            atomic_write_json(done, {"rows": rows, "timings": times, "diagnostics": diag})
            all_rows += rows
            all_times += times
            diagnostics[f"{name}-seed{seed}"] = diag
    results = pd.DataFrame(all_rows, columns=["method", "seed", "metric", "value", "ci_low", "ci_high"])
    timings = pd.DataFrame(all_times, columns=["method", "seed", "stage", "seconds"])
    timings = timings.groupby(["method", "seed", "stage"], as_index=False, sort=False)["seconds"].sum()
    atomic_write_csv(run_dir / "results.csv", results)
    atomic_write_csv(run_dir / "timings.csv", timings)
    atomic_write_csv(run_dir / "seeds.csv", seed_summary(results, cfg.ci_level))
    if REFERENCE_METHOD in methods:
        atomic_write_csv(run_dir / "paired.csv", paired_differences(run_dir, REFERENCE_METHOD))
    status = "complete" if not state.failures else "complete-with-failures"
    write_config(state, status, {"diagnostics": diagnostics, "wall_seconds": time.perf_counter() - t0,
                                 "models_trained": sum(c.trained for c in state.caches),
                                 "class_names": data.class_names,
                                 "data": {"train_id": len(data.train_id), "test_id": len(data.test_id),
                                          **{f"ood_{k}": len(v) for k, v in data.test_ood.items()}}})
    return run_dir
