"""Experiment files: `bench run --config FILE` and `bench grid --config FILE` (YAML or JSON).

A file is a mapping of the fields `--set` takes (any RunConfig field or declared method option, by
name) plus `preset`, `methods`, `seeds` and `datasets`, and `extends: OTHER.yaml` (a path relative to
the file) to start from another file, e.g. a smoke variant of a full experiment. Values are written
natively (`hidden: [32, 32]`, `n_test: null`) or as `--set` writes them (`hidden: 32,32`). In a grid
file a list of values of a non-tuple field, or a list of lists of a tuple field, is an axis; `seeds`
may be a list or a range string (`0-4`). A run folder's config.json is an experiment file too: it
reruns that run (its resolved config and methods). Command-line flags override the file.

Every value goes through the same parser as `--set` (bench.config.parse_value), so a file cannot
express anything the command line cannot; an unknown key or a bad value is one line naming the file
and the key (BenchError, exit 2)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from bench.config import RunConfig, declared_options, parse_value
from bench.errors import BenchError

RUN_KEYS = ("preset", "methods", "seeds", "datasets")  # beyond the config fields and method options
GRID_KEYS = (
    "preset",
    "presets",
    "methods",
    "seeds",
    "datasets",
    "dataset",
    "seed",
    "device",
    "data_dir",
    "name",
    "out",
)
EXTENDS = "extends"
MAX_DEPTH = 8  # `extends` chain


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise BenchError(f"cannot read experiment file {path}: {e.strerror or e}") from None
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise BenchError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}{at}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise BenchError(
            f"{path}: an experiment file must be a mapping of field: value, got {type(doc).__name__}"
        )
    return doc


def read_experiment(path: str | Path, _depth: int = 0) -> dict[str, Any]:
    """The file's mapping, `extends` resolved (the extended file first, this one's keys over it), keys
    normalised like `--set` (`batch-size` -> `batch_size`). A run folder's config.json becomes its
    recorded config with `methods` = the methods the run resolved."""
    path = Path(path)
    doc = _read(path)
    if isinstance(doc.get("config"), dict) and "format_version" in doc:  # a run folder's config.json
        cfg = dict(doc["config"])
        cfg.setdefault("recipe", "default")  # recorded before recipes: it ran at the harness's defaults
        cfg.setdefault("explicit", [])  # what was set on purpose then (`bench.config.apply_overrides`)
        if doc.get("methods"):
            cfg["methods"] = list(doc["methods"])
        return cfg
    doc = {str(k).strip().replace("-", "_"): v for k, v in doc.items()}
    base = doc.pop(EXTENDS, None)
    if base is None:
        return doc
    if _depth >= MAX_DEPTH or not isinstance(base, str):
        raise BenchError(f"{path}: {EXTENDS} must name one file (and not form a loop)")
    return {**read_experiment(path.parent / base, _depth + 1), **doc}


def as_set_text(value: Any) -> str:
    """A native value as `--set` writes it: lists comma-joined, None as none, booleans as true/false."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, tuple, dict)) for v in value):
            raise ValueError("nested list")
        return ",".join(as_set_text(v) for v in value)
    if isinstance(value, dict):
        raise ValueError("mapping")
    return str(value)


def _known(extra: tuple[str, ...]) -> set[str]:
    return {f.name for f in fields(RunConfig)} | set(declared_options()) | set(extra)


def _unknown(path: Path, key: str) -> BenchError:
    return BenchError(
        f"{path}: unknown key {key!r}: expected a config field or method option (as `--set` takes, "
        "see `python -m bench list` and bench/config.py), or preset, methods, seeds, datasets"
    )


def _parse(path: Path, key: str, value: Any) -> Any:
    try:
        text = as_set_text(value)
    except ValueError:
        raise BenchError(
            f"{path}: bad value for {key}: {value!r} (expected a value as --set {key}=... takes)"
        ) from None
    try:
        return parse_value(key, text)
    except BenchError as e:
        raise BenchError(f"{path}: {e}") from None


