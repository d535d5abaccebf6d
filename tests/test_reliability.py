"""Reliability: resume after a kill, determinism, failure isolation, and fuzzed flag combinations."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["run", "--preset", "smoke", "--dataset", "synthetic", "--quiet", "--no-report"]


def _run_dirs(out: Path) -> list[Path]:
    return sorted(d for d in out.iterdir() if d.is_dir() and d.name != "cache")


@pytest.mark.slow
def test_same_command_same_seed_gives_identical_results(cli, tmp_path):
    methods = ",".join(m for m in ("plain", "diag_la", "mc_dropout") if m in METHODS.names())
    for out in ("a", "b"):  # separate --out: both train from scratch
        assert cli(*SMOKE, "--methods", methods, "--out", str(tmp_path / out))[0] == 0
    a, b = (_run_dirs(tmp_path / o)[0] / "results.csv" for o in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()


def _processes_tagged(tag: str) -> list[int]:
    """Pids of live processes whose environment holds BENCH_TEST_TAG=tag (a run's or grid's workers
    inherit it, through forks and the forkserver alike)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            state = next(ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if f"BENCH_TEST_TAG={tag}".encode() in env.split(b"\0") and "zombie" not in state:
            found.append(int(d.name))
    return found


def _assert_no_survivor(tag: str, within: float = 10.0) -> None:
    deadline = time.time() + within
    while _processes_tagged(tag) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_tagged(tag), f"processes of the killed run still alive: {_processes_tagged(tag)}"


@pytest.mark.slow
def test_killed_run_resumes_without_repeating_finished_work(tmp_path):
    # killed in the second method's training: online_la's (curvature accumulated in training), then the rest
    methods = [m for m in ("plain", "online_la", "mc_dropout", "deep_ensemble") if m in METHODS.names()]
    if len(methods) < 2:
        pytest.skip("needs at least two methods")
    args = [*SMOKE, "--methods", ",".join(methods), "--epochs", "30", "--out", str(tmp_path / "killed")]
    tag = f"killed-run-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        env={**env, "BENCH_TEST_TAG": tag},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed").glob(f"*/methods/{methods[0]}-seed0.json"))
        if found:
            marker = found[0]
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _assert_no_survivor(tag)  # its forked workers die with it (they lived on as orphans before)
    assert marker is not None, "the first method never finished"
    run_dir = marker.parent.parent
    assert not (run_dir / "results.csv").exists(), "a killed run must not leave a results file"
    first_done = marker.read_text()
    cached_models = {p: p.stat().st_mtime_ns for p in (tmp_path / "killed" / "cache" / "models").glob("*.pt")}
    assert cached_models, "the first method's base model must be cached before the kill"

    resumed = subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "(resuming)" in resumed.stdout and f"{methods[0]} (seed 0): done earlier, reused" in resumed.stdout
    assert _run_dirs(tmp_path / "killed") == [run_dir]
    assert marker.read_text() == first_done  # the finished method was not recomputed
    for p, mtime in cached_models.items():  # nets trained before the kill were loaded, not retrained
        assert p.stat().st_mtime_ns == mtime
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["status"] == "complete"

    fresh = subprocess.run(
        [sys.executable, "-m", "bench", *args[:-1], str(tmp_path / "fresh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr
    for f in ("results.csv", "paired.csv"):  # paired: the resumed run pairs with the reloaded arrays
        assert (run_dir / f).read_bytes() == (_run_dirs(tmp_path / "fresh")[0] / f).read_bytes(), f


def test_a_failing_method_does_not_lose_the_others(cli, tmp_path, monkeypatch):
    from bench.errors import BenchError
    from bench.registry import register_method
    from methods.plain import PlainEmbedding

    @register_method("_always_fails")
    class AlwaysFails(PlainEmbedding):
        """Test-only method whose fit fails."""

        def fit(self, ctx):
            ctx.base_model()  # charges the shared base training, then fails
            raise BenchError("non-finite Hessian (test)")

    try:
        code, out, err = cli(*SMOKE, "--methods", "_always_fails,plain", "--out", str(tmp_path))
        assert code == 0
        d = _run_dirs(tmp_path)[0]
        meta = json.loads((d / "config.json").read_text())
        assert meta["status"] == "complete-with-failures"
        assert meta["failures"][0]["method"] == "_always_fails"
        assert "FAILED _always_fails" in out and "non-finite Hessian" in out
        assert set(pd.read_csv(d / "results.csv")["method"]) == {"plain"}
        tim = pd.read_csv(d / "timings.csv")
        assert len(tim[(tim.method == "base") & (tim.stage == "train")]) == 1  # charged once, not lost
    finally:
        METHODS.remove("_always_fails")


def test_non_finite_training_loss_fails_the_method_clearly(cli, tmp_path):
    code, out, _ = cli(
        *SMOKE, "--methods", "plain", "--set", "lr=1e30", "--epochs", "3", "--out", str(tmp_path)
    )
    assert code == 0
    meta = json.loads((_run_dirs(tmp_path)[0] / "config.json").read_text())
    assert meta["failures"] and "non-finite training loss" in meta["failures"][0]["error"]


# flag -> [(value, expected)]: expected is (config field, recorded value) for an accepted value, else a
# fragment of the one-line error that refuses it
FLAG_POOL = {
    "--methods": [
        ("plain", ("methods", ["plain"])),
        ("", "empty method list"),
        ("nope", "unknown method 'nope'"),
        ("plain,plain", ("methods", ["plain", "plain"])),
        ("all_but_typo", "unknown method 'all_but_typo'"),
    ],
    "--epochs": [
        ("1", ("epochs", 1)),
        ("0", "epochs must be >= 1"),
        ("-3", "epochs must be >= 1"),
        ("x", "bad value 'x' for epochs"),
    ],
    "--batch-size": [
        ("2", ("batch_size", 2)),
        ("16", ("batch_size", 16)),
        ("1", "batch-size must be >= 2"),
        ("abc", "bad value 'abc' for batch_size"),
    ],
    "--seed": [
        ("0", ("seed", 0)),
        ("7", ("seed", 7)),
        ("-1", "seeds must be >= 0"),
        ("1.5", "bad value '1.5' for seed"),
    ],
    "--set ks": [
        ("ks=1,2", ("ks", [1, 2])),
        ("ks=0", "every K must be >= 1"),
        ("ks=", "every K must be >= 1"),
        ("ks=a", "bad value 'a' for ks"),
    ],
    "--set heldout_classes": [
        ("heldout_classes=9", ("heldout_classes", [9])),
        ("heldout_classes=10", "heldout classes [10] are outside"),
        ("heldout_classes=0,1,2,3,4,5,6,7,8", "fewer than 2 training classes"),
        ("heldout_classes=1,1", "heldout_classes has duplicates"),
    ],
    "--set hidden": [
        ("hidden=4", ("hidden", [4])),
        ("hidden=0", "hidden widths must be >= 1"),
        ("hidden=8,8", ("hidden", [8, 8])),
    ],
    "--device": [
        ("cpu", ("device", "cpu")),
        ("gpu", "device must be auto, cpu or cuda"),
        ("cuda:7", "cuda:7"),
    ],
    "--dataset": [("synthetic", ("dataset", "synthetic")), ("imagenet", "unknown dataset 'imagenet'")],
    "--data-dir": [(None, None), ("/nonexistent/dir", ("data_dir", "/nonexistent/dir"))],  # synthetic: unused
}


def test_random_flag_combinations_run_or_fail_clearly(cli, tmp_path):
    """Each bad value is refused with its own one-line error and no results; each accepted one is
    recorded in the run's config.json."""
    rng = np.random.default_rng(2026)
    refused = accepted = 0
    for trial in range(14):
        argv = [
            "run",
            "--preset",
            "smoke",
            "--quiet",
            "--no-report",
            "--out",
            str(tmp_path / f"t{trial}"),
            "--set",
            "bootstrap_resamples=20",
        ]
        picks = rng.choice(list(FLAG_POOL), size=rng.integers(1, 4), replace=False)
        if "--dataset" not in picks:
            argv += ["--dataset", "synthetic"]
        if "--methods" not in picks:
            argv += ["--methods", "plain"]
        expected = []
        for flag in picks:
            # odd trials draw valid values only
            choices = [c for c in FLAG_POOL[flag] if trial % 2 == 0 or not isinstance(c[1], str)]
            val, expect = choices[rng.integers(len(choices))]
            if val is not None:
                argv += ["--set", val] if flag.startswith("--set") else [flag, val]
                expected.append(expect)
        errors = [e for e in expected if isinstance(e, str)]
        code, out, err = cli(*argv)
        if errors:
            refused += 1
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (argv, err)
            assert any(e in lines[0] for e in errors), (argv, err)
            assert not list((tmp_path / f"t{trial}").glob("*/results.csv")), "no partial results on bad input"
        else:
            accepted += 1
            assert code == 0, (argv, err)
            (config,) = (tmp_path / f"t{trial}").glob("*/config.json")
            folder, recorded = config.parent, json.loads(config.read_text())["config"]
            assert (folder / "results.csv").is_file()
            assert all(recorded[k] == v for k, v in expected), (argv, recorded)
    assert refused >= 3 and accepted >= 7


def test_report_refuses_an_incompatible_run_folder(cli, tmp_path):
    assert cli(*SMOKE, "--methods", "plain", "--out", str(tmp_path))[0] == 0
    d = _run_dirs(tmp_path)[0]
    meta = json.loads((d / "config.json").read_text())
    meta["format_version"] = 999
    from bench.run_folder import RunWriter

    RunWriter(d).write_config(meta, meta["status"])  # rewritten by bench (recorded), not damaged
    code, _, err = cli("report", str(d))
    assert code == 2 and "incompatible" in err and len(err.strip().splitlines()) == 1


def test_truncated_data_dir_fails_with_one_line_and_no_run_folder(cli, tmp_path):
    from datasets.idx import FILES
    from tests.conftest import FASHION_DIR

    if not (FASHION_DIR / FILES["test_labels"]).is_file():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    data = tmp_path / "data"
    data.mkdir()
    for f in FILES.values():
        (data / f).write_bytes((FASHION_DIR / f).read_bytes())
    raw = (data / FILES["test_images"]).read_bytes()
    (data / FILES["test_images"]).write_bytes(raw[: len(raw) // 2])  # a gzip cut in half
    code, _, err = cli("run", "--preset", "smoke", "--data-dir", str(data), "--out", str(tmp_path / "runs"))
    assert code == 2 and "corrupt or truncated" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_killed_grid_driver_leaves_no_worker(tmp_path):
    """SIGKILL the grid driver while its local workers run cells that outlast the test: within 10 s no
    process of it is left (the workers watch the driver's pid, `die_with_process`; the forkserver exits
    once they do). A SIGTERM takes the same path (checked by hand; one signal keeps the suite short)."""
    sig = signal.SIGKILL
    tag = f"killed-grid-{os.getpid()}-{time.time_ns()}"
    args = [
        "grid",
        "--preset",
        "smoke",
        "--datasets",
        "synthetic",
        "--methods",
        "plain,mc_dropout",
        "--seeds",
        "0,1",
        "--set",
        "epochs=100000",  # cells that outlast the test: a worker must not finish its cell first
        "--jobs",
        "2",
        "--quiet",
        "--no-report",
        "--out",
        str(tmp_path),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_TEST_TAG": tag}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(_processes_tagged(tag)) < 4:
            time.sleep(0.1)  # the driver, the forkserver and two workers
        assert proc.poll() is None and len(_processes_tagged(tag)) >= 4, "the workers never started"
        proc.send_signal(sig)
        proc.wait()
        _assert_no_survivor(tag)
    finally:
        for pid in _processes_tagged(tag):
            os.kill(pid, signal.SIGKILL)
