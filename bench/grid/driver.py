"""The grid driver: creates the grid folder, schedules base-model tasks before the cells that need
them, records every outcome in grid.json, shows one progress line, and merges the cells' tables."""

from __future__ import annotations

import heapq
import itertools
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pandas as pd

from bench import __version__
from bench.environment import git_commit, package_versions
from bench.grid.executors import ExecutorOptions, make_executor
from bench.grid.spec import GridSpec, base_configs, expand, record_base, show, task_config
from bench.run_folder import COMPLETE, RESULT_COLUMNS, TIMING_COLUMNS, GridFolder, task_marker

DONE, FAILED, PENDING = "done", "failed", "pending"
SAVE_EVERY = 1.0  # seconds between grid.json writes while tasks finish (and always at the end)


def _command() -> str | None:
    return "python -m bench " + " ".join(sys.argv[1:]) if sys.argv and "bench" in sys.argv[0] else None


def create_grid(spec: GridSpec, out: str | Path, name: str = "grid") -> GridFolder:
    """Expand `spec` (every cell's config validated first) and write a new grid folder under `out`;
    an unfinished grid of the same spec under `out` is returned instead (the same command resumes)."""
    cells, bases = expand(spec)
    found = GridFolder.unfinished(out, spec.to_dict())
    if found is not None:
        return found
    meta = {
        "bench_version": __version__,
        "packages": package_versions(),
        "git_commit": git_commit(),
        "created": datetime.now().isoformat(timespec="seconds"),
        "command": _command(),
        "spec": spec.to_dict(),
        "axes": {k: [show(v) for v in vals] for k, vals in spec.axes.items()},
        "base_config": spec.base_config().to_dict(),
        **({"base_configs": base_configs(spec)} if spec.presets else {}),
        "status": PENDING,
        "cells": cells,
        "bases": bases,
        "invocations": [],
    }
    return GridFolder.create(out, name, meta)


def coordinate_columns(grid: GridFolder) -> list[str]:
    """The leading columns of the merged tables: cell, preset (grids over several presets), dataset
    and each axis."""
    several = "base_configs" in grid.meta
    return ["cell", *(["preset"] if several else []), "dataset", *grid.meta["axes"]]


def coordinates(grid: GridFolder, cell: str) -> dict[str, str]:
    """The extra columns of a cell's rows in the merged tables: cell, (preset,) dataset, axis values."""
    c = grid.meta["cells"][cell]
    where = {"preset": c["preset"]} if "base_configs" in grid.meta else {}
    return {
        "cell": cell,
        **where,
        "dataset": c["dataset"],
        **{k: show(c["point"].get(k)) for k in grid.meta["axes"]},
    }


def merge_tables(grid: GridFolder) -> tuple[pd.DataFrame, pd.DataFrame]:
    """results.csv and timings.csv of every finished cell, with its coordinates as leading columns."""
    coord_cols = coordinate_columns(grid)
    res, tim = [], []
    for cid, c in grid.meta["cells"].items():
        run = grid.cell_run(cid) if c["status"] == DONE else None
        if run is not None:
            co = coordinates(grid, cid)
            res.append(run.results.assign(**co))
            tim.append(run.timings.assign(**co))

    def frame(parts: list[pd.DataFrame], cols: list[str]) -> pd.DataFrame:
        return (pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols))[cols]

    return frame(res, coord_cols + RESULT_COLUMNS), frame(tim, coord_cols + TIMING_COLUMNS)


