"""The run folder, the only code that knows its file names and formats: `RunWriter` for the runner,
`RunFolder` for reports and the CLI, `GridFolder` for a grid of run folders (`bench grid`).
Every file is written atomically, so a killed run resumes, and recorded in a checksum manifest
(manifest.json, `Manifest`), so a file damaged afterwards is named by `verify` in one line."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from bench import RUN_FORMAT_VERSION
from bench.atomic import (
    atomic_savez,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
)
from bench.conventions import NEAR_OOD_SET, score_array, score_arrays  # noqa: F401  (the per-query file's score names)
from bench.errors import BenchError

CONFIG = "config.json"
RESULTS, TIMINGS, SEEDS, PAIRED = "results.csv", "timings.csv", "seeds.csv", "paired.csv"
SENSITIVITY = "sensitivity.csv"
PERQUERY, METHODS, PLOTS = "perquery", "methods", "plots"
REPORTS = {"md": "report.md", "html": "report.html", "latex": "report.tex"}
RESULT_COLUMNS = ["method", "seed", "metric", "value", "ci_low", "ci_high"]
TIMING_COLUMNS = ["method", "seed", "stage", "seconds"]
COMPLETE = "complete"  # config.json status of a finished run (else "running" or "complete-with-failures")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
ABSENT = "absent"  # a manifest entry's `previous` while a file that did not exist yet is being written

_PERQUERY_FILE = re.compile(r"^(?P<method>.+)-seed(?P<seed>-?\d+)\.npz$")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _entry(path: Path) -> dict:
    return {"sha256": sha256_of(path), "bytes": path.stat().st_size}


def _is_output(rel: str) -> bool:
    """Whether a recorded file is a rendered output (a report or a figure) that `bench report` rewrites."""
    return rel in REPORTS.values() or rel.startswith(f"{PLOTS}/")


class Manifest:
    """manifest.json of a run or grid folder: {files: {relative path: {sha256, bytes}}} for every file
    written through it, the manifest itself rewritten atomically after each change.

    A write is staged so that a process killed at any point leaves a folder that verifies: each file
    is first written (atomically) beside its target as `.<name>.staged`, the manifest then records its
    hash with the file's current one as `previous` (or ABSENT when there was none), the staged file
    replaces the target (os.replace), and the manifest drops `previous`. Between the steps either
    version is accepted, so a run rewriting its own files (config.json, the tables) resumes cleanly."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / MANIFEST

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict:
        """The manifest's content (an empty one when there is none); BenchError when it is damaged."""
        if not self.path.is_file():
            return {"manifest_version": MANIFEST_VERSION, "algorithm": "sha256", "files": {}}
        try:
            m = json.loads(self.path.read_text())
            if not isinstance(m.get("files"), dict):
                raise ValueError
            return m
        except (ValueError, AttributeError, OSError):
            raise BenchError(f"{self.root}: {MANIFEST} is damaged (not the manifest bench wrote)") from None

    def _save(self, m: dict) -> None:
        atomic_write_json(self.path, m)

    @staticmethod
    def _move(staged: Path, target: Path) -> None:
        os.replace(staged, target)

    def write(self, files: dict[str, Callable[[Path], None]]) -> None:
        """Write each file (relative path -> a function that writes it atomically to the path it is
        given) and record it: staged, recorded with its previous version, moved into place, recorded."""
        staged = {}
        for rel, write in files.items():
            target = self.root / rel
            tmp = target.with_name(f".{target.name}.staged")
            write(tmp)
            staged[rel] = tmp
        m = self.load()
        for rel, tmp in staged.items():
            old = m["files"].get(rel)
            target = self.root / rel
            previous = (
                ABSENT
                if not target.is_file()
                else {k: old[k] for k in ("sha256", "bytes")}
                if old
                else _entry(target)
            )
            m["files"][rel] = {**_entry(tmp), "previous": previous}
        self._save(m)
        for rel, tmp in staged.items():
            self._move(tmp, self.root / rel)
        for rel in staged:
            m["files"][rel].pop("previous", None)
        self._save(m)

    def remove(self, rels: list[str]) -> None:
        """Forget files, then delete them (a kill in between leaves an unrecorded file, not a missing one)."""
        if not rels:
            return
        m = self.load()
        for rel in rels:
            m["files"].pop(rel, None)
        self._save(m)
        for rel in rels:
            (self.root / rel).unlink(missing_ok=True)

    def check(self, outputs: bool = True) -> None:
        """BenchError naming the first recorded file that is missing or whose bytes changed (every file
        when `outputs`, else all but the reports and figures that `bench report` rewrites)."""
        for rel, e in sorted(self.load()["files"].items()):
            if not outputs and _is_output(rel):
                continue
            f = self.root / rel
            prev = e.get("previous")
            if not f.is_file():
                if prev == ABSENT:
                    continue
                raise BenchError(
                    f"{self.root}: {rel} is missing (recorded in {MANIFEST}): the folder "
                    "was damaged after bench wrote it"
                )
            size = f.stat().st_size
            accepted = [e, *([prev] if isinstance(prev, dict) else [])]
            if not any(size == a.get("bytes") and sha256_of(f) == a.get("sha256") for a in accepted):
                raise BenchError(
                    f"{self.root}: {rel} changed after bench wrote it ({size} bytes, recorded "
                    f"{e.get('bytes')}; sha256 differs): the folder is damaged; rerun the run"
                )


