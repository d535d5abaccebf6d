"""Plugin registries: methods, datasets, backbones and uncertainty scores register themselves by name
with a decorator.

Each registry imports every module of its plugin package on first lookup, so adding a plugin is one
new file and never an edit here. An unknown name is a BenchError listing the registered names.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from bench.errors import BenchError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> plugin (a class or a factory function) for one kind of plugin, loaded from `package`."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind, self.package = kind, package
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._loaded = False

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: make `obj` available under `name`; `meta` is kept for `meta(name)`."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            self._meta[name] = dict(meta)
            return obj

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def remove(self, name: str) -> None:
        """Forget `name` (tests register throw-away plugins)."""
        self._items.pop(name, None)
        self._meta.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, in the order their modules registered them."""
        self._load()
        return list(self._items)

    def get(self, name: str) -> T:
        """The plugin registered as `name`, or a BenchError listing the known names."""
        self._load()
        if name not in self._items:
            raise BenchError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self._items)}")
        return self._items[name]

    def meta(self, name: str) -> dict[str, Any]:
        """What the plugin declared when it registered (e.g. a dataset's default far-OOD sets)."""
        self.get(name)
        return self._meta[name]

    def descriptions(self) -> dict[str, str]:
        """Name -> first line of the plugin's docstring."""
        self._load()
        return {n: _first_line(obj) for n, obj in self._items.items()}


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


METHODS: Registry[type] = Registry("method", "methods")
DATASETS: Registry[Callable] = Registry("dataset", "datasets")
BACKBONES: Registry[Callable] = Registry("backbone", "backbones")
SCORES: Registry[Callable] = Registry("score", "bench.scores")


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make a `Method` subclass available under `name` (sets `cls.name`)."""

    def deco(cls: type) -> type:
        cls.name = name  # type: ignore[attr-defined]
        from bench.recipes import check_declarations  # (lazy: it reads RunConfig's fields)

        check_declarations(cls, require_paper=False)  # names, sources and knobs; a bad one: one line
        return METHODS.register(name)(cls)

    return deco


def register_dataset(name: str, **meta: Any) -> Callable[[Callable], Callable]:
    """Decorator: make a data-source loader `fn(cfg) -> DataSource` available under `name`.

    meta: `far_ood` (tuple of dataset names used as OOD sets when the config does not name any);
    `near_ood` (those of them that are near-OOD for this dataset, e.g. the other fine-grained set; the
    dataset's own held-out classes always are).
    """
    return DATASETS.register(name, **meta)


def register_backbone(name: str, **meta: Any) -> Callable[[Callable], Callable]:
    """Decorator: make a backbone builder `fn(cfg, in_shape, dropout) -> nn.Module` available under `name`.

    meta: `pixel_stats` ((mean, std) per channel, or a function of the config returning them or None)
    when the backbone's weights expect their own input normalisation (`bench.data.input_stats`).
    """
    return BACKBONES.register(name, **meta)


def register_score(name: str, predictive: bool = True) -> Callable[[Callable], Callable]:
    """Decorator: make an uncertainty score `fn(inputs: bench.metrics.uncertainty.ScoreInputs) ->
    np.ndarray [N]` (larger = more uncertain) available under `name`. predictive=False: the score
    needs no predictive distribution (only mean embeddings), so deterministic methods get it too."""
    return SCORES.register(name, predictive=predictive)