class Progress:
    """One live tqdm line per grid (cells done / running / failed, ETA) on a terminal; otherwise, or
    with `quiet`, a plain line per finished cell (log-friendly)."""

    def __init__(self, total: int, done: int, quiet: bool, log: Callable[[str], None]) -> None:
        from tqdm.auto import tqdm

        self.log, self.total = log, total
        self.bar = tqdm(
            total=total,
            initial=done,
            desc="grid",
            unit="cell",
            disable=True if quiet else None,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        self.lines = bool(self.bar.disable)

    def update(
        self, done: int, failed: int, running: int, finished: str | None = None, error: str | None = None
    ) -> None:
        if self.lines:
            if finished:
                what = f"FAILED: {error.splitlines()[0]}" if error else "done"
                self.log(f"[{done + failed}/{self.total}] {finished} {what}")
            return
        self.bar.n = done + failed
        self.bar.set_postfix_str(f"done {done} · running {running} · failed {failed}", refresh=False)
        self.bar.refresh()
        if error:
            self.bar.write(f"{finished} FAILED: {error.splitlines()[0]}")

    def close(self) -> None:
        self.bar.close()


class _Scheduler:
    """The grid's state during one invocation: which tasks are ready (bases first, then cells that
    train their own nets, then post-hoc cells), which wait for a base, which are in flight."""

    def __init__(self, grid: GridFolder) -> None:
        self.grid, self.meta = grid, grid.meta
        self.ready: list[tuple[int, int, str, str]] = []
        self.waiting: dict[str, list[str]] = {}
        self.flight: dict[str, tuple[str, str]] = {}  # task key -> (kind, id)
        self._seq = itertools.count()

    def push(self, kind: str, tid: str) -> None:
        rank = 0 if kind == "base" else 1 if self.meta["cells"][tid]["base"] is None else 2
        heapq.heappush(self.ready, (rank, next(self._seq), kind, tid))

    def plan(self) -> list[str]:
        """Mark what this invocation runs: unfinished cells (a finished one whose run folder is gone
        counts as unfinished; one finished but unrecorded is adopted), and the bases they need."""
        cells, bases = self.meta["cells"], self.meta["bases"]
        adopt = self.grid.complete_runs()
        todo = []
        for cid, c in cells.items():
            if c["status"] == DONE and self.grid.cell_run(cid) is not None:
                continue
            found = adopt.get(self._config(cid).digest())
            if found is not None:
                c.update(
                    status=DONE, error=None, traceback=None, run_dir=str(found.relative_to(self.grid.path))
                )
                continue
            c.update(status=PENDING, error=None, traceback=None)
            todo.append(cid)
            b = c["base"]
            if b is None or bases[b]["status"] == DONE:
                self.push("cell", cid)
            else:
                if b not in self.waiting:
                    self.push("base", b)
                self.waiting.setdefault(b, []).append(cid)
        return todo

    def _config(self, cid: str):
        c = self.meta["cells"][cid]
        return task_config(record_base(self.meta, c), c, cid, str(self.grid.cells_dir), c["method"])

    def task_args(self, kind: str, tid: str, threads: int) -> tuple:
        if kind == "base":
            rec = self.meta["bases"][tid]
            cfg = task_config(record_base(self.meta, rec), rec, tid, str(self.grid.cells_dir))
        else:
            cfg = self._config(tid)
        return (kind, cfg.to_dict(), str(self.grid.path), f"{kind}-{tid}", threads)

    def finish(self, kind: str, tid: str, out: dict) -> tuple[list[str], str | None]:
        """Record an outcome; returns (cells now finished, error). A failed base fails its waiting cells."""
        rec = self.meta["bases" if kind == "base" else "cells"][tid]
        rec["attempts"] = rec.get("attempts", 0) + 1
        rec["models_trained"] = rec.get("models_trained", 0) + int(out.get("models_trained") or 0)
        rec["seconds"] = round(out.get("seconds", 0.0), 3)
        error = out.get("error")
        if out.get("ok") and kind == "cell":
            rec["run_dir"] = str(Path(out["run_dir"]).relative_to(self.grid.path))
            if out["status"] != COMPLETE:
                error = (
                    "; ".join(f["error"] for f in out["failures"]) or f"run ended with status {out['status']}"
                )
                out = {**out, "traceback": "\n".join(f.get("traceback", "") for f in out["failures"])}
        rec.update(status=FAILED if error else DONE, error=error, traceback=out.get("traceback") or None)
        if kind == "cell":
            return [tid], error
        dependents = self.waiting.pop(tid, [])
        for cid in dependents:
            if error:
                self.meta["cells"][cid].update(
                    status=FAILED, error=f"base model task {tid} failed: {error}", traceback=None
                )
            else:
                self.push("cell", cid)
        return (dependents if error else []), error


def run_grid(
    grid: GridFolder,
    opts: ExecutorOptions | None = None,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> GridFolder:
    """Run every unfinished cell of `grid` (and the base models they need) on the executor, record
    each outcome in grid.json as it comes, and write the merged results.csv / timings.csv. Finished
    cells are never recomputed; failed, killed or interrupted ones are rerun by the next call.
    `opts` None: the default ExecutorOptions()."""
    if opts is None:
        opts = ExecutorOptions()
    with grid.lock():
        grid.clear_markers()
        meta = grid.meta
        sched = _Scheduler(grid)
        todo = sched.plan()
        cells = meta["cells"]
        count = lambda s: sum(c["status"] == s for c in cells.values())  # noqa: E731
        invocation = {
            "started": datetime.now().isoformat(timespec="seconds"),
            "bench_version": __version__,
            "git_commit": git_commit(),
            "command": _command(),
            "cells_to_run": len(todo),
        }
        again = " (resuming)" if meta["invocations"] else ""
        log(
            f"grid {grid.path}{again}: {len(todo)} of {len(cells)} cells to run, "
            f"{len(sched.waiting)} base models first"
        )
        meta["invocations"].append(invocation)
        meta["status"] = "running"
        grid.save()
        t0 = time.perf_counter()
        progress = Progress(len(cells), count(DONE), quiet, log)
        executor, interrupted = None, True
        try:
            if todo:
                executor = make_executor(opts)
                invocation.update(executor.describe())
            last_save = time.perf_counter()
            while sched.ready or sched.flight:
                while sched.ready and (executor.slots is None or len(sched.flight) < executor.slots):
                    _, _, kind, tid = heapq.heappop(sched.ready)
                    key = f"{kind}-{tid}"
                    sched.flight[key] = (kind, tid)
                    (meta["bases"] if kind == "base" else cells)[tid]["status"] = "running"
                    executor.submit(key, sched.task_args(kind, tid, opts.threads))
                for key, out in executor.poll(timeout=0.5):
                    kind, tid = sched.flight.pop(key)
                    task_marker(grid.path, key).unlink(missing_ok=True)  # a killed worker leaves its marker
                    finished, error = sched.finish(kind, tid, out)
                    for cid in finished:
                        progress.update(
                            count(DONE), count(FAILED), len(grid.running_tasks()), cid, cells[cid]["error"]
                        )
                progress.update(count(DONE), count(FAILED), len(grid.running_tasks()))
                if time.perf_counter() - last_save > SAVE_EVERY:
                    grid.save()
                    last_save = time.perf_counter()
            interrupted = False
        finally:
            progress.close()
            if executor is not None:
                executor.close(cancel=interrupted)
            for kind, tid in sched.flight.values():
                (meta["bases"] if kind == "base" else cells)[tid].update(
                    status="interrupted", error="interrupted"
                )
            results, timings = merge_tables(grid)
            grid.write_merged(results, timings)
            invocation["wall_seconds"] = round(time.perf_counter() - t0, 3)
            meta["status"] = (
                "interrupted" if interrupted else COMPLETE if count(DONE) == len(cells) else "incomplete"
            )
            grid.save()
        log(
            f"grid {grid.path}: {count(DONE)}/{len(cells)} cells done, {count(FAILED)} failed "
            f"({invocation['wall_seconds']:.1f} s)"
            + ("; `bench grid --resume` reruns the failed ones" if count(FAILED) else "")
        )
        return grid
