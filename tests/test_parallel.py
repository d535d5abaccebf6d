"""Method fits in forked worker processes (`workers`): the same results as a serial run, the shared base
training charged once, failures isolated, and one-line errors where workers cannot run."""

import json

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
    serial = _tables(run(_cfg(tmp_path, 1), log=lambda *_: None))
    lines: list[str] = []
    par = _tables(run(_cfg(tmp_path, 2), log=lines.append))
    assert par[2]["workers"] == 2 and serial[2]["workers"] == 1 and par[2]["status"] == "complete"
    assert any("2 worker processes" in line for line in lines)
    a, b = serial[0].set_index(["method", "seed", "metric"]), par[0].set_index(["method", "seed", "metric"])
    assert list(a.index) == list(b.index)  # the run's order, not the order fits completed in
    pd.testing.assert_frame_equal(a, b, rtol=1e-3, atol=1e-4)  # thread counts change rounding only
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
    order = parallel.schedule(pending)
    assert order[:4] == [("plain", 0), ("mc_dropout", 0), ("deep_ensemble", 0), ("full_la", 0)]
    assert order[4] == ("plain", 1)


def test_workers_stay_single_threaded():
    """More than one OpenMP thread in a forked child of a parent that used them hangs (GNU OpenMP)."""
    assert parallel.WORKER_THREADS == 1


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
