"""CPU utilisation of a run (busy core-seconds / (wall x cores)): what config.json records and what
`python -m bench.tools.utilisation` reads from it."""

import json
import os
import time

from bench import parallel
from bench.tools import utilisation


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_busy_seconds_count_the_workers_once_they_exit():
    """The pool's workers are children: their CPU time counts once they have exited and been waited for."""
    before = parallel.process_cpu_seconds()
    pid = os.fork()
    if pid == 0:
        _burn(0.6)
        os._exit(0)
    os.waitpid(pid, 0)
    assert parallel.process_cpu_seconds() - before >= 0.5


def _run_dir(tmp_path, name, wall, busy, cores):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"cpu": parallel.utilisation_record(wall, busy, cores)}))
    return str(d)


def test_the_tool_reads_each_run_and_their_combined_share(tmp_path, capsys):
    a = _run_dir(tmp_path, "a", wall=100.0, busy=180.0, cores=2)  # 90%
    b = _run_dir(tmp_path, "b", wall=300.0, busy=480.0, cores=2)  # 80%
    assert json.loads((tmp_path / "a" / "config.json").read_text())["cpu"]["utilisation"] == 0.9
    assert utilisation.main([a, b]) == 0
    out = capsys.readouterr().out
    assert "90.0%" in out and "80.0%" in out and "82.5%" in out  # (180 + 480) / (200 + 600)
    assert utilisation.main([a, b, "--min", "0.85"]) == 1
    assert utilisation.main([a, "--min", "0.85"]) == 0


def test_a_folder_without_the_record_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert utilisation.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no cpu record" in err


def test_a_run_records_its_utilisation(tmp_path):
    from bench.config import preset_config
    from bench.runner import run

    cfg = preset_config("smoke").replace(
        dataset="synthetic", methods=("plain", "diag_la"), far_ood=(), out=str(tmp_path), quiet=True,
        report=False, workers=2, bootstrap_resamples=50,
    )  # fmt: skip
    rec = utilisation.cpu_record(run(cfg, log=lambda *_: None))
    assert rec["cores"] == parallel.cpu_count() and rec["busy_core_seconds"] > 0
    assert 0 < rec["utilisation"] <= 1.05