def run_overrides(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """(preset or None, typed overrides) of a run experiment file, every key checked and every value
    parsed as `--set` parses it. `datasets` may name one dataset (a run has one)."""
    path = Path(path)
    doc = read_experiment(path)
    known = _known(RUN_KEYS)
    preset = doc.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise BenchError(f"{path}: bad value for preset: {preset!r} (expected a preset name)")
    if "datasets" in doc:
        ds = doc.pop("datasets")
        ds = [ds] if isinstance(ds, str) else ds
        if not isinstance(ds, list) or len(ds) != 1:
            raise BenchError(f"{path}: datasets: a run has one dataset (several: use `bench grid --config`)")
        doc["dataset"] = ds[0]
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in known:
            raise _unknown(path, key)
        if key == "method_options":  # a run folder's config.json: [[name, value], ...]
            for pair in value or []:
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                    raise BenchError(f"{path}: bad value for method_options: expected [name, value] pairs")
                if pair[0] not in declared_options():
                    raise _unknown(path, str(pair[0]))
                out[pair[0]] = _parse(path, pair[0], pair[1])
            continue
        out[key] = _parse(path, key, value)
    return preset, out


def _axis_text(path: Path, key: str, value: Any) -> str:
    """A grid file's value as a `--set` item's value: a list is an axis (values joined by `;`) unless
    the field is a tuple and the list holds scalars (one tuple value)."""
    from bench.grid.spec import AXIS_SEP, _is_tuple_field

    several = isinstance(value, list) and (
        not _is_tuple_field(key) or any(isinstance(v, list) for v in value)
    )
    values = value if several else [value]
    try:
        texts = [as_set_text(v) for v in values]
    except ValueError:
        raise BenchError(f"{path}: bad value for {key}: {value!r}") from None
    for t in texts:  # each value checked here, so the error names the file
        _parse(path, key, t)
    return AXIS_SEP.join(texts)


def grid_arguments(path: str | Path) -> dict[str, Any]:
    """What a grid experiment file sets: `datasets`, `methods`, `seeds` (strings as the flags take
    them), `preset` (or `presets`, or `preset` as a list: several presets), `device`, `data_dir`,
    `name`, `out` and `sets` ({field: `--set` value}, lists as axes), every key checked and every
    value parsed."""
    path = Path(path)
    doc = read_experiment(path)
    known = _known(GRID_KEYS)
    args: dict[str, Any] = {"sets": {}}
    for key, value in doc.items():
        if key not in known:
            raise _unknown(path, key)
        if key in ("datasets", "dataset", "methods"):
            vals = value if isinstance(value, list) else str(value).split(",")
            if not vals or not all(isinstance(v, str) and v.strip() for v in vals):
                raise BenchError(f"{path}: bad value for {key}: {value!r} (expected names)")
            args["datasets" if key.startswith("dataset") else key] = ",".join(v.strip() for v in vals)
        elif key in ("seeds", "seed"):
            from bench.grid.spec import parse_seeds

            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            try:
                parse_seeds(text)
            except BenchError as e:
                raise BenchError(f"{path}: {e}") from None
            args["seeds"] = text
        elif key in ("preset", "presets") and (isinstance(value, list) or key == "presets"):
            vals = value if isinstance(value, list) else str(value).split(",")
            if not vals or not all(isinstance(v, str) and v.strip() for v in vals):
                raise BenchError(f"{path}: bad value for {key}: {value!r} (expected preset names)")
            args["presets"] = ",".join(v.strip() for v in vals)
        elif key in ("preset", "device", "data_dir", "name", "out"):
            if not isinstance(value, str):
                raise BenchError(f"{path}: bad value for {key}: {value!r} (expected text)")
            args[key] = value
        else:
            args["sets"][key] = _axis_text(path, key, value)
    return args