def verify(path: str | Path, outputs: bool = True) -> None:
    """Check a run folder (or a grid folder and every run folder under its cells/) against its checksum
    manifest: BenchError, one line naming the file, when a recorded file is missing or changed, or when
    the manifest itself is missing from a folder that was written with one. `outputs=False` skips the
    rendered reports and figures. Folders from before manifests (no `manifest` in config.json / grid.json)
    are not checked (a warning says so). For `bench report`, resuming and `bench export`."""
    root = Path(path)
    man = Manifest(root)
    meta_file = root / (GRID if is_grid(root) else CONFIG)
    if not man.exists():
        meta = _read_json(meta_file) if meta_file.is_file() else None
        if meta is not None and meta.get("manifest"):
            raise BenchError(f"{root}: {MANIFEST} is missing: the folder was damaged after bench wrote it")
        if meta is not None:
            logging.getLogger(__name__).warning(
                f"{root} has no {MANIFEST} (written before manifests): not verified"
            )
    else:
        man.check(outputs)
    if is_grid(root) and (root / CELLS).is_dir():
        for d in sorted((root / CELLS).iterdir()):
            if (d / CONFIG).is_file():
                verify(d, outputs)


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
            if (
                meta
                and meta.get("config_digest") == digest
                and meta.get("status") != COMPLETE
                and meta.get("format_version") == RUN_FORMAT_VERSION
            ):
                verify(d, outputs=False)  # a damaged file is named before the run builds on it
                return cls(d, resumed=True)
        return cls(_new_folder(out, name))

    @property
    def manifest(self) -> Manifest:
        return Manifest(self.path)

    def write_config(self, meta: dict, status: str) -> None:
        """config.json: `meta` (config, versions, ...) with the format version, the run's status and the
        manifest's version (a folder that says it has a manifest must have one)."""
        doc = {"format_version": RUN_FORMAT_VERSION, "status": status, "manifest": MANIFEST_VERSION, **meta}
        self.manifest.write({CONFIG: lambda p: atomic_write_json(p, doc)})

    def save_method(
        self,
        method: str,
        seed: int,
        arrays: dict[str, np.ndarray],
        rows: list[dict],
        timings: list[dict],
        diagnostics: dict,
        sensitivity: list[dict] | None = None,
    ) -> None:
        """One finished (method, seed): its per-query arrays, then its result rows, timings,
        diagnostics and sensitivity-sweep rows (written last: their presence marks the method as done)."""
        done = {
            "rows": rows,
            "timings": timings,
            "diagnostics": diagnostics,
            "sensitivity": sensitivity or [],
        }
        self.manifest.write(
            {
                f"{PERQUERY}/{_stem(method, seed)}.npz": lambda p: atomic_savez(p, **arrays),
                f"{METHODS}/{_stem(method, seed)}.json": lambda p: atomic_write_json(p, done),
            }
        )

    def finished(self, method: str, seed: int) -> dict | None:
        """{rows, timings, diagnostics} of a (method, seed) saved by an earlier invocation, else None."""
        f = self.path / METHODS / f"{_stem(method, seed)}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def arrays(self, method: str, seed: int) -> dict[str, np.ndarray] | None:
        """The per-query arrays of a finished (method, seed), or None when absent or unreadable."""
        return _read_npz(self.path / PERQUERY / f"{_stem(method, seed)}.npz")

    def write_tables(
        self,
        results: pd.DataFrame,
        timings: pd.DataFrame,
        seeds: pd.DataFrame,
        paired: pd.DataFrame | None,
        sensitivity: pd.DataFrame | None = None,
    ) -> None:
        """results.csv, timings.csv, seeds.csv, (when there is a reference method) paired.csv and (when a
        sensitivity sweep ran) sensitivity.csv."""
        tables = {RESULTS: results, TIMINGS: timings, SEEDS: seeds, PAIRED: paired, SENSITIVITY: sensitivity}
        self.manifest.write(
            {
                name: (lambda p, df=df: atomic_write_csv(p, df))
                for name, df in tables.items()
                if df is not None
            }
        )


