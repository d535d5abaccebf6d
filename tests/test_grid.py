"""`bench grid` end to end on each executor (local pool; a real local Ray cluster when Ray is
installed): 2 datasets x 2 methods x 2 seeds on the smoke preset, one cell's worker killed mid-task,
`--resume`, every model trained once, results bit-identical to the same cells run one by one."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.grid import ExecutorOptions, GridSpec, create_grid, run_grid
from bench.run_folder import GridFolder, RunFolder
from tests.conftest import FASHION_DIR

SECOND = (
    "fashion_mnist" if (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file() else "mnist_ood"
)  # both offline
DATASETS, METHODS, SEEDS = ("synthetic", SECOND), ("plain", "diag_la"), (0, 1)
SETS = (
    "bootstrap_resamples=50",
    "far_ood=,",
)  # the smoke preset, cheaper: a smaller bootstrap, no far-OOD set
try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False
EXECUTORS = ["local", pytest.param("ray", marks=pytest.mark.skipif(not HAVE_RAY, reason="ray not installed"))]


@pytest.fixture
def ray_cluster():
    """A real local Ray cluster with 2 CPUs for one test, shut down after."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_by_one(tmp_path_factory):
    """The grid's cells run one at a time with `bench run` (same preset, settings and seed)."""
    out = tmp_path_factory.mktemp("single")
    folders = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a grid task with --cpus-per-job 1: bit-identity needs the same thread count
    for d in DATASETS:
        for m in METHODS:
            for s in SEEDS:
                before = set(out.iterdir())
                args = [
                    "run",
                    "--preset",
                    "smoke",
                    "--dataset",
                    d,
                    "--methods",
                    m,
                    "--seed",
                    str(s),
                    "--out",
                    str(out),
                    "--quiet",
                    "--no-report",
                ] + [a for x in SETS for a in ("--set", x)]
                assert main(args) == 0
                (folders[(d, m, s)],) = [p for p in set(out.iterdir()) - before if p.name != "cache"]
    torch.set_num_threads(threads)
    return folders


def _kill_one_cell(grid: Path, killed: dict, timeout: float = 120.0) -> None:
    """Freeze the worker of the first cell seen in flight and, if it is still in flight (its marker
    is there), kill it with SIGKILL: that cell must fail and no other."""
    end = time.time() + timeout
    while time.time() < end and not killed:
        for marker in sorted((grid / "running").glob("cell-*.json")):
            try:
                info = json.loads(marker.read_text())
                os.kill(info["pid"], signal.SIGSTOP)
            except (OSError, ValueError, KeyError):
                continue
            if marker.exists():
                os.kill(info["pid"], signal.SIGKILL)
                killed["cell"] = info["task"].removeprefix("cell-")
                return
            os.kill(info["pid"], signal.SIGCONT)  # it finished meanwhile: try another
        time.sleep(0.02)


def _trainings(grid: GridFolder) -> int:
    return sum(r.get("models_trained", 0) for kind in ("cells", "bases") for r in grid.meta[kind].values())


def _assert_each_model_trained_once(grid: GridFolder) -> None:
    files = list((grid.cells_dir / "cache" / "models").glob("*.pt"))
    keys = [torch.load(f, weights_only=False)["info"]["key"] for f in files]
    bases = [(k["dataset"], k["seed"]) for k in keys if k["dropout"] == 0.0 and "recipe" not in k]
    assert sorted(bases) == sorted((d, s) for d in DATASETS for s in SEEDS), (
        "one base model per (dataset, seed)"
    )
    assert _trainings(grid) == len(files), "every training the grid did left its own cache file: none twice"


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
def test_grid_survives_a_killed_worker_and_resumes_to_the_one_by_one_results(
    executor, request, tmp_path, one_by_one
):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    grid = create_grid(GridSpec(DATASETS, METHODS, SEEDS, "smoke", SETS), tmp_path / "runs")
    killed: dict = {}
    killer = threading.Thread(target=_kill_one_cell, args=(grid.path, killed))
    killer.start()
    lines: list[str] = []
    run_grid(grid, ExecutorOptions(executor, jobs=2), quiet=True, log=lines.append)
    killer.join()

    meta = GridFolder(grid.path).meta
    assert killed, "no cell was caught in flight"
    status = {c: r["status"] for c, r in meta["cells"].items()}
    assert [c for c, s in status.items() if s != "done"] == [killed["cell"]], status
    assert "worker died" in meta["cells"][killed["cell"]]["error"] and meta["status"] == "incomplete"
    assert all(b["status"] == "done" for b in meta["bases"].values()) and len(meta["bases"]) == 4
    assert any("FAILED" in ln for ln in lines) and "7/8 cells done, 1 failed" in lines[-1]
    kept = {
        c: (
            meta["cells"][c]["run_dir"],
            (grid.path / meta["cells"][c]["run_dir"] / "config.json").stat().st_mtime_ns,
        )
        for c in status
        if c != killed["cell"]
    }

    assert (
        main(
            [
                "grid",
                "--resume",
                str(grid.path),
                "--executor",
                executor,
                "--jobs",
                "2",
                "--quiet",
                "--no-report",
            ]
        )
        == 0
    )
    grid = GridFolder(grid.path)
    assert grid.meta["status"] == "complete" and grid.meta["invocations"][-1]["cells_to_run"] == 1
    for c, (run_dir, mtime) in kept.items():  # finished cells were not recomputed
        assert grid.meta["cells"][c]["run_dir"] == run_dir
        assert (grid.path / run_dir / "config.json").stat().st_mtime_ns == mtime
    _assert_each_model_trained_once(grid)

    results, timings = grid.merged()
    assert list(results.columns[:2]) == ["cell", "dataset"] and results["cell"].nunique() == 8
    assert {"train", "hessian", "evaluate"} <= set(timings["stage"])
    for cid, c in grid.meta["cells"].items():
        single = RunFolder(one_by_one[(c["dataset"], c["method"], c["seed"])])
        mine = results[results["cell"] == cid].drop(columns=["cell", "dataset"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, single.results, check_exact=True)
        a, b = grid.cell_run(cid).perquery(c["method"], c["seed"]), single.perquery(c["method"], c["seed"])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a), (
            f"{cid} differs from bench run"
        )

    if executor == "local":  # the grid report, from the grid folder alone
        assert main(["report", str(grid.path), "--format", "md"]) == 0
        md = (grid.path / "report.md").read_text()
        assert f"## Dataset: {SECOND}" in md and "Mean rank over seeds" in md and "beats the column" in md
        assert (grid.path / "plots" / "cost_quality_synthetic.png").is_file()
        pw = pd.read_csv(grid.path / "pairwise.csv")
        assert set(pw["metric"]) >= {"mAP@1"} and (pw["n_seeds"] == 2).all()
