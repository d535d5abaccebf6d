"""What the README promises of `bench grid` beyond a killed worker (tests/test_grid.py): a failed base
model fails the cells waiting for it; a cell that finished but went unrecorded (the driver was killed) is
adopted; a second driver on the same grid is refused; a "done" cell whose run folder is gone reruns; the
grid-folder reader fails with one line. One-cell grids on the smoke preset, local executor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.errors import BenchError
from bench.grid import ExecutorOptions, GridSpec, create_grid, run_grid
from bench.run_folder import GridFolder

SETS = ("bootstrap_resamples=50", "far_ood=,")
LOCAL = ExecutorOptions("local", jobs=1)


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory) -> Path:
    """A complete one-cell grid (synthetic, plain, seed 0); tests work on copies of it."""
    grid = create_grid(
        GridSpec(("synthetic",), ("plain",), (0,), "smoke", SETS), tmp_path_factory.mktemp("grid")
    )
    run_grid(grid, LOCAL, quiet=True, log=_quiet)
    assert GridFolder(grid.path).meta["status"] == "complete"
    return grid.path


@pytest.fixture
def grid_copy(finished_grid, tmp_path) -> GridFolder:
    return GridFolder(shutil.copytree(finished_grid, tmp_path / finished_grid.name))


def _only_cell(grid: GridFolder) -> tuple[str, dict]:
    ((cid, cell),) = grid.meta["cells"].items()
    return cid, cell


@pytest.mark.slow
def test_a_failed_base_model_fails_the_cells_waiting_for_it(tmp_path):
    # lr=1e30: the shared base model's training diverges, in the base task, before either cell runs
    grid = create_grid(
        GridSpec(("synthetic",), ("plain", "diag_la"), (0,), "smoke", SETS + ("lr=1e30",)), tmp_path
    )
    lines: list[str] = []
    run_grid(grid, LOCAL, quiet=True, log=lines.append)
    meta = GridFolder(grid.path).meta
    ((bid, base),) = meta["bases"].items()
    assert base["status"] == "failed" and "non-finite training loss" in base["error"]
    assert {c["method"]: c["status"] for c in meta["cells"].values()} == {
        "plain": "failed",
        "diag_la": "failed",
    }
    for c in meta["cells"].values():
        assert c["error"].startswith(f"base model task {bid} failed: ") and "run_dir" not in c
    assert meta["status"] == "incomplete" and "0/2 cells done, 2 failed" in lines[-1]


def test_a_finished_but_unrecorded_cell_is_adopted_not_rerun(grid_copy):
    cid, cell = _only_cell(grid_copy)
    run_dir = grid_copy.path / cell["run_dir"]
    mtime = (run_dir / "results.csv").stat().st_mtime_ns
    # the driver was killed after the cell's run folder completed but before grid.json recorded it
    cell.update(status="running", run_dir=None)
    grid_copy.meta["status"] = "interrupted"
    grid_copy.save()
    lines: list[str] = []
    run_grid(GridFolder(grid_copy.path), LOCAL, quiet=True, log=lines.append)
    meta = GridFolder(grid_copy.path).meta
    assert (
        meta["cells"][cid]["status"] == "done" and grid_copy.path / meta["cells"][cid]["run_dir"] == run_dir
    )
    assert meta["invocations"][-1]["cells_to_run"] == 0 and meta["status"] == "complete"
    assert (run_dir / "results.csv").stat().st_mtime_ns == mtime, "adopted, not recomputed"
    assert "1/1 cells done" in lines[-1]


def test_a_second_driver_on_the_same_grid_is_refused(grid_copy, cli):
    before = (grid_copy.path / "grid.json").read_bytes()
    with grid_copy.lock():  # the first driver holds the grid
        code, _, err = cli("grid", "--resume", str(grid_copy.path), "--quiet", "--no-report")
        with pytest.raises(BenchError, match="is being run by another `bench grid` process"):
            run_grid(GridFolder(grid_copy.path), LOCAL, quiet=True, log=_quiet)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {grid_copy.path} is being run by another `bench grid` process")
    assert (grid_copy.path / "grid.json").read_bytes() == before, "the refused driver wrote nothing"


def test_a_done_cell_whose_run_folder_is_gone_reruns(grid_copy):
    cid, cell = _only_cell(grid_copy)
    results = (grid_copy.path / "results.csv").read_bytes()
    shutil.rmtree(grid_copy.path / cell["run_dir"])
    run_grid(GridFolder(grid_copy.path), LOCAL, quiet=True, log=_quiet)
    meta = GridFolder(grid_copy.path).meta
    assert meta["invocations"][-1]["cells_to_run"] == 1 and meta["cells"][cid]["status"] == "done"
    assert (
        meta["cells"][cid]["attempts"] == 2
        and (grid_copy.path / meta["cells"][cid]["run_dir"] / "results.csv").is_file()
    )
    assert (
        grid_copy.path / "results.csv"
    ).read_bytes() == results  # the same cell again: the same merged rows


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("no grid.json", "is not a grid folder (no grid.json)"),
        ("bad json", "grid.json is not valid JSON"),
        ("old format", "incompatible bench version (grid format 0, expected 1)"),
    ],
)
def test_the_grid_folder_reader_fails_with_one_line(grid_copy, cli, damage, fragment):
    """The reader's own checks, on a folder without a checksum manifest (one from before manifests: a
    manifest would name the damaged grid.json first, tests/test_manifest.py)."""
    g = grid_copy.path / "grid.json"
    (grid_copy.path / "manifest.json").unlink()
    g.write_text(json.dumps({k: v for k, v in json.loads(g.read_text()).items() if k != "manifest"}))
    if damage == "no grid.json":
        g.unlink()
    elif damage == "bad json":
        g.write_text(g.read_text()[:50])
    else:
        g.write_text(json.dumps({**json.loads(g.read_text()), "format_version": 0}))
    with pytest.raises(BenchError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        GridFolder(grid_copy.path)
    code, _, err = cli("grid", "--resume", str(grid_copy.path), "--quiet", "--no-report")
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
