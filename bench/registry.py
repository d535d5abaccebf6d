"""Plugin registries for methods and datasets.

A plugin registers itself with a decorator in its own module; the registry imports every module of
the `methods` and `datasets` packages on first lookup, so adding a plugin never needs an edit here.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

from bench.errors import BenchError

T = TypeVar("T")

_METHODS: dict[str, type] = {}
_DATASETS: dict[str, Callable] = {}
_LOADED: set[str] = set()


def _describe(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def register_method(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a `Method` subclass available under `name`."""

    def deco(cls: type[T]) -> type[T]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name  # type: ignore[attr-defined]
        _METHODS[name] = cls
        return cls

    return deco


def register_dataset(name: str) -> Callable[[T], T]:
    """Decorator: make a dataset loader `fn(cfg) -> Dataset` available under `name`."""

    def deco(fn: T) -> T:
        if name in _DATASETS and _DATASETS[name] is not fn:
            raise ValueError(f"dataset {name!r} registered twice")
        _DATASETS[name] = fn  # type: ignore[assignment]
        return fn

    return deco


def _load_plugins(package: str) -> None:
    if package in _LOADED:
        return
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    _LOADED.add(package)


def method_names() -> list[str]:
    """Registered method names, in registration order of their modules."""
    _load_plugins("methods")
    return list(_METHODS)


def dataset_names() -> list[str]:
    """Registered dataset names."""
    _load_plugins("datasets")
    return list(_DATASETS)


def get_method(name: str) -> type:
    """The method class registered as `name`, or a BenchError listing the known names."""
    _load_plugins("methods")
    if name not in _METHODS:
        raise BenchError(f"unknown method {name!r}; known methods: {', '.join(_METHODS)}")
    return _METHODS[name]


def get_dataset(name: str) -> Callable:
    """The dataset loader registered as `name`, or a BenchError listing the known names."""
    _load_plugins("datasets")
    if name not in _DATASETS:
        raise BenchError(f"unknown dataset {name!r}; known datasets: {', '.join(_DATASETS)}")
    return _DATASETS[name]


def method_descriptions() -> dict[str, str]:
    """Method name -> first line of its docstring."""
    _load_plugins("methods")
    return {n: _describe(c) for n, c in _METHODS.items()}


def dataset_descriptions() -> dict[str, str]:
    """Dataset name -> first line of its loader's docstring."""
    _load_plugins("datasets")
    return {n: _describe(f) for n, f in _DATASETS.items()}