class RunFolder:
    """A finished run folder, read: config.json (meta), results, timings, the optional seeds, paired and
    sensitivity tables, per-query arrays on demand; and where its report and figures are written."""

    def __init__(self, path: str | Path) -> None:
        """Read `path`; BenchError (one line) when it is not a finished run folder of this format, or
        when a file the run wrote is missing or changed (`verify`, reports and figures aside)."""
        d = self.path = Path(path)
        if not (d / CONFIG).is_file():
            raise BenchError(f"{d} is not a run folder (no {CONFIG})")
        verify(d, outputs=False)
        try:
            self.meta: dict = json.loads((d / CONFIG).read_text())
        except ValueError:
            raise BenchError(f"{d}/{CONFIG} is not valid JSON") from None
        if self.meta.get("format_version") != RUN_FORMAT_VERSION:
            raise BenchError(
                f"{d} was written by an incompatible bench version "
                f"(format {self.meta.get('format_version')}, expected {RUN_FORMAT_VERSION})"
            )
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
        return [x for x in s if x in found] + [x for x in found if x not in s] or [
            int(self.config.get("seed", 0))
        ]

    def post_hoc_methods(self) -> set[str] | None:
        """Methods that reuse the shared base model (None for folders that did not record it)."""
        found = self.meta.get("post_hoc_methods")
        return None if found is None else set(found)

    def near_ood_sets(self) -> list[str]:
        """The OOD sets that count as near-OOD (the held-out classes, plus those the dataset declares;
        only the held-out classes for folders that did not record it)."""
        return list(self.meta.get("near_ood_sets") or [NEAR_OOD_SET])

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
        found = (
            [
                (m["method"], int(m["seed"]))
                for f in (self.path / PERQUERY).glob("*.npz")
                if (m := _PERQUERY_FILE.match(f.name))
            ]
            if (self.path / PERQUERY).is_dir()
            else []
        )
        rank = {m: i for i, m in enumerate(self.meta.get("methods", []))}
        keys = sorted(found, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1]))
        return {k: a for k in keys if (a := self.perquery(*k)) is not None}

    def write_report(self, texts: dict[str, str], figures: dict[str, bytes]) -> list[Path]:
        """Write figures (name -> PNG) under plots/, removing figures of an earlier render that are
        gone, and each report (format -> text); returns the reports, then plots/ if it holds figures."""
        return _write_report(self.path, texts, figures)


