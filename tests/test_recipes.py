"""Recipes (bench/recipes.py, docs/recipes.md): every registered method declares its published recipe with a
source and only names it declares; what was set on purpose wins over the recipe; recipe=default is the
harness's former defaults; online_la's default is LAM's recipe; bad values are one line and exit 2; the
runner fits every method with its recipe and records it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench.cli import build_parser, config_from_args
from bench.config import RunConfig, preset_config
from bench.errors import BenchError
from bench.method import Method, Option
from bench.recipes import (
    Knob,
    Recipe,
    check_declarations,
    describe,
    explicit_names,
    method_config,
    recipe_of,
    recipe_table,
    recipes_text,
)
from bench.registry import METHODS, register_method
from bench.runner import run
from methods.online_la import OnlineLaplace


def _cfg(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["run", *argv]))


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_has_a_paper_recipe_with_a_source_and_only_declared_names(name):
    cls = METHODS.get(name)
    check_declarations(cls)  # paper present, sources non-empty, names declared, option values valid, knobs
    paper = cls.recipes["paper"]
    assert len(paper.source.strip()) > 20, f"{name}: a citation, not a word"
    assert isinstance(cls.tunable, dict) and all(isinstance(k, Knob) for k in cls.tunable.values())
    for recipe in ("paper", "tuned", "default"):  # the recipe's config is one the method accepts
        cfg = preset_config("default").replace(recipe=recipe)
        cls.validate(method_config(cfg, cls))


def _throwaway(name: str, **attrs) -> None:
    cls = type(name, (Method,), {"__doc__": "x", "options": {"own": Option(int, 1, "h")}, **attrs})
    try:
        register_method(name)(cls)
    finally:
        METHODS.remove(name)


@pytest.mark.parametrize(
    "attrs, says",
    [
        ({"recipes": {"paper": Recipe({"nope": 1}, "Someone 2020, Sec. 1")}}, "'nope', not a setting"),
        ({"recipes": {"paper": Recipe({"seed": 3}, "Someone 2020, Sec. 1")}}, "'seed', not a setting"),
        ({"recipes": {"paper": Recipe({"own": 2}, " ")}}, "needs a source"),
        ({"recipes": {"paper": Recipe({}, "S"), "best": Recipe({}, "S")}}, "unknown recipe name 'best'"),
        ({"tunable": {"nope": Knob(0.1, 1.0)}}, "knob 'nope' is not a setting"),
        ({"tunable": {"own": Knob(1.0, 0.1)}}, "needs low < high"),
        (
            {"reuses_base_model": True, "recipes": {"paper": Recipe({"epochs": 3}, "S")}},
            "'epochs', which changes the shared base model",
        ),
    ],
)
def test_a_method_declaring_an_unknown_name_or_a_bad_recipe_is_refused_when_it_registers(attrs, says):
    with pytest.raises(BenchError, match=says):
        _throwaway("_bad_recipe", **attrs)


def test_the_recipe_applies_to_what_was_not_set_and_explicit_settings_win():
    smoke = preset_config("smoke")  # sets posterior_samples=10 and dropout_passes=10 on purpose
    full = METHODS.get("full_la")
    cfg = method_config(smoke, full)
    assert (cfg.predictive, cfg.posterior_samples) == ("glm", 10)  # recipe's glm; the preset's 10 samples
    assert "posterior_samples" in describe(smoke, full)["overridden"]
    # --set beats the recipe: a field (even at its RunConfig default) and a method option
    cli = _cfg("--preset", "smoke", "--set", "predictive=mc", "--set", "dropout=0.3")
    assert method_config(cli, full).predictive == "mc"
    at_default = _cfg("--preset", "smoke", "--set", "dropout=0.1")  # the option's default, set on purpose
    assert dict(method_config(at_default, METHODS.get("mc_dropout")).method_options)["dropout"] == 0.1
    assert method_config(cli, METHODS.get("mc_dropout")).method_options == (
        ("dropout", 0.3),
        ("dropout_passes", 10),
        ("ensemble_size", 2),
    )
    assert method_config(smoke, METHODS.get("mc_dropout")).method_options[0] == ("dropout", 0.05)
    # RunConfig.replace counts as on purpose (code and tests that set a field keep it)
    assert method_config(smoke.replace(prior_precision="3.0"), full).prior_precision == "3.0"
    # a tuning trial's values go over the recipe, not over what was set on purpose; numbers for str fields
    tuned = method_config(
        smoke.replace(recipe="tuned"), full, {"prior_precision": 0.5, "posterior_samples": 7}
    )
    assert (tuned.prior_precision, tuned.posterior_samples, tuned.predictive) == ("0.5", 10, "glm")
    # the recipe's values are not themselves marked as set on purpose
    assert "predictive" not in explicit_names(cfg)


def test_recipe_default_is_the_harness_former_defaults_and_a_rerun_of_a_recorded_config_keeps_its_recipe(
    tmp_path,
):
    cfg = preset_config("default").replace(recipe="default")
    for name in METHODS.names():
        assert method_config(cfg, METHODS.get(name)) == cfg, name
    # a config.json recorded before recipes ran at the harness's defaults: it reads back as recipe=default
    old = {k: v for k, v in preset_config("smoke").to_dict().items() if k not in ("recipe", "explicit")}
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"format_version": 1, "config": old, "status": "complete"}))
    assert _cfg("--config", str(f)).recipe == "default"


def test_online_la_defaults_to_lam_and_the_gibbs_variant_stays_reachable():
    assert RunConfig().recipe == "paper"
    lam = OnlineLaplace.settings(method_config(preset_config("default"), OnlineLaplace))
    assert (lam.scaling, lam.marglik_every, lam.prior, lam.memory, lam.train_samples, lam.pair_cap) == (
        "lam",
        0,
        1.0,
        0.999,
        1,
        5000,
    )
    assert method_config(preset_config("default"), OnlineLaplace).distance == "cosine"  # LAM's unit sphere
    former = OnlineLaplace.settings(preset_config("default").replace(recipe="default"))
    assert (former.scaling, former.marglik_every) == ("gibbs", 1)
    gibbs = _cfg("--set", "online_scaling=gibbs")
    assert OnlineLaplace.settings(method_config(gibbs, OnlineLaplace)).scaling == "gibbs"


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--set", "recipe=best"], "recipe must be one of paper, tuned, default, got 'best'"),
        (["--set", "tune_trials=0"], "tune_trials must be >= 1, got 0"),
    ],
)
def test_a_bad_recipe_or_budget_is_one_line_and_exit_2(cli, tmp_path, argv, says):
    code, out, err = cli("run", "--preset", "smoke", "--out", str(tmp_path), *argv)
    assert code == 2 and err.strip() == f"error: {says}" and not list(tmp_path.iterdir())


def test_a_tuning_value_for_a_name_the_method_does_not_declare_is_refused():
    with pytest.raises(BenchError, match="'dropout' is not a setting or knob this method declares"):
        method_config(
            preset_config("smoke").replace(recipe="tuned"), METHODS.get("full_la"), {"dropout": 0.2}
        )


def test_bench_list_shows_every_recipe_and_its_source_within_110_columns(cli):
    code, out, _ = cli("list")
    table = recipe_table()
    assert code == 0 and table in out
    assert max(len(line) for line in table.splitlines()) <= 110
    for name in METHODS.names():
        assert any(line.startswith(name + " ") for line in table.splitlines()), name
    code, full, _ = cli("list", "--recipes")
    assert code == 0 and full == recipes_text()
    words = " ".join(full.split())
    assert max(len(line) for line in full.splitlines()) <= 110
    for name in METHODS.names():
        assert " ".join(METHODS.get(name).recipes["paper"].source.split()) in words, name


@pytest.mark.parametrize("recipe", ["paper", "default"])
def test_every_method_runs_at_its_recipe_and_config_json_records_it(smoke_cfg, recipe):
    cfg = dataclasses.replace(smoke_cfg, recipe=recipe, workers=1)
    meta = json.loads((run(cfg, log=lambda *_: None) / "config.json").read_text())
    assert meta["failures"] == [] and set(meta["methods"]) == set(METHODS.names())
    for name in METHODS.names():
        rec = meta["recipes"][name]
        assert rec["recipe"] == recipe and rec["source"] == recipe_of(METHODS.get(name), recipe).source
        assert meta["diagnostics"][f"{name}-seed0"]["recipe"] == {"recipe": recipe}
    online = meta["diagnostics"]["online_la-seed0"]
    assert online["scaling"] == ("lam" if recipe == "paper" else "gibbs")
    assert meta["recipes"]["online_la"]["settings"].get("distance") == (
        "cosine" if recipe == "paper" else None
    )


def test_docs_recipes_md_lists_every_method_with_its_settings_and_source():
    from pathlib import Path

    from bench.recipes import show

    text = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()
    for name in METHODS.names():
        paper = METHODS.get(name).recipes["paper"]
        assert f"| `{name}` | {show(paper.settings)} | {paper.source} |" in text, name


def test_a_method_refusing_what_its_recipe_set_says_so_in_one_line(cli, tmp_path):
    argv = ["--preset", "smoke", "--dataset", "synthetic", "--methods", "online_la", "--out", str(tmp_path)]
    code, _, err = cli("run", *argv, "--set", "online_structure=kron")  # Kronecker needs euclidean
    assert code == 2 and len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
    assert "recipe=paper sets" in err and "distance=cosine" in err and "online_structure=kron," not in err
