"""The grid's spec: seed ranges, `--set` axes, expansion into cells and base tasks, CLI errors."""

import pytest

from bench.errors import BenchError
from bench.grid.spec import GridSpec, expand, parse_seeds, parse_sets


def test_seed_ranges_and_lists():
    assert parse_seeds("0-4") == (0, 1, 2, 3, 4)
    assert parse_seeds("0,2,7") == (0, 2, 7)
    assert parse_seeds("0-2,7,1") == (0, 1, 2, 7)
    for bad, why in (
        ("a", "expected e.g. 0-4"),
        ("3-1", "start after end"),
        ("1,,2", "expected e.g. 0-4"),
        ("-1", "expected e.g. 0-4"),
    ):
        with pytest.raises(BenchError, match=f"bad seed.* '{bad}'.*{why}"):
            parse_seeds(bad)


def test_set_values_make_axes_and_tuple_fields_keep_their_commas():
    v = parse_sets(
        [
            "prior_precision=marglik,grid",
            "hidden=32,32",
            "ks=1,5;1,10",
            "epochs=1",
            "epochs=2",
            "hessian=ggn;jtj",
        ]
    )
    assert v["prior_precision"] == ["marglik", "grid"]
    assert v["hidden"] == [(32, 32)]  # one value: a tuple field's comma is inside the value
    assert v["ks"] == [(1, 5), (1, 10)]
    assert v["epochs"] == [1, 2]  # repeated --set adds values
    assert v["hessian"] == ["ggn", "jtj"]
    spec = GridSpec(("synthetic",), ("plain",), (0,), "smoke", ("hidden=32,32", "epochs=1,2"))
    assert list(spec.axes) == ["epochs"] and spec.base_config().hidden == (32, 32)


@pytest.mark.parametrize(
    "item, why",
    [
        ("seed=1", r"--set seed=\.\.\. is not allowed in a grid: use --datasets"),
        ("methods=plain", r"--set methods=\.\.\. is not allowed"),
        ("dataset=synthetic", r"--set dataset=\.\.\. is not allowed"),
        ("epochs", "--set expects FIELD=VALUE, got 'epochs'"),
        ("nonsense=1", "unknown config field 'nonsense'"),
        ("epochs=x", "bad value 'x' for epochs: expected int"),
    ],
)
def test_bad_set_items_fail_with_one_line(item, why):
    with pytest.raises(BenchError, match=why) as e:
        GridSpec(("synthetic",), ("plain",), (0,), "smoke", (item,)).base_config()
    assert "\n" not in str(e.value)


def test_expansion_shares_one_base_per_dataset_weights_and_seed():
    spec = GridSpec(
        ("synthetic", "mnist_ood"),
        ("plain", "diag_la", "mc_dropout"),
        (0, 1),
        "smoke",
        ("prior_precision=marglik,1.0",),
    )
    cells, bases = expand(spec)
    assert len(cells) == 2 * 2 * 3 * 2
    # prior_precision does not change the weights: both points share the base of (dataset, seed)
    assert len(bases) == 4 and {(b["dataset"], b["seed"]) for b in bases.values()} == {
        (d, s) for d in ("synthetic", "mnist_ood") for s in (0, 1)
    }
    assert all((c["base"] is None) == (c["method"] == "mc_dropout") for c in cells.values())
    assert "synthetic-diag_la-seed1-prior_precision=1.0" in cells
    # a setting that changes the weights gives each point its own base
    _, bases = expand(GridSpec(("synthetic",), ("plain",), (0,), "smoke", ("hidden=16;32,32",)))
    assert len(bases) == 2


def test_expansion_rejects_unknown_names_before_running(cli, tmp_path):
    code, _, err = cli(
        "grid",
        "--preset",
        "smoke",
        "--datasets",
        "synthetic,nope",
        "--methods",
        "plain",
        "--out",
        str(tmp_path),
        "--quiet",
    )
    assert (
        code == 2 and err.startswith("error: unknown dataset 'nope'") and len(err.strip().splitlines()) == 1
    )
    code, _, err = cli(
        "grid", "--preset", "smoke", "--datasets", "synthetic", "--methods", "nope", "--out", str(tmp_path)
    )
    assert code == 2 and "unknown method 'nope'" in err
    assert not any(tmp_path.iterdir()), "no grid folder is made for a spec that cannot run"


def test_resume_refuses_spec_flags_and_non_grids(cli, tmp_path):
    code, _, err = cli("grid", "--resume", str(tmp_path), "--datasets", "synthetic")
    assert code == 2 and "drop --datasets" in err
    code, _, err = cli("grid", "--resume", str(tmp_path))
    assert code == 2 and "not a grid folder" in err
    code, _, err = cli("grid", "--preset", "smoke", "--datasets", "synthetic", "--address", "auto")
    assert code == 2 and "--address is for --executor ray" in err


def test_the_same_command_resumes_an_unfinished_grid(tmp_path):
    from bench.grid import create_grid

    spec = GridSpec(("synthetic",), ("plain", "diag_la"), (0,), "smoke")
    first = create_grid(spec, tmp_path)
    assert create_grid(spec, tmp_path).path == first.path
    assert create_grid(GridSpec(("synthetic",), ("plain",), (0,), "smoke"), tmp_path).path != first.path
    first.meta["status"] = "complete"
    first.save()
    assert create_grid(spec, tmp_path).path != first.path, "a complete grid is never reopened"
