"""The run folder, the only code that knows its file names and formats: `RunWriter` for the runner,
`RunFolder` for reports and the CLI, `GridFolder` for a grid of run folders (`bench grid`).
Every file is written atomically, so a killed run resumes."""
from __future__ import annotations

import fcntl
import json
import re
import zipfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from bench import RUN_FORMAT_VERSION
from bench.atomic import atomic_savez, atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text
from bench.errors import BenchError

CONFIG = "config.json"
RESULTS, TIMINGS, SEEDS, PAIRED = "results.csv", "timings.csv", "seeds.csv", "paired.csv"
SENSITIVITY = "sensitivity.csv"
PERQUERY, METHODS, PLOTS = "perquery", "methods", "plots"
REPORTS = {"md": "report.md", "html": "report.html", "latex": "report.tex"}
RESULT_COLUMNS = ["method", "seed", "metric", "value", "ci_low", "ci_high"]
TIMING_COLUMNS = ["method", "seed", "stage", "seconds"]
COMPLETE = "complete"  # config.json status of a finished run (else "running" or "complete-with-failures")

_PERQUERY_FILE = re.compile(r"^(?P<method>.+)-seed(?P<seed>-?\d+)\.npz$")
_SCORE_ARRAY = re.compile(r"^score__(?P<set>.+?)__(?P<score>.+)$")


def score_array(query_set: str, score: str) -> str:
    """Name, in a per-query file, of the vector [N] of uncertainty score `score` on query set
    `query_set` (`id` for the ID test queries, else an OOD set's name): `score__<set>__<score>`."""
    return f"score__{query_set}__{score}"


