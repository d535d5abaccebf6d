"""Method fits in forked worker processes (`workers`): the same results as a serial run, the shared base
training charged once, failures isolated, and one-line errors where workers cannot run."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from bench import parallel
from bench.config import preset_config
from bench.errors import BenchError
from bench.registry import METHODS
from bench.runner import run

METHODS_UNDER_TEST = ("plain", "diag_la", "mc_dropout", "deep_ensemble")


def _cfg(tmp_path, workers, **kw):
    return preset_config("smoke").replace(
        dataset="synthetic",
        methods=METHODS_UNDER_TEST,
        out=str(tmp_path / f"w{workers}"),
        quiet=True,
        report=False,
        workers=workers,
        **kw,
    )


def _tables(folder):
    return (
        pd.read_csv(folder / "results.csv"),
        pd.read_csv(folder / "timings.csv"),
        json.loads((folder / "config.json").read_text()),
    )


@pytest.mark.slow
def test_two_workers_give_the_serial_results_and_charge_the_base_once(tmp_path):
    serial_folder = run(_cfg(tmp_path, 1), log=lambda *_: None)
    serial = _tables(serial_folder)
    lines: list[str] = []
    par_folder = run(_cfg(tmp_path, 2), log=lines.append)
    par = _tables(par_folder)
    assert par[2]["workers"] == 2 and serial[2]["workers"] == 1 and par[2]["status"] == "complete"
    assert any("2 worker processes" in line for line in lines)
    a, b = serial[0].set_index(["method", "seed", "metric"]), par[0].set_index(["method", "seed", "metric"])
    assert list(a.index) == list(b.index)  # the run's order, not the order fits completed in
    pd.testing.assert_frame_equal(a, b, rtol=1e-3, atol=1e-4)  # thread counts change rounding only
    # per-query predictions (means, variances, scores) too: the nets are trained at train_threads in both
    # runs; a post-hoc stage that a worker runs at 2 threads reduces in another order (float32 rounding)
    from bench.run_folder import RunFolder

    ser, par_ = RunFolder(serial_folder), RunFolder(par_folder)
    for (m, s), arrays in ser.all_perquery().items():
        other = par_.perquery(m, s)
        assert set(arrays) == set(other)
        for k, v in arrays.items():
            np.testing.assert_allclose(other[k], v, rtol=1e-4, atol=1e-5, err_msg=f"{m} {k}")
    t = par[1]
    assert len(t[(t.method == "base") & (t.stage == "train")]) == 1
    assert {"mc_dropout", "deep_ensemble"} <= set(t[t.stage == "train"].method)
    assert (
        par[2]["models_trained"] == serial[2]["models_trained"] == 1 + 1 + 2
    )  # base, dropout net, 2 members


def test_a_failing_method_in_a_worker_is_recorded_and_the_others_complete(tmp_path, monkeypatch):
    def broken(self, ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(METHODS.get("mc_dropout"), "fit", broken)  # the forked workers inherit it
    folder = run(_cfg(tmp_path, 2), log=lambda *_: None)
    res, tim, meta = _tables(folder)
    assert meta["status"] == "complete-with-failures"
    assert [f["method"] for f in meta["failures"]] == ["mc_dropout"] and "boom" in meta["failures"][0][
        "error"
    ]
    assert set(res.method) == {"plain", "diag_la", "deep_ensemble"}
    assert len(tim[(tim.method == "base") & (tim.stage == "train")]) == 1


def test_worker_count_and_schedule():
    cfg = preset_config("smoke")
    cpu = torch.device("cpu")
    assert parallel.worker_count(cfg.replace(workers=1), cpu, 5) == 1
    assert parallel.worker_count(cfg.replace(workers=3), cpu, 2) == 2  # never more than the fits
    assert parallel.worker_count(cfg.replace(workers=0), cpu, 99) == parallel.cpu_count()
    assert parallel.worker_count(cfg.replace(workers=0), torch.device("cuda"), 5) == 1
    with pytest.raises(BenchError, match="workers=2 runs methods in forked CPU processes"):
        parallel.worker_count(cfg.replace(workers=2), torch.device("cuda"), 5)
    pending = [(m, s) for s in (0, 1) for m in ("mc_dropout", "plain", "full_la", "deep_ensemble")]
    order = parallel.schedule(pending)  # no estimates: per rank, seed then the run's order
    assert order == [
        ("plain", 0), ("plain", 1),  # each seed's base model first
        ("mc_dropout", 0), ("deep_ensemble", 0), ("mc_dropout", 1), ("deep_ensemble", 1),
        ("full_la", 0), ("full_la", 1),
    ]  # fmt: skip


def test_the_longest_fits_start_first():
    """With estimates, the costliest post-hoc fit trains the base (it starts first), then the costliest
    self-training fits, then the other post-hoc fits, each rank longest first."""
    pending = [(m, s) for s in (0, 1) for m in ("plain", "mc_dropout", "full_la", "deep_ensemble", "diag_la")]
    cost = {"plain": 1, "mc_dropout": 5, "full_la": 30, "deep_ensemble": 9, "diag_la": 2}
    order = parallel.schedule(pending, {(m, s): cost[m] + s for m, s in pending})
    assert order == [
        ("full_la", 1), ("full_la", 0),
        ("deep_ensemble", 1), ("deep_ensemble", 0), ("mc_dropout", 1), ("mc_dropout", 0),
        ("diag_la", 1), ("diag_la", 0), ("plain", 1), ("plain", 0),
    ]  # fmt: skip


def test_cost_estimates_come_from_an_earlier_run_then_from_method_guesses(tmp_path):
    from bench import fit_costs

    cfg = preset_config("smoke").replace(dataset="synthetic", recipe="default")  # laplace_torch: full
    pending = [("plain", 0), ("laplace_torch", 0), ("deep_ensemble", 0)]
    paper, _ = fit_costs.estimate_costs(cfg.replace(recipe="paper"), pending, tmp_path)
    assert paper[("laplace_torch", 0)] == 1  # its paper recipe: laplace-torch's last-layer KFAC
    costs, source = fit_costs.estimate_costs(cfg, pending, tmp_path)
    members = METHODS.get("deep_ensemble").option(cfg, "ensemble_size")
    assert "no earlier run" in source
    assert costs[("laplace_torch", 0)] == 20 and costs[("plain", 0)] == 1
    assert costs[("deep_ensemble", 0)] == members
    fit_costs.remember(tmp_path, cfg, "plain", 3.0)
    fit_costs.remember(tmp_path, cfg.replace(epochs=cfg.epochs + 1), "deep_ensemble", 1.0)  # other settings
    costs, source = fit_costs.estimate_costs(cfg.replace(seeds=(0, 1)), pending, tmp_path)
    assert source.startswith("1 of 3 methods from an earlier run's timings")
    assert costs[("plain", 0)] == 3.0 and costs[("laplace_torch", 0)] == 60.0  # 3 s per guessed unit
    assert costs[("deep_ensemble", 0)] == 3.0 * members


# A parent that ran OpenMP on 2 threads, then a pool of 2 forked workers: the short fit (plain) returns at
# once, the long one (laplace_torch: only the names are real) waits (up to 30 s) until it runs alone, then
# runs OpenMP regions at its share of the cores.
_LONE_FIT = """
import json, time, torch
from bench import parallel
torch.set_num_threads(2)
a = torch.randn(1500, 1500)
for _ in range(3):
    a @ a  # the parent's OpenMP pool now exists
