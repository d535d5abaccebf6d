"""CLI behaviour the README promises beyond `bench run`'s happy path: `hessian-bench` runs at a tiny size
and agrees with laplace-torch; `bench` with no subcommand shows the help and exits 2; Ctrl-C exits 130 with
one line and the same command resumes; `--methods all` expands to every registered method."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cli import build_parser, config_from_args
from bench.registry import METHODS
from bench.runner import resolve_methods

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("run", "list", "grid", "report", "hessian-bench", "step-profile")


@pytest.mark.slow
def test_hessian_bench_runs_at_a_tiny_size_and_matches_laplace_torch(cli):
    code, out, err = cli(
        "hessian-bench",
        "--data",
        "random",
        "--n",
        "32",
        "--hidden",
        "4",
        "--chunk",
        "16",
        "--lt-n",
        "16",
        "--dtype",
        "float64",
    )
    assert code == 0, err
    assert out.startswith("hessian-bench: net 784-4-2, N=32 (random), float64 on cpu")
    assert "D = 3150" in out  # 784*4 + 4 + 4*2 + 2
    rows = {ln.split("  ")[0].strip(): ln for ln in out.splitlines()[3:] if ln.strip()}
    assert set(rows) >= {
        "floor: torch.mm(J^T, J)",
        "ours full ggn",
        "ours full jtj",
        "ours diag ggn",
        "ours kfac ggn",
        "laplace-torch CurvlinopsGGN (default)",
        "laplace-torch AsdlGGN",
    }
    assert re.search(r"\bJ \[64, 3150\]", rows["floor: torch.mm(J^T, J)"])  # N*d rows of the Jacobian
    for backend in ("CurvlinopsGGN (default)", "AsdlGGN"):  # our J^T J equals laplace-torch's H, in float64
        diff = float(re.search(r"rel diff to ours (\S+)$", rows[f"laplace-torch {backend}"]).group(1))
        assert diff < 1e-6, rows[f"laplace-torch {backend}"]


def test_no_subcommand_shows_the_help_and_exits_2(cli):
    code, out, err = cli()
    assert code == 2 and out.startswith("usage: bench") and err == ""
    assert all(f"    {c} " in out for c in SUBCOMMANDS)


def test_methods_all_expands_to_every_registered_method_the_reference_first(cli, tmp_path):
    cfg = config_from_args(build_parser().parse_args(["run", "--preset", "smoke", "--methods", "all,plain"]))
    assert cfg.methods == ("all", "plain")
    got = resolve_methods(cfg)
    assert got[0] == "plain" and sorted(got) == sorted(METHODS.names()) and len(got) == len(set(got))
    # every method's own checks run on "all": a bad option is refused before any run folder exists
    code, _, err = cli(
        "run",
        "--preset",
        "smoke",
        "--dataset",
        "synthetic",
        "--methods",
        "all",
        "--out",
        str(tmp_path),
        "--set",
        "posterior_rank_tol=-1",
        "--quiet",
    )
    assert code == 2 and err.strip() == "error: posterior_rank_tol must be a finite number >= 0, got -1.0"
    assert not list(tmp_path.glob("*/config.json"))


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_the_same_command_resumes(tmp_path):
    args = [
        sys.executable,
        "-m",
        "bench",
        "run",
        "--preset",
        "smoke",
        "--dataset",
        "synthetic",
        "--quiet",
        "--no-report",
        "--methods",
        "plain,mc_dropout,deep_ensemble",
        "--epochs",
        "12",
        "--out",
        str(tmp_path),
        "--set",
        "bootstrap_resamples=50",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job (CI's may be one) inherits SIGINT ignored, and Python then keeps it
        # ignored: give the child a terminal's default, as when a user presses Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob("*/methods/*.json")):
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)  # the terminal's Ctrl-C, mid-run (workers fitting)
        out, err = proc.communicate(timeout=180)  # generous: a loaded 2-core box
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted; rerun the same command to resume"], err
    (config,) = tmp_path.glob("*/config.json")
    assert json.loads(config.read_text())["status"] == "running"
    done = {p.stem for p in config.parent.glob("methods/*.json")}
    resumed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert all(f"{m.removesuffix('-seed0')} (seed 0): done earlier, reused" in resumed.stdout for m in done)
    assert json.loads(config.read_text())["status"] == "complete"
