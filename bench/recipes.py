"""Stand-in for helper 21a's recipes module (issue 21): only the interface of /work/RECIPES_SPEC.md that the
tuning engine (`bench.tuning`) needs. The merge keeps 21a's version of this file.

`Recipe`: a method's published settings and their source. `Knob`: one dimension that `recipe=tuned`
searches. `method_config(cfg, cls, extra)`: the config a method is built and fitted with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.config import RunConfig
    from bench.method import Method

RECIPES = ("paper", "tuned", "default")


@dataclass(frozen=True)
class Recipe:
    """A method's published recipe: settings (config fields or method options -> value) and source."""

    settings: Mapping[str, Any]
    source: str
    note: str = ""


@dataclass(frozen=True)
class Knob:
    """One tunable dimension: a range [low, high] (log-scaled, integer) or categorical `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    integer: bool = False


def _typed(key: str, value: Any) -> Any:
    """A knob value as the config field or option `key` holds it (e.g. prior_precision is a string)."""
    from bench.config import parse_value

    return parse_value(key, value if isinstance(value, str) else repr(value))


def method_config(cfg: "RunConfig", method_cls: type["Method"], extra: dict | None = None) -> "RunConfig":
    """cfg + the method's recipe settings for cfg.recipe (tuned starts from paper) + `extra` (a tuning trial's
    values); a name in `extra` the method does not declare as tunable is a BenchError."""
    from bench.config import apply_overrides

    if cfg.recipe not in RECIPES:
        raise BenchError(f"unknown recipe {cfg.recipe!r}; recipes: {', '.join(RECIPES)}")
    recipes = getattr(method_cls, "recipes", {}) or {}
    base = recipes.get("paper" if cfg.recipe == "tuned" else cfg.recipe)
    settings = dict(base.settings) if base is not None else {}
    extra = dict(extra or {})
    bad = [k for k in extra if k not in getattr(method_cls, "tunable", {})]
    if bad:
        raise BenchError(f"{method_cls.name or method_cls.__name__}: {bad[0]!r} is not a tunable knob")
    changes = {k: _typed(k, v) for k, v in {**settings, **extra}.items()}
    return apply_overrides(cfg, changes) if changes else cfg