def score_arrays(arrays: dict[str, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """{(query set, score): vector} of the score vectors in a per-query file's arrays."""
    return {(m["set"], m["score"]): v for k, v in arrays.items() if (m := _SCORE_ARRAY.match(k))}


def _stem(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def plot_path(name: str) -> str:
    """Where figure `name` lies, relative to the run folder (reports link it from there)."""
    return f"{PLOTS}/{name}.png"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # absent, truncated or not an npz
        return None


def _new_folder(out: Path, name: str) -> Path:
    """A new, empty `<out>/<timestamp>-<name>[-i]/`."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    d, i = out / f"{stamp}-{name}", 1
    while d.exists():
        d, i = out / f"{stamp}-{name}-{i}", i + 1
    d.mkdir(parents=True)
    return d


class RunWriter:
    """Writes one run folder: config.json with the run's status, each finished (method, seed) as it
    completes (per-query arrays, then its rows as the marker that it is done), and the final CSVs."""

    def __init__(self, path: Path, resumed: bool = False) -> None:
        self.path, self.resumed = Path(path), resumed

    @classmethod
    def open(cls, out: str | Path, name: str, digest: str) -> "RunWriter":
        """Resume the newest unfinished folder under `out` of the same config digest (and format
        version), else make a new `<out>/<timestamp>-<name>/`."""
        out = Path(out)
        for d in sorted(out.iterdir(), reverse=True) if out.is_dir() else []:
            meta = _read_json(d / CONFIG) if d.is_dir() and (d / CONFIG).is_file() else None
            if meta and meta.get("config_digest") == digest and meta.get("status") != COMPLETE \
                    and meta.get("format_version") == RUN_FORMAT_VERSION:
                return cls(d, resumed=True)
        return cls(_new_folder(out, name))

    def write_config(self, meta: dict, status: str) -> None:
        """config.json: `meta` (config, versions, ...) with the format version and the run's status."""
        atomic_write_json(self.path / CONFIG, {"format_version": RUN_FORMAT_VERSION, "status": status, **meta})

    def save_method(self, method: str, seed: int, arrays: dict[str, np.ndarray], rows: list[dict],
                    timings: list[dict], diagnostics: dict, sensitivity: list[dict] | None = None) -> None:
        """One finished (method, seed): its per-query arrays, then its result rows, timings,
        diagnostics and sensitivity-sweep rows (written last: their presence marks the method as done)."""
        atomic_savez(self.path / PERQUERY / f"{_stem(method, seed)}.npz", **arrays)
        atomic_write_json(self.path / METHODS / f"{_stem(method, seed)}.json",
                          {"rows": rows, "timings": timings, "diagnostics": diagnostics, "sensitivity": sensitivity or []})

    def finished(self, method: str, seed: int) -> dict | None:
        """{rows, timings, diagnostics} of a (method, seed) saved by an earlier invocation, else None."""
        f = self.path / METHODS / f"{_stem(method, seed)}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def arrays(self, method: str, seed: int) -> dict[str, np.ndarray] | None:
        """The per-query arrays of a finished (method, seed), or None when absent or unreadable."""
        return _read_npz(self.path / PERQUERY / f"{_stem(method, seed)}.npz")

    def write_tables(self, results: pd.DataFrame, timings: pd.DataFrame, seeds: pd.DataFrame,
                     paired: pd.DataFrame | None, sensitivity: pd.DataFrame | None = None) -> None:
        """results.csv, timings.csv, seeds.csv, (when there is a reference method) paired.csv and (when a
        sensitivity sweep ran) sensitivity.csv."""
        atomic_write_csv(self.path / RESULTS, results)
        atomic_write_csv(self.path / TIMINGS, timings)
        atomic_write_csv(self.path / SEEDS, seeds)
        if paired is not None:
            atomic_write_csv(self.path / PAIRED, paired)
        if sensitivity is not None:
            atomic_write_csv(self.path / SENSITIVITY, sensitivity)


class RunFolder:
    """A finished run folder, read: config.json (meta), results, timings, the optional seeds, paired and
    sensitivity tables, per-query arrays on demand; and where its report and figures are written."""

    def __init__(self, path: str | Path) -> None:
        """Read `path`; BenchError (one line) when it is not a finished run folder of this format."""
        d = self.path = Path(path)
        if not (d / CONFIG).is_file():
            raise BenchError(f"{d} is not a run folder (no {CONFIG})")
        try:
            self.meta: dict = json.loads((d / CONFIG).read_text())
        except ValueError:
            raise BenchError(f"{d}/{CONFIG} is not valid JSON") from None
        if self.meta.get("format_version") != RUN_FORMAT_VERSION:
            raise BenchError(f"{d} was written by an incompatible bench version "
                             f"(format {self.meta.get('format_version')}, expected {RUN_FORMAT_VERSION})")
        for f in (RESULTS, TIMINGS):
            if not (d / f).is_file():
                raise BenchError(f"{d} has no {f}: the run did not finish; rerun its command to resume it")
        try:
            self.results, self.timings = pd.read_csv(d / RESULTS), pd.read_csv(d / TIMINGS)
        except (ValueError, pd.errors.ParserError) as e:
            raise BenchError(f"{d}: cannot read {RESULTS}/{TIMINGS} ({e})") from None
        self.seed_table, self.paired = self._optional_csv(SEEDS), self._optional_csv(PAIRED)
        self.sensitivity = self._optional_csv(SENSITIVITY)  # the sensitivity sweep's rows, when one ran
        self._perquery: dict[tuple[str, int], dict[str, np.ndarray] | None] = {}

    def _optional_csv(self, name: str) -> pd.DataFrame | None:
        try:
            return pd.read_csv(self.path / name) if (self.path / name).is_file() else None
        except (ValueError, pd.errors.ParserError):
            return None

    @property
    def config(self) -> dict:
        """The run's resolved config, as recorded."""
        return self.meta.get("config", {})

    @property
    def methods(self) -> list[str]:
        """Methods with results: in the run's order, then any others found in results.csv."""
        found = list(dict.fromkeys(self.results["method"]))
        planned = [m for m in self.meta.get("methods", []) if m in found]
        return planned + [m for m in found if m not in planned]

    @property
    def seeds(self) -> list[int]:
        """Seeds with results, the configured ones first (the config's seed when none has results)."""
        s = [int(x) for x in self.config.get("seeds") or []]
        found = [int(x) for x in dict.fromkeys(self.results["seed"])] if not self.results.empty else []
        return [x for x in s if x in found] + [x for x in found if x not in s] or [int(self.config.get("seed", 0))]

    def post_hoc_methods(self) -> set[str] | None:
        """Methods that reuse the shared base model (None for folders that did not record it)."""
        found = self.meta.get("post_hoc_methods")
        return None if found is None else set(found)

    def class_names(self) -> list[str]:
        """Class names recorded by the runner (empty when none: legends then say `class k`)."""
        return list(self.meta.get("class_names") or [])

    def perquery(self, method: str, seed: int) -> dict[str, np.ndarray] | None:
        """Per-query arrays of (method, seed), or None when absent or unreadable (loaded once)."""
        key = (method, seed)
        if key not in self._perquery:
            self._perquery[key] = _read_npz(self.path / PERQUERY / f"{_stem(method, seed)}.npz")
        return self._perquery[key]

    def all_perquery(self) -> dict[tuple[str, int], dict[str, np.ndarray]]:
        """{(method, seed): arrays} of every per-query file, in the run's method order, then by seed."""
        found = [(m["method"], int(m["seed"])) for f in (self.path / PERQUERY).glob("*.npz")
                 if (m := _PERQUERY_FILE.match(f.name))] if (self.path / PERQUERY).is_dir() else []
        rank = {m: i for i, m in enumerate(self.meta.get("methods", []))}
        keys = sorted(found, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1]))
        return {k: a for k in keys if (a := self.perquery(*k)) is not None}

    def write_report(self, texts: dict[str, str], figures: dict[str, bytes]) -> list[Path]:
        """Write figures (name -> PNG) under plots/, removing figures of an earlier render that are
        gone, and each report (format -> text); returns the reports, then plots/ if it holds figures."""
        return _write_report(self.path, texts, figures)


def _write_report(root: Path, texts: dict[str, str], figures: dict[str, bytes]) -> list[Path]:
    """The reports (format -> text) and figures (name -> PNG, under plots/) of a run or grid folder."""
    plots = root / PLOTS
    kept = {root / plot_path(name) for name in figures}
    for name, png in figures.items():
        atomic_write_bytes(root / plot_path(name), png)
    for old in plots.glob("*.png") if plots.is_dir() else []:
        if old not in kept:
            old.unlink(missing_ok=True)
    written = []
    for fmt, text in texts.items():
        atomic_write_text(root / REPORTS[fmt], text)
        written.append(root / REPORTS[fmt])
    return written + ([plots] if figures else [])


GRID, CELLS, RUNNING, GRID_LOCK, PAIRWISE = "grid.json", "cells", "running", ".grid.lock", "pairwise.csv"
GRID_FORMAT_VERSION = 1


def is_grid(path: str | Path) -> bool:
    """Whether `path` is a grid folder (holds grid.json) rather than a run folder."""
    return (Path(path) / GRID).is_file()


def task_marker(grid: str | Path, task: str) -> Path:
    """The file a worker keeps while it runs grid task `task` (host, pid, start): `running/<task>.json`."""
    return Path(grid) / RUNNING / f"{task}.json"


class GridFolder:
    """A grid folder: grid.json (spec, versions, commit, per-cell status), cells/ (a run folder per
    cell and the shared model cache cells/cache/models), running/ (a marker per task in flight), and
    merged results.csv / timings.csv with each cell's coordinates as extra columns."""

    def __init__(self, path: str | Path) -> None:
        """Read `path`; BenchError (one line) when it is not a grid folder of this format."""
        d = self.path = Path(path)
        if not is_grid(d):
            raise BenchError(f"{d} is not a grid folder (no {GRID})")
        meta = _read_json(d / GRID)
        if meta is None:
            raise BenchError(f"{d}/{GRID} is not valid JSON")
        if meta.get("format_version") != GRID_FORMAT_VERSION:
            raise BenchError(f"{d} was written by an incompatible bench version "
                             f"(grid format {meta.get('format_version')}, expected {GRID_FORMAT_VERSION})")
        self.meta: dict = meta

    @classmethod
    def create(cls, out: str | Path, name: str, meta: dict) -> "GridFolder":
        """A new `<out>/<timestamp>-<name>/` holding grid.json = `meta` (plus the format version)."""
        d = _new_folder(Path(out), name)
        atomic_write_json(d / GRID, {"format_version": GRID_FORMAT_VERSION, **meta})
        return cls(d)

    @classmethod
    def unfinished(cls, out: str | Path, spec: dict) -> "GridFolder | None":
        """The newest grid folder under `out` with this spec that is not complete (rerunning the same
        `bench grid` command resumes it), else None."""
        out = Path(out)
        for d in sorted(out.iterdir(), reverse=True) if out.is_dir() else []:
            meta = _read_json(d / GRID) if is_grid(d) else None
            if meta and meta.get("spec") == spec and meta.get("status") != COMPLETE \
                    and meta.get("format_version") == GRID_FORMAT_VERSION:
                return cls(d)
        return None

    def save(self) -> None:
        """Write grid.json from `meta` (atomically)."""
        atomic_write_json(self.path / GRID, self.meta)

    @property
    def cells_dir(self) -> Path:
        return self.path / CELLS

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the grid for one driver: a second `bench grid --resume` on it fails with one line."""
        with open(self.path / GRID_LOCK, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise BenchError(f"{self.path} is being run by another `bench grid` process; wait for it or stop it") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def clear_markers(self) -> None:
        """Remove the task markers left by workers of an earlier, killed invocation."""
        for f in (self.path / RUNNING).glob("*.json") if (self.path / RUNNING).is_dir() else []:
            f.unlink(missing_ok=True)

    def running_tasks(self) -> list[str]:
        """Tasks whose worker has started and not yet finished (markers under running/)."""
        return [f.stem for f in (self.path / RUNNING).glob("*.json")] if (self.path / RUNNING).is_dir() else []

    def complete_runs(self) -> dict[str, Path]:
        """{config digest: run folder} of every finished run folder under cells/ (finished cells
        whose completion the driver did not record, e.g. when it was killed, are adopted from here)."""
        found = {}
        for d in sorted(self.cells_dir.iterdir()) if self.cells_dir.is_dir() else []:
            meta = _read_json(d / CONFIG) if (d / CONFIG).is_file() else None
            if meta and meta.get("status") == COMPLETE and meta.get("format_version") == RUN_FORMAT_VERSION:
                found[meta.get("config_digest")] = d
        return found

    def cell_run(self, cell: str) -> RunFolder | None:
        """The run folder of a finished cell, or None when it has none or it cannot be read."""
        rel = self.meta.get("cells", {}).get(cell, {}).get("run_dir")
        try:
            return RunFolder(self.path / rel) if rel else None
        except BenchError:
            return None

    def write_merged(self, results: pd.DataFrame, timings: pd.DataFrame) -> None:
        """The merged results.csv and timings.csv (every finished cell, coordinates as extra columns)."""
        atomic_write_csv(self.path / RESULTS, results)
        atomic_write_csv(self.path / TIMINGS, timings)

    def merged(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(results, timings) as merged by the last invocation; empty frames when absent."""
        return tuple(pd.read_csv(self.path / f) if (self.path / f).is_file() else pd.DataFrame()
                     for f in (RESULTS, TIMINGS))  # type: ignore[return-value]

    def write_pairwise(self, df: pd.DataFrame) -> None:
        """pairwise.csv: the grid report's method-vs-method significance counts."""
        atomic_write_csv(self.path / PAIRWISE, df)

    def write_report(self, texts: dict[str, str], figures: dict[str, bytes]) -> list[Path]:
        """Reports and figures of the whole grid, in the grid folder (as for a run folder)."""
        return _write_report(self.path, texts, figures)
