"""What a grid is: its spec (presets, datasets, methods, seeds, fixed settings and setting axes) and
its expansion into cells (one run folder each) and the base-model tasks that post-hoc cells depend on.

A grid over several presets (`--presets default,cifar`) runs each preset with its own config (its own
dataset, backbone, OOD sets and feature cache): the presets' differences are never overridden by one
another, only by `--set`, which applies to every preset."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

from bench.config import RunConfig, apply_overrides, jsonable, parse_value, preset_config
from bench.errors import require
from bench.model_cache import key_hash, model_key
from bench.registry import DATASETS, METHODS

AXIS_SEP = ";"  # separates the values of one setting axis: --set hidden="32,32;64,64"
GRID_FIELDS = ("dataset", "methods", "seed", "seeds", "name", "out", "quiet", "report")  # the grid sets these


def parse_seeds(text: str) -> tuple[int, ...]:
    """`0-4` -> (0, 1, 2, 3, 4); `0,2,7` and mixtures like `0-2,7` too (order kept, duplicates dropped)."""
    out: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        require(m is not None, f"bad seeds {text!r}: expected e.g. 0-4 or 0,1,2")
        lo, hi = int(m[1]), int(m[2] or m[1])
        require(lo <= hi, f"bad seed range {part!r}: start after end")
        out += [s for s in range(lo, hi + 1) if s not in out]
    return tuple(out)


def _is_tuple_field(key: str) -> bool:
    tp = get_type_hints(RunConfig).get(key)
    return any(get_origin(t) is tuple for t in (tp, *get_args(tp)))


def parse_sets(items: list[str]) -> dict[str, list[Any]]:
    """`--set FIELD=VALUE` items -> {field: [typed values]}; a field with several values is an axis.

    Values of one field come from repeating `--set` or from `;` inside one value; for a field that
    is not a tuple, `,` separates values too (`prior_precision=marglik,grid`), while for a tuple
    field a comma stays inside one value (`hidden=32,32` is one value; `hidden=32,32;64,64` two)."""
    values: dict[str, list[Any]] = {}
    for item in items:
        require("=" in item, f"--set expects FIELD=VALUE, got {item!r}")
        key, text = (s.strip() for s in item.split("=", 1))
        key = key.replace("-", "_")
        require(
            key not in GRID_FIELDS,
            f"--set {key}=... is not allowed in a grid: use --datasets, --methods, --seeds, --name or --out",
        )
        alts = text.split(AXIS_SEP)
        if not _is_tuple_field(key):
            alts = [a for alt in alts for a in alt.split(",")]
        vals = values.setdefault(key, [])
        vals += [v for v in (parse_value(key, a.strip()) for a in alts) if v not in vals]
    return values


def tuplify(v: Any) -> Any:
    """JSON lists back to the tuples a RunConfig holds (nested: method_options pairs)."""
    return tuple(tuplify(x) for x in v) if isinstance(v, list) else v


def show(v: Any) -> str:
    """A setting value as the user writes it: tuples comma-joined, None as none."""
    return "none" if v is None else ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """A RunConfig from its recorded `to_dict()` (lists back to tuples), validated."""
    known = {f.name for f in fields(RunConfig)}
    if "recipe" not in d:  # recorded before recipes existed: it ran at the harness's defaults
        d = {**d, "recipe": "default"}
    return RunConfig(**{k: tuplify(v) for k, v in d.items() if k in known}).replace()


@dataclass(frozen=True)
class GridSpec:
    """A grid as the user gives it: preset (or `presets`, several), datasets, methods (or `all`),
    seeds, `--set` items (one value: fixed for every cell; several: an axis) and the execution fields
    device and data_dir.

    One preset: `datasets` are run with that preset's config (empty: the preset's own dataset).
    Several presets: each runs its own dataset with its own config; `datasets` must be empty (a
    preset's OOD sets and trunk are chosen for its dataset, so another dataset would silently get them)."""

    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    preset: str = "default"
    sets: tuple[str, ...] = ()
    device: str | None = None
    data_dir: str | None = None
    presets: tuple[str, ...] = ()
    values: dict[str, list[Any]] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        presets = tuple(dict.fromkeys(p.strip() for p in self.presets if p.strip()))
        require(len(presets) == len(self.presets), f"presets named twice or empty: {','.join(self.presets)}")
        if len(presets) == 1:  # one preset given as a list: the single-preset grid
            object.__setattr__(self, "preset", presets[0])
            presets = ()
        object.__setattr__(self, "presets", presets)
        for p in self.preset_names:
            preset_config(p)  # an unknown preset fails here, listing the known ones
        require(
            not (presets and self.datasets),
            "a grid over several presets runs each preset's own dataset: drop --datasets "
            "(or run one preset with --preset P --datasets ...)",
        )
        require(len(self.methods) > 0 and len(self.seeds) > 0, "a grid needs at least one method and seed")
        object.__setattr__(self, "values", parse_sets(list(self.sets)))

    @property
    def preset_names(self) -> tuple[str, ...]:
        """The presets of the grid, in the order given."""
        return self.presets or (self.preset,)

    def runs(self) -> list[tuple[str, str]]:
        """(preset, dataset) pairs the grid runs, in order: each preset's datasets (its own by default)."""
        return [(p, d) for p in self.preset_names for d in (self.datasets or (preset_config(p).dataset,))]

    @property
    def axes(self) -> dict[str, list[Any]]:
        """Settings with several values: the grid's extra dimensions."""
        return {k: v for k, v in self.values.items() if len(v) > 1}

    def base_config(self, preset: str | None = None) -> RunConfig:
        """A preset (the first by default) with the fixed settings: what every cell of that preset
        shares (cells write under cells/)."""
        fixed = {k: v[0] for k, v in self.values.items() if len(v) == 1}
        fixed.update(
            {k: v for k, v in (("device", self.device), ("data_dir", self.data_dir)) if v is not None}
        )
        return apply_overrides(
            preset_config(preset or self.preset_names[0]),
            {**fixed, "quiet": True, "report": False, "out": "cells", "name": "cell"},
        )

    def to_dict(self) -> dict[str, Any]:
        """grid.json's spec (a single-preset grid's as before, so its rerun still finds it)."""
        several = {"presets": list(self.presets)} if self.presets else {}
        return {
            "datasets": list(self.datasets) or [d for _, d in self.runs()],
            "methods": list(self.methods),
            "seeds": list(self.seeds),
            "preset": self.preset_names[0] if not self.presets else ",".join(self.presets),
            **several,
            "set": list(self.sets),
            "device": self.device,
            "data_dir": self.data_dir,
        }


def _label(point: dict[str, Any]) -> str:
    return "_".join(
        re.sub(r"[^A-Za-z0-9_.+=@-]", "_", f"{k}={show(v)}".replace(",", "x")) for k, v in point.items()
    )


def weights_id(cfg: RunConfig, seed: int) -> str:
    """8 hex digits of what determines the base model's weights (the model cache's key, less the
    data shape): cells that agree on it share one base-model task."""
    return key_hash(model_key(cfg, (), 0, seed, 0.0))[:8]


def expand(spec: GridSpec) -> tuple[dict[str, dict], dict[str, dict]]:
    """(cells, bases) as grid.json records them, every config validated before anything runs.

    A cell is (preset, dataset, axis point, method, seed): one run folder. A post-hoc method's cell
    depends on the base task of its (dataset, weight-determining settings, seed), which trains the base
    model into the shared cache once (presets whose settings give the same weights share it); cells of
    methods that train their own nets depend on nothing. Cell names carry the preset when there are
    several (`cifar-cifar10-plain-seed0`)."""
    from bench.runner import resolve_methods

    runs = spec.runs()
    for _, d in runs:
        DATASETS.get(d)  # unknown names fail here, listing the known ones
    axes = spec.axes
    points = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    labels = [_label(p) for p in points]
    if len(set(labels)) < len(labels):  # two values that print alike: number the points instead
        labels = [f"p{i}" for i in range(len(points))]
    base = {p: spec.base_config(p) for p in spec.preset_names}
    cells: dict[str, dict] = {}
    bases: dict[str, dict] = {}
    for (preset, dataset), (point, label) in itertools.product(runs, zip(points, labels)):
        cfg = apply_overrides(base[preset], {"dataset": dataset, "methods": spec.methods, **point})
        coords = {k: jsonable(v) for k, v in point.items()}
        where = {"preset": preset} if spec.presets else {}
        for method, seed in itertools.product(resolve_methods(cfg), spec.seeds):
            base_id = None
            if METHODS.get(method).reuses_base_model:
                base_id = f"{dataset}-seed{seed}-{weights_id(cfg, seed)}"
                bases.setdefault(
                    base_id,
                    {**where, "dataset": dataset, "seed": seed, "point": coords, "status": "pending"},
                )
            prefix = [preset] if spec.presets else []
            cid = "-".join(prefix + [dataset, method, f"seed{seed}"] + ([label] if label else []))
            cells[cid] = {
                **where,
                "dataset": dataset,
                "method": method,
                "seed": seed,
                "point": coords,
                "base": base_id,
                "status": "pending",
            }
    return cells, bases


def base_configs(spec: GridSpec) -> dict[str, dict[str, Any]]:
    """{preset: its shared config as grid.json records it} (several presets only; a single-preset
    grid records `base_config` alone)."""
    return {p: spec.base_config(p).to_dict() for p in spec.presets}


def record_base(meta: dict[str, Any], record: dict) -> dict[str, Any]:
    """The shared config of a cell or base task of grid.json: its preset's, else the grid's one."""
    preset = record.get("preset")
    return meta.get("base_configs", {}).get(preset) or meta["base_config"]


def task_config(
    base_config: dict[str, Any], record: dict, name: str, out: str, method: str | None = None
) -> RunConfig:
    """The RunConfig of a cell or base task from grid.json: the shared config, the task's dataset,
    seed and axis point, one method (a cell's), writing run folders under `out`."""
    point = {k: tuplify(v) for k, v in record["point"].items()}
    return apply_overrides(
        config_from_dict(base_config),
        {
            "dataset": record["dataset"],
            "seed": int(record["seed"]),
            "seeds": (),
            "name": name,
            "out": out,
            **({"methods": (method,)} if method else {}),
            **point,
        },
    )
