"""A grid over several presets (`bench grid --presets A,B`): each preset's cells carry its own config
(dataset, backbone, OOD sets), `--set` applies to all, bases are per weights, the report groups by
preset / dataset and draws critical-difference diagrams; the fine-grained presets keep their own
near/far-OOD sets; the smoke variant of examples/fair-grid.yaml runs end to end."""

from pathlib import Path

import pandas as pd
import pytest

from bench.cli import build_parser, grid_spec
from bench.config import preset_config
from bench.errors import BenchError
from bench.grid import GridSpec
from bench.grid.spec import base_configs, expand, record_base, task_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _configs(spec: GridSpec) -> dict:
    """cell id -> the RunConfig the driver would run it with."""
    cells, _ = expand(spec)
    meta = {"base_config": spec.base_config().to_dict(), "base_configs": base_configs(spec)}
    return {cid: task_config(record_base(meta, c), c, cid, "cells", c["method"]) for cid, c in cells.items()}


def test_each_preset_runs_its_own_config_and_set_applies_to_all():
    spec = GridSpec((), ("plain", "diag_la"), (0, 1), presets=("smoke", "smoke_color"), sets=("epochs=1;2",))
    cfgs = _configs(spec)
    assert len(cfgs) == 2 * 2 * 2 * 2
    for cid, cfg in cfgs.items():
        preset = "smoke_color" if cid.startswith("smoke_color-") else "smoke"
        own = preset_config(preset)
        assert cid.startswith(f"{preset}-{own.dataset}-")
        assert (cfg.dataset, cfg.backbone, cfg.freeze_backbone, cfg.far_ood, cfg.image_size) == (
            own.dataset,
            own.backbone,
            own.freeze_backbone,
            own.far_ood,
            own.image_size,
        )
        assert cfg.epochs == (1 if cid.endswith("epochs=1") else 2)  # the axis reaches every preset
    _, bases = expand(spec)
    assert {(b["preset"], b["dataset"]) for b in bases.values()} == {
        ("smoke", "fashion_mnist"),
        ("smoke_color", "synthetic_color"),
    } and len(bases) == 2 * 2 * 2  # (dataset, seed, epochs): epochs changes the weights


def test_fine_grained_presets_keep_their_own_ood_sets():
    """cub100's near-OOD set is cars_train and vice versa; neither gets the other's far-OOD list."""
    cfgs = _configs(GridSpec((), ("plain", "full_la"), (0,), presets=("cub100", "cars_train", "cifar")))
    far = {cid.split("-")[0]: cfg.far_ood for cid, cfg in cfgs.items()}
    assert far == {
        "cub100": ("cars_train", "caltech101", "pacs_sketch"),
        "cars_train": ("cub100", "caltech101", "pacs_sketch"),
        "cifar": ("mnist_ood", "fashion_ood"),
    }


def test_one_preset_keeps_the_old_grid():
    old = GridSpec(("synthetic",), ("plain",), (0,), "smoke")
    new = GridSpec(("synthetic",), ("plain",), (0,), presets=("smoke",))
    assert new.to_dict() == old.to_dict() and expand(new) == expand(old)  # the same command resumes it
    assert list(expand(old)[0]) == ["synthetic-plain-seed0"] and "presets" not in old.to_dict()


@pytest.mark.parametrize(
    "argv, why",
    [
        (["--presets", "smoke,smoke_color", "--datasets", "synthetic"], "each preset's own dataset"),
        (["--presets", "smoke,nonsense"], "unknown preset 'nonsense'"),
        (["--presets", "smoke,smoke"], "presets named twice"),
        (["--preset", "smoke", "--presets", "smoke,smoke_color"], "not both"),
    ],
)
def test_bad_preset_lists_fail_with_one_line(argv, why):
    with pytest.raises(BenchError, match=why) as e:
        grid_spec(build_parser().parse_args(["grid", *argv]))
    assert "\n" not in str(e.value)


def test_cli_and_experiment_file_give_the_same_spec():
    flags = grid_spec(
        build_parser().parse_args(
            ["grid", "--presets", "smoke,smoke_color", "--methods", "plain,diag_la", "--seeds", "0-1"]
            + ["--set", "recipe=paper;tuned", "--set", "val_items=40", "--set", "tune_trials=3"]
            + ["--set", "bootstrap_resamples=50"]
        )
    )
    spec = grid_spec(build_parser().parse_args(["grid", "--config", str(EXAMPLES / "fair-grid-smoke.yaml")]))
    assert spec.presets == flags.presets == ("smoke", "smoke_color")
    assert expand(spec) == expand(flags)


@pytest.mark.slow
def test_fair_grid_smoke_example_runs_and_reports_by_preset(cli, tmp_path):
    code, out, err = cli(
        "grid",
        "--config",
        str(EXAMPLES / "fair-grid-smoke.yaml"),
        "--seeds",
        "0",
        "--set",
        "recipe=tuned",  # one value: the axis of the file collapses (the command line wins)
        "--out",
        str(tmp_path),
        "--quiet",
        "--jobs",
        "2",
    )
    assert code == 0, err
    (grid,) = [d for d in tmp_path.iterdir() if (d / "grid.json").is_file()]
    res = pd.read_csv(grid / "results.csv")
    assert set(zip(res["preset"], res["dataset"])) == {
        ("smoke", "fashion_mnist"),
        ("smoke_color", "synthetic_color"),
    }
    sets = {
        p: {m for m in res[res["preset"] == p]["metric"] if m.startswith("AUROC[")}
        for p in ("smoke", "smoke_color")
    }
    assert "AUROC[noise]" in sets["smoke_color"] and "AUROC[mnist]" in sets["smoke"]
    assert not any("noise" in m for m in sets["smoke"]) and not any(
        "mnist" in m for m in sets["smoke_color"]
    )  # no preset's sets on another
    md = (grid / "report.md").read_text()
    assert (
        "Preset / dataset: smoke / fashion_mnist" in md
        and "Preset / dataset: smoke_color / synthetic_color" in md
    )
    assert "Critical-difference diagrams" in md and "cd_retrieval" in md
    assert "too few for an interval across seeds" in md  # one seed
    assert "== smoke_color / synthetic_color (mean over seeds) ==" in out