def _write_report(root: Path, texts: dict[str, str], figures: dict[str, bytes]) -> list[Path]:
    """The reports (format -> text) and figures (name -> PNG, under plots/) of a run or grid folder,
    recorded in its manifest."""
    plots = root / PLOTS
    kept = {plot_path(name) for name in figures}
    man = Manifest(root)
    files = {
        plot_path(name): (lambda p, png=png: atomic_write_bytes(p, png)) for name, png in figures.items()
    }
    files.update(
        {REPORTS[fmt]: (lambda p, text=text: atomic_write_text(p, text)) for fmt, text in texts.items()}
    )
    man.write(files)
    man.remove(
        [
            f"{PLOTS}/{old.name}"
            for old in (plots.glob("*.png") if plots.is_dir() else [])
            if f"{PLOTS}/{old.name}" not in kept
        ]
    )
    return [root / REPORTS[fmt] for fmt in texts] + ([plots] if figures else [])


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

    def near_ood_sets(self) -> list[str]:
        """The near-OOD sets its cells recorded (`RunFolder.near_ood_sets`), the held-out classes always."""
        found = {NEAR_OOD_SET}
        for cell in self.meta.get("cells", {}).values():
            meta = _read_json(self.path / cell["run_dir"] / CONFIG) if cell.get("run_dir") else None
            found.update((meta or {}).get("near_ood_sets") or ())
        return sorted(found)

    def __init__(self, path: str | Path) -> None:
        """Read `path`; BenchError (one line) when it is not a grid folder of this format."""
        d = self.path = Path(path)
        if not is_grid(d):
            raise BenchError(f"{d} is not a grid folder (no {GRID})")
        meta = _read_json(d / GRID)
        if meta is None:
            raise BenchError(f"{d}/{GRID} is not valid JSON")
        if meta.get("format_version") != GRID_FORMAT_VERSION:
            raise BenchError(
                f"{d} was written by an incompatible bench version "
                f"(grid format {meta.get('format_version')}, expected {GRID_FORMAT_VERSION})"
            )
        self.meta: dict = meta

    @classmethod
    def create(cls, out: str | Path, name: str, meta: dict) -> "GridFolder":
        """A new `<out>/<timestamp>-<name>/` holding grid.json = `meta` (plus the format version)."""
        d = _new_folder(Path(out), name)
        doc = {"format_version": GRID_FORMAT_VERSION, "manifest": MANIFEST_VERSION, **meta}
        Manifest(d).write({GRID: lambda p: atomic_write_json(p, doc)})
        return cls(d)

    @classmethod
    def unfinished(cls, out: str | Path, spec: dict) -> "GridFolder | None":
        """The newest grid folder under `out` with this spec that is not complete (rerunning the same
        `bench grid` command resumes it), else None."""
        out = Path(out)
        for d in sorted(out.iterdir(), reverse=True) if out.is_dir() else []:
            meta = _read_json(d / GRID) if is_grid(d) else None
            if (
                meta
                and meta.get("spec") == spec
                and meta.get("status") != COMPLETE
                and meta.get("format_version") == GRID_FORMAT_VERSION
            ):
                return cls(d)
        return None

    def save(self) -> None:
        """Write grid.json from `meta` (atomically, recorded in the grid's manifest)."""
        Manifest(self.path).write({GRID: lambda p: atomic_write_json(p, self.meta)})

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
                raise BenchError(
                    f"{self.path} is being run by another `bench grid` process; wait for it or stop it"
                ) from None
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
        return (
            [f.stem for f in (self.path / RUNNING).glob("*.json")] if (self.path / RUNNING).is_dir() else []
        )

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
        Manifest(self.path).write(
            {RESULTS: lambda p: atomic_write_csv(p, results), TIMINGS: lambda p: atomic_write_csv(p, timings)}
        )

    def merged(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(results, timings) as merged by the last invocation; empty frames when absent."""
        return tuple(
            pd.read_csv(self.path / f) if (self.path / f).is_file() else pd.DataFrame()
            for f in (RESULTS, TIMINGS)
        )  # type: ignore[return-value]

    def write_pairwise(self, df: pd.DataFrame) -> None:
        """pairwise.csv: the grid report's method-vs-method significance counts."""
        Manifest(self.path).write({PAIRWISE: lambda p: atomic_write_csv(p, df)})

    def write_report(self, texts: dict[str, str], figures: dict[str, bytes]) -> list[Path]:
        """Reports and figures of the whole grid, in the grid folder (as for a run folder)."""
        return _write_report(self.path, texts, figures)