def fit(name, seed):
    if name == "plain":
        return 0
    deadline = time.time() + 30
    while parallel.balance_threads() < parallel.cpu_count() and time.time() < deadline:
        time.sleep(0.05)
    threads = torch.get_num_threads()
    (a @ a).sum(); torch.linalg.eigvalsh(a[:400, :400] @ a[:400, :400].T)  # hangs on a stale OpenMP pool
    return threads
got = {}
parallel.run_pool(fit, None, [("laplace_torch", 0), ("plain", 0)], 2, lambda out, sec, cpu: got.setdefault(
    "long" if out else "short", out))
print(json.dumps(got))
"""


@pytest.mark.skipif(parallel.cpu_count() < 2, reason="needs two cores")
def test_a_lone_fit_gets_every_core_even_after_the_parent_used_openmp():
    """Once no fit waits to start, a running fit takes all the cores at its next stage, in a forked worker
    whose parent had started GNU OpenMP's thread pool (a child's main thread hangs there)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _LONE_FIT], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"short": 0, "long": parallel.cpu_count()}


def _env() -> dict:
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_negative_workers_is_a_one_line_error():
    with pytest.raises(BenchError, match="workers must be >= 0"):
        preset_config("smoke").replace(workers=-1)


def test_a_dead_worker_fails_its_fit_in_one_line_and_the_same_command_finishes_the_rest(tmp_path):
    """A worker killed mid-fit (the OOM killer, a segfault) breaks the whole process pool: the fits it took
    down are retried alone, so only the dead fit fails, named in one line with nothing half-written kept,
    and rerunning the command fits it."""
    import os
    import signal

    from bench.registry import register_method
    from methods.plain import PlainEmbedding

    parent, switch = os.getpid(), tmp_path / "die"

    @register_method("_dies_in_worker")
    class DiesInWorker(PlainEmbedding):
        """Test-only: SIGKILLs its own worker process while the switch file exists."""

        def fit(self, ctx):
            if switch.exists() and os.getpid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)
            super().fit(ctx)

    switch.touch()
    methods = ("plain", "_dies_in_worker", "diag_la")
    try:
        cfg = _cfg(tmp_path, 2).replace(methods=methods, far_ood=(), bootstrap_resamples=50)
        lines: list[str] = []
        folder = run(cfg, log=lines.append)
        res, _, meta = _tables(folder)
        failed = {f["method"]: f["error"] for f in meta["failures"]}
        assert meta["status"] == "complete-with-failures" and list(failed) == ["_dies_in_worker"]
        assert failed["_dies_in_worker"].startswith("worker process failed: BrokenProcessPool")
        assert "\n" not in failed["_dies_in_worker"] and "_dies_in_worker (seed 0) FAILED" in "\n".join(lines)
        assert list(dict.fromkeys(res.method)) == ["plain", "diag_la"]  # the healthy fits, in the run's order
        assert {p.stem for p in (folder / "methods").glob("*.json")} == {"plain-seed0", "diag_la-seed0"}
        switch.unlink()
        again = run(cfg, log=lines.append)
        res, _, meta = _tables(again)
        assert again == folder and meta["status"] == "complete"
        assert list(dict.fromkeys(res.method)) == list(methods)
        assert sum("done earlier, reused" in ln for ln in lines) == 2
    finally:
        METHODS.remove("_dies_in_worker")
