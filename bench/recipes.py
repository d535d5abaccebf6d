"""Recipes: the settings each method is run with, and where they come from.

Every method declares `recipes["paper"]`, its published settings with their source (paper + section,
or reference code), and `tunable`, the knobs `recipe=tuned` searches (`bench.tuning`). The run's
`recipe` (paper | tuned | default) picks what each method is built and fitted with:

* paper   : the config + the method's published settings (the default);
* tuned   : the paper settings, then its tunable knobs searched on val_id (the searched values come in
            as `extra`);
* default : the harness's former defaults: the config as it is, no recipe applied (old results stay
            reproducible).

Precedence (`method_config`), highest first: settings made on purpose (a preset, an experiment file, the
command line, a grid axis, `RunConfig.replace`: `RunConfig.explicit`, and every method option present
in `method_options`) > the tuning values (`extra`) > the recipe > the RunConfig field / Option defaults.
A recipe names RunConfig fields and the method's own options only; `check_declarations` refuses anything
else when the method registers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError, require

if TYPE_CHECKING:
    from bench.config import RunConfig

RECIPES = ("paper", "tuned", "default")
DEFAULT_SOURCE = "the harness's former defaults (RunConfig fields and method options as declared)"
# RunConfig fields a recipe may not set: what the run is (its data, methods, seeds, recipe, output) rather
# than how a method is run
NOT_SETTINGS = frozenset(
    {
        "name",
        "preset",
        "methods",
        "dataset",
        "far_ood",
        "heldout_classes",
        "data_dir",
        "n_train",
        "n_test",
        "val_items",
        "seed",
        "seeds",
        "protocol",
        "recipe",
        "tune_trials",
        "explicit",
        "method_options",
        "device",
        "workers",
        "out",
        "quiet",
        "report",
        "ks",
        "bootstrap_resamples",
        "ci_level",
        "scores",
        "id_score",
        "ood_score",
    }
)


@dataclass(frozen=True)
class Recipe:
    """A method's settings and where they come from.

    settings: RunConfig field names and/or the method's own option names -> value (typed as the field or
    option holds it; a number for a str field such as prior_precision is converted). source: the
    citation (paper + section/table, or reference code file). note: what the reader must know, e.g. a
    different training set-up ("trains its own net on L2-normalised embeddings") or a value the source
    does not state and why ours."""

    settings: Mapping[str, Any]
    source: str
    note: str = ""


NO_RECIPE = Recipe({}, "none declared: the shared defaults")


@dataclass(frozen=True)
class Knob:
    """One tunable dimension (what recipe=tuned searches): a range [low, high] (log-spaced when `log`,
    integers when `integer`) or a categorical `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    integer: bool = False

    def check(self, where: str) -> None:
        if self.choices is not None:
            require(
                len(self.choices) >= 1 and self.low is None and self.high is None, f"{where}: bad choices"
            )
            return
        ok = self.low is not None and self.high is not None and self.low < self.high
        require(ok and (not self.log or self.low > 0), f"{where}: needs low < high (low > 0 when log)")


def _field_types() -> dict[str, Any]:
    from typing import get_type_hints

    from bench.config import RunConfig

    return get_type_hints(RunConfig)


def settable_fields() -> list[str]:
    """RunConfig fields a recipe or knob may set."""
    from bench.config import RunConfig

    return [f.name for f in fields(RunConfig) if f.name not in NOT_SETTINGS]


def declared_names(method_cls: type) -> set[str]:
    """Names a method's recipes and knobs may use: the settable RunConfig fields and its own options."""
    return set(settable_fields()) | set(getattr(method_cls, "options", {}))


def check_declarations(method_cls: type, require_paper: bool = True) -> None:
    """BenchError (one line) unless the method's recipes and knobs are well formed: a "paper" recipe
    (unless not `require_paper`: registration lets a throw-away test plugin go without) with a source,
    only declared names, valid option values, and (for a method on the shared base model) no setting that
    changes the base model's weights (it would no longer be the shared one)."""
    name = getattr(method_cls, "name", method_cls.__name__)
    recipes: dict = getattr(method_cls, "recipes", {})
    require("paper" in recipes or not require_paper, f"method {name}: declares no recipes['paper']")
    allowed = declared_names(method_cls)
    for rname, recipe in recipes.items():
        require(rname in RECIPES and rname != "tuned", f"method {name}: unknown recipe name {rname!r}")
        require(
            isinstance(recipe, Recipe) and recipe.source.strip() != "",
            f"method {name}: recipe {rname} needs a source",
        )
        for bad in sorted(set(recipe.settings) - allowed)[:1]:
            raise BenchError(f"method {name}: recipe {rname} sets {bad!r}, not a setting it declares")
        for opt, value in recipe.settings.items():
            if opt in method_cls.options:
                method_cls.options[opt].check(opt, value)
        if getattr(method_cls, "reuses_base_model", False):
            from bench.model_cache import TRAINING_FIELDS

            for bad in sorted(set(recipe.settings) & set(TRAINING_FIELDS))[:1]:
                raise BenchError(
                    f"method {name}: recipe {rname} sets {bad!r}, which changes the shared base model"
                )
    for knob, spec in getattr(method_cls, "tunable", {}).items():
        require(knob in allowed, f"method {name}: tunable knob {knob!r} is not a setting it declares")
        require(isinstance(spec, Knob), f"method {name}: tunable {knob!r} must be a Knob")
        spec.check(f"method {name}: knob {knob}")


def check_recipe(cfg: "RunConfig") -> None:
    """BenchError (one line) for an unknown recipe or a tuning budget below one trial."""
    require(cfg.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
    require(cfg.tune_trials >= 1, f"tune_trials must be >= 1, got {cfg.tune_trials}")


def recipe_of(method_cls: type, recipe: str) -> Recipe:
    """The recipe a method runs with under `recipe` (tuned starts from paper; default: no settings)."""
    if recipe == "default":
        return method_cls.recipes.get("default", Recipe({}, DEFAULT_SOURCE))
    if recipe not in RECIPES:
        raise BenchError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    return method_cls.recipes.get("paper", NO_RECIPE)


def explicit_names(cfg: "RunConfig") -> set[str]:
    """What was set on purpose: `cfg.explicit` and every method option present in method_options."""
    return set(cfg.explicit) | {k for k, _ in cfg.method_options}


def _typed(key: str, value: Any, types: dict[str, Any]) -> Any:
    """A setting as its RunConfig field holds it (str fields take numbers as their text: prior_precision,
    likelihood_scale)."""
    if key in types and types[key] is str and not isinstance(value, str):
        return repr(float(value)) if isinstance(value, float) else str(value)
    return value


def method_config(cfg: "RunConfig", method_cls: type, extra: dict | None = None) -> "RunConfig":
    """The config `method_cls` is built and fitted with: cfg + its recipe settings for cfg.recipe (tuned
    starts from paper) + `extra` (a tuning trial's values, or the tuned best); what was set explicitly
    (`explicit_names`) wins over both. BenchError for an unknown recipe, or an `extra` name that is not
    one of the method's tunable knobs or declared settings."""
    check_recipe(cfg)
    extra = dict(extra or {})
    allowed = declared_names(method_cls)
    bad = sorted(set(extra) - allowed)
    if bad:
        raise BenchError(f"{method_cls.name}: {bad[0]!r} is not a setting or knob this method declares")
    wanted = {**recipe_of(method_cls, cfg.recipe).settings, **extra}
    keep = explicit_names(cfg)
    wanted = {k: v for k, v in wanted.items() if k not in keep}
    if not wanted:
        return cfg
    types = _field_types()
    changes = {k: _typed(k, v, types) for k, v in wanted.items() if k in types}
    opts = {k: v for k, v in wanted.items() if k not in types}
    if opts:
        changes["method_options"] = tuple(sorted({**dict(cfg.method_options), **opts}.items()))
    out = dataclasses.replace(cfg, **changes)  # not RunConfig.replace: recipe settings are not explicit
    from bench.config import validate

    validate(out)
    return out


def describe(cfg: "RunConfig", method_cls: type) -> dict[str, Any]:
    """What config.json records per method: the recipe name, source and note, the effective value of
    every setting the recipe names, and those of them an explicit setting overrode."""
    recipe = recipe_of(method_cls, cfg.recipe)
    used = method_config(cfg, method_cls)
    keep = explicit_names(cfg)
    return {
        "recipe": cfg.recipe,
        "source": recipe.source,
        **({"note": recipe.note} if recipe.note else {}),
        "settings": {k: setting_value(used, method_cls, k) for k in recipe.settings},
        "overridden": sorted(k for k in recipe.settings if k in keep),
        **({"tunable": sorted(method_cls.tunable)} if cfg.recipe == "tuned" else {}),
    }


def setting_value(cfg: "RunConfig", method_cls: type, key: str) -> Any:
    """The value of a RunConfig field or of one of the method's options in cfg."""
    from bench.config import jsonable

    if key in method_cls.options:
        return method_cls.option(cfg, key)
    return jsonable(getattr(cfg, key))


def show(settings: Mapping[str, Any]) -> str:
    """`k=v` pairs, comma-separated (bench list, the report)."""
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "(none: the shared defaults)"


def recipe_table(width: int = 110) -> str:
    """`bench list`'s recipe table within `width` columns: method, its paper settings, and the source's
    citation (the part before its first ';'; the whole in `recipes_text`)."""
    from tabulate import tabulate

    from bench.registry import METHODS

    rows = []
    for m in METHODS.names():
        paper = recipe_of(METHODS.get(m), "paper")
        rows.append((m, show(paper.settings), paper.source.split(";")[0]))
    rest = width - max(len(r[0]) for r in rows) - 4  # two gaps of 2 columns
    table = tabulate(
        rows,
        headers=["method", "recipe=paper (the default)", "source"],
        maxcolwidths=[None, rest // 2, rest - rest // 2],
    )
    return (
        f"{table}\nrecipe=tuned: these, then the tunable knobs searched on val_id; recipe=default: the "
        "harness's former defaults.\nIn full (sources, notes, knobs): python -m bench list --recipes; "
        "docs/recipes.md"
    )


def recipes_text(width: int = 110) -> str:
    """`bench list --recipes`: every method's recipes and tunable knobs in full, wrapped to `width`."""
    import textwrap

    from bench.registry import METHODS

    def item(label: str, text: str) -> list[str]:
        return textwrap.wrap(
            f"{label}: {text}",
            width,
            initial_indent="  ",
            subsequent_indent="    ",
            break_on_hyphens=False,
            break_long_words=False,
        )

    out = []
    for m in METHODS.names():
        cls = METHODS.get(m)
        paper, default = recipe_of(cls, "paper"), recipe_of(cls, "default")
        knobs = ", ".join(f"{k} {knob_text(v)}" for k, v in cls.tunable.items()) or "none"
        out += [m, *item("paper settings", show(paper.settings)), *item("source", paper.source)]
        out += item("note", paper.note) if paper.note else []
        out += item("default", show(default.settings) if default.settings else DEFAULT_SOURCE)
        out += [*item("tunable (recipe=tuned)", knobs), ""]
    return "\n".join(out).rstrip() + "\n"


def knob_text(k: Knob) -> str:
    """A knob in a few characters: {a, b} or [low, high] (log, int)."""
    if k.choices is not None:
        return "{" + ", ".join(map(str, k.choices)) + "}"
    tags = [t for t, on in (("log", k.log), ("int", k.integer)) if on]
    return f"[{k.low:g}, {k.high:g}]" + (f" ({', '.join(tags)})" if tags else "")


RECIPE_MEANING = {
    "paper": "every method at its published settings (python -m bench list --recipes)",
    "tuned": "published settings, then each method's knobs searched on val_id",
    "default": "the harness's former defaults",
}


def recipe_summary(meta: dict) -> str | None:
    """One line for a run's report and summary from its config.json: the recipe, the methods whose recipe
    trains their own net another way (a training field such as distance differs from the run's), and the
    recipe settings that a preset or the command line kept (`describe`'s `overridden`); None for a run
    recorded before recipes."""
    from bench.model_cache import TRAINING_FIELDS

    cfg, recipes = meta.get("config") or {}, meta.get("recipes") or {}
    recipe = cfg.get("recipe")
    if recipe is None:
        return None
    parts = [f"{recipe}: {RECIPE_MEANING.get(recipe, recipe)}"]
    if recipe == "tuned":
        parts[0] += f" ({cfg.get('tune_trials')} trials each)"
    own = [
        f"{m} {k}={v}"
        for m, r in recipes.items()
        for k, v in r.get("settings", {}).items()
        if k in TRAINING_FIELDS and v != cfg.get(k)
    ]
    if own:
        parts.append("own training set-up: " + ", ".join(own))
    kept = sorted({k for r in recipes.values() for k in r.get("overridden", [])})
    if kept:
        parts.append("kept from the preset/command line: " + ", ".join(kept))
    return "; ".join(parts)
