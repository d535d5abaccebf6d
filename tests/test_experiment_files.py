"""Experiment files (bench.experiment): `bench run --config` and `bench grid --config` take the fields
of `--set` plus preset, methods, seeds and datasets, flags override the file, bad keys and values are
one line, a run folder's config.json reruns the run byte for byte, and the examples/ files run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import build_parser, config_from_args
from bench.config import preset_config
from tests.conftest import needs_fashion

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _cfg(*argv: str):
    return config_from_args(build_parser().parse_args(["run", *argv]))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_file_sets_fields_like_set_and_flags_override_it(tmp_path):
    f = _write(
        tmp_path / "e.yaml",
        "preset: smoke\ndatasets: [synthetic]\nmethods: [plain, diag_la]\n"
        "hidden: [8, 8]\nepochs: 2\nn_test: null\nprior_precision: 1.0\n"
        "seeds: [0, 1]\nl2-normalize: true\nposterior_rank_tol: 0.5\n",
    )
    cfg = _cfg("--config", str(f))
    assert cfg.preset == "smoke" and cfg.dataset == "synthetic" and cfg.methods == ("plain", "diag_la")
    assert cfg.hidden == (8, 8) and cfg.epochs == 2 and cfg.n_test is None and cfg.prior_precision == "1.0"
    assert (
        cfg.seeds == (0, 1)
        and cfg.l2_normalize is True
        and dict(cfg.method_options)["posterior_rank_tol"] == 0.5
    )
    assert cfg.batch_size == preset_config("smoke").batch_size  # the rest: the file's preset
    same = _cfg(
        "--preset",
        "smoke",
        "--dataset",
        "synthetic",
        "--methods",
        "plain,diag_la",
        "--seeds",
        "0,1",
        "--epochs",
        "2",
        "--set",
        "hidden=8,8",
        "--set",
        "n_test=none",
        "--set",
        "prior_precision=1.0",
        "--set",
        "l2_normalize=true",
        "--set",
        "posterior_rank_tol=0.5",
    )
    assert cfg == same  # the same fields as the command line
    j = _write(
        tmp_path / "e.json",
        json.dumps(
            {
                "preset": "smoke",
                "dataset": "synthetic",
                "methods": "plain,diag_la",
                "hidden": "8,8",
                "epochs": 2,
                "n_test": None,
                "seeds": [0, 1],
                "prior_precision": "1.0",
                "l2_normalize": True,
                "posterior_rank_tol": 0.5,
            }
        ),
    )
    assert _cfg("--config", str(j)) == cfg
    over = _cfg(
        "--config", str(f), "--epochs", "3", "--set", "hidden=4", "--preset", "default", "--methods", "plain"
    )
    assert (
        over.epochs == 3 and over.hidden == (4,) and over.methods == ("plain",) and over.preset == "default"
    )
    assert over.n_test is None and over.dataset == "synthetic"  # the file's values still apply
    assert over.batch_size == preset_config("default").batch_size  # --preset beats the file's preset


def test_extends_starts_from_another_file(tmp_path):
    _write(tmp_path / "full.yaml", "preset: smoke\ndataset: synthetic\nepochs: 5\nhidden: [8]\n")
    f = _write(tmp_path / "small.yaml", "extends: full.yaml\nepochs: 1\n")
    cfg = _cfg("--config", str(f))
    assert cfg.epochs == 1 and cfg.hidden == (8,) and cfg.dataset == "synthetic"


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("epochs: 2\nepoch: 3\n", ["unknown key 'epoch'"]),
        ("epochs: two\n", ["bad value 'two' for epochs"]),
        ("epochs: 0\n", ["epochs must be >= 1"]),
        ("hidden: [[8], [4]]\n", ["bad value for hidden"]),
        ("distance: {a: 1}\n", ["bad value for distance"]),
        ("l2_normalize: maybe\n", ["l2_normalize"]),
        ("datasets: [synthetic, fashion_mnist]\n", ["a run has one dataset"]),
        ("preset: nope\n", ["unknown preset 'nope'"]),
        ("epochs: [1\n", ["not valid YAML", "line"]),
        ("- a\n- b\n", ["must be a mapping"]),
        ("extends: missing.yaml\n", ["cannot read experiment file", "missing.yaml"]),
    ],
)
def test_bad_files_are_one_line_naming_the_key(cli, tmp_path, text, fragments):
    f = _write(tmp_path / "bad.yaml", text)
    code, _, err = cli("run", "--config", str(f), "--out", str(tmp_path / "runs"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(x in err for x in fragments), err
    assert not (tmp_path / "runs").exists()


def test_grid_file_axes_and_flag_overrides(tmp_path):
    from bench.cli import _merge_grid_file
    from bench.grid import GridSpec
    from bench.grid.spec import parse_seeds

    f = _write(
        tmp_path / "g.yaml",
        "preset: smoke\ndatasets: [synthetic]\nmethods: [plain, diag_la]\nseeds: 0-2\n"
        "distance: [euclidean, cosine]\nhidden: [8, 8]\nhead_hidden: [[4], [8]]\n"
        "epochs: 1\n",
    )
    args = build_parser().parse_args(["grid", "--config", str(f), "--seeds", "5", "--set", "epochs=2"])
    _merge_grid_file(args)
    spec = GridSpec(
        datasets=tuple(args.datasets.split(",")),
        methods=tuple(args.methods.split(",")),
        seeds=parse_seeds(args.seeds),
        preset=args.preset,
        sets=tuple(args.set),
    )
    assert spec.seeds == (5,) and spec.methods == ("plain", "diag_la") and spec.preset == "smoke"
    assert spec.axes == {"distance": ["euclidean", "cosine"], "head_hidden": [(4,), (8,)]}
    assert spec.base_config().hidden == (8, 8) and spec.base_config().epochs == 2  # the flag's epochs
    bad = _write(tmp_path / "b.yaml", "datasets: [synthetic]\nepochs: [1, x]\n")
    with pytest.raises(Exception, match="bad value 'x' for epochs"):
        _merge_grid_file(build_parser().parse_args(["grid", "--config", str(bad)]))


def _results(out: Path) -> list[Path]:
    return sorted(out.glob("*/results.csv"))


@pytest.mark.slow
def test_rerunning_from_config_json_gives_a_byte_identical_results_csv(cli, tmp_path):
    """Reruns in a fresh --out (nothing cached: the base model is trained again) and in the same one."""
    first = tmp_path / "a"
    code, _, err = cli(
        "run",
        "--preset",
        "smoke",
        "--dataset",
        "synthetic",
        "--methods",
        "plain,diag_la,mc_dropout",
        "--set",
        "bootstrap_resamples=100",
        "--out",
        str(first),
        "--quiet",
        "--no-report",
    )
    assert code == 0, err
    (run,) = [d for d in first.iterdir() if d.name != "cache"]
    again = tmp_path / "b"
    code, _, err = cli(
        "run", "--config", str(run / "config.json"), "--out", str(again), "--quiet", "--no-report"
    )
    assert code == 0, err
    (rerun,) = _results(again)
    assert rerun.read_bytes() == (run / "results.csv").read_bytes()
    assert json.loads((rerun.parent / "config.json").read_text())["config"] == {
        **json.loads((run / "config.json").read_text())["config"],
        "out": str(again),
    }
    code, _, err = cli("run", "--config", str(run / "config.json"), "--quiet", "--no-report")  # its own --out
    assert code == 0, err
    assert [p.read_bytes() for p in _results(first)] == [(run / "results.csv").read_bytes()] * 2


def _example_config(path: Path, tmp_path: Path):
    """The RunConfig (run files) or GridSpec expansion (grid files) of an example: it validates."""
    if "grid" in path.stem:
        from bench.cli import grid_spec
        from bench.grid.spec import expand

        return expand(grid_spec(build_parser().parse_args(["grid", "--config", str(path)])))
    return _cfg("--config", str(path))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_file_is_valid(path, tmp_path):
    assert _example_config(path, tmp_path)
    if not path.stem.endswith("-smoke"):
        assert (EXAMPLES / f"{path.stem}-smoke.yaml").is_file(), "every example has a smoke variant"
        assert f"extends: {path.name}" in (EXAMPLES / f"{path.stem}-smoke.yaml").read_text()


@pytest.mark.slow
def test_grid_smoke_example_runs(cli, tmp_path):
    code, _, err = cli(
        "grid",
        "--config",
        str(EXAMPLES / "grid-smoke.yaml"),
        "--out",
        str(tmp_path),
        "--quiet",
        "--no-report",
        "--jobs",
        "1",
    )
    assert code == 0, err
    (grid,) = [d for d in tmp_path.iterdir() if (d / "grid.json").is_file()]
    res = pd.read_csv(grid / "results.csv")
    assert set(res["embed_dim"]) == {2, 8} and set(res["method"]) == {"plain", "diag_la"}


@needs_fashion
@pytest.mark.slow
def test_seed_smoke_example_runs(cli, tmp_path):
    code, _, err = cli(
        "run", "--config", str(EXAMPLES / "seed-smoke.yaml"), "--out", str(tmp_path), "--quiet", "--no-report"
    )
    assert code == 0, err
    (res,) = _results(tmp_path)
    assert set(pd.read_csv(res)["method"]) == {"plain", "full_la", "laplace_torch"}


@pytest.mark.slow
def test_cifar_smoke_example_runs(cli, tmp_path):
    code, _, err = cli(
        "run",
        "--config",
        str(EXAMPLES / "cifar-smoke.yaml"),
        "--out",
        str(tmp_path),
        "--quiet",
        "--no-report",
    )
    if code == 2 and "not found" in err.lower():
        pytest.skip(f"CIFAR-10 or the trunk's weights are not available here: {err.strip()}")
    assert code == 0, err
    (res,) = _results(tmp_path)
    assert set(pd.read_csv(res)["method"]) == {"plain", "diag_la"}


@pytest.mark.parametrize("preset", ["smoke", "seed", "cifar", "cub"])
def test_a_recorded_config_reads_back_to_the_same_config(tmp_path, preset):
    """Every field of a run folder's config.json (None, tuples, method options, floats, and the record of
    what was set on purpose, `explicit`) round-trips."""
    cfg = preset_config(preset).replace(seeds=(0, 3), sensitivity_priors=(0.5, 2.0), n_train=None, lr=3.3e-05)
    f = _write(
        tmp_path / "config.json",
        json.dumps(
            {
                "format_version": 1,
                "config": cfg.to_dict(),
                "methods": ["plain", "diag_la"],
                "status": "complete",
            }
        ),
    )
    # the resolved methods are read back, the record of what was set on purpose is kept as it was
    assert _cfg("--config", str(f)) == dataclasses.replace(cfg, methods=("plain", "diag_la"))
