"""The run folder: writer and reader round trip, resuming, one-line errors for what is not a finished
run of this format, and no code under reports/ or bench/metrics/ that opens a path itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import RUN_FORMAT_VERSION
from bench.errors import BenchError
from bench.run_folder import RESULT_COLUMNS, TIMING_COLUMNS, RunFolder, RunWriter

ROOT = Path(__file__).resolve().parents[1]


def _finished(tmp_path: Path) -> RunWriter:
    w = RunWriter.open(tmp_path, "t", "abc")
    rng = np.random.default_rng(0)
    for seed in (1, 0):
        for m in ("b", "a"):
            rows = [
                {"method": m, "seed": seed, "metric": "mAP@1", "value": 0.5, "ci_low": 0.4, "ci_high": 0.6}
            ]
            times = [{"method": m, "seed": seed, "stage": "predict", "seconds": 0.1}]
            w.save_method(
                m, seed, {"id_mean": rng.random((4, 2)), "pq_mAP@1": np.ones(4)}, rows, times, {"k": seed}
            )
    results = pd.DataFrame(
        [r for m in ("b", "a") for s in (1, 0) for r in w.finished(m, s)["rows"]], columns=RESULT_COLUMNS
    )
    timings = pd.DataFrame(
        [t for m in ("b", "a") for s in (1, 0) for t in w.finished(m, s)["timings"]], columns=TIMING_COLUMNS
    )
    w.write_tables(results, timings, pd.DataFrame(columns=["method", "metric", "mean"]), None)
    w.write_config(
        {
            "methods": ["b", "a"],
            "config": {"seeds": [1, 0]},
            "class_names": ["x", "y"],
            "config_digest": "abc",
        },
        "complete",
    )
    return w


def test_writer_and_reader_round_trip(tmp_path):
    w = _finished(tmp_path)
    assert w.finished("a", 0)["diagnostics"] == {"k": 0} and w.finished("a", 7) is None
    run = RunFolder(w.path)
    assert run.meta["format_version"] == RUN_FORMAT_VERSION and run.meta["status"] == "complete"
    assert run.methods == ["b", "a"] and run.seeds == [1, 0] and run.class_names() == ["x", "y"]
    assert list(run.results.columns) == RESULT_COLUMNS and len(run.results) == 4
    assert run.paired is None and run.seed_table is not None and run.seed_table.empty
    np.testing.assert_array_equal(run.perquery("a", 1)["id_mean"], w.arrays("a", 1)["id_mean"])
    assert run.perquery("zzz", 0) is None
    assert list(run.all_perquery()) == [("b", 0), ("b", 1), ("a", 0), ("a", 1)]


def test_an_unfinished_run_of_the_same_config_is_resumed(tmp_path):
    w = RunWriter.open(tmp_path, "t", "abc")
    assert not w.resumed and w.path.parent == tmp_path and w.path.name.endswith("-t")
    w.write_config({"config_digest": "abc"}, "running")
    again = RunWriter.open(tmp_path, "t", "abc")
    assert again.resumed and again.path == w.path
    other = RunWriter.open(tmp_path, "t", "other")
    assert not other.resumed and other.path != w.path
    w.write_config({"config_digest": "abc"}, "complete")
    assert not RunWriter.open(tmp_path, "t", "abc").resumed


def test_report_files_and_stale_figures(tmp_path):
    run = RunFolder(_finished(tmp_path).path)
    (run.path / "plots").mkdir()
    (run.path / "plots" / "gone.png").write_bytes(b"old")
    written = run.write_report({"md": "# r\n", "latex": "x"}, {"fig": b"png"})
    assert written == [run.path / "report.md", run.path / "report.tex", run.path / "plots"]
    assert sorted(p.name for p in (run.path / "plots").iterdir()) == ["fig.png"]
    assert run.write_report({"html": "<p>"}, {}) == [run.path / "report.html"]
    assert not list((run.path / "plots").iterdir())


@pytest.mark.parametrize(
    "breakage, fragment",
    [
        ("no_config", "is not a run folder"),
        ("bad_json", "is not valid JSON"),
        ("other_format", "incompatible bench version"),
        ("unfinished", "the run did not finish"),
        ("bad_csv", "cannot read results.csv"),
    ],
)
def test_reader_errors_are_one_line(tmp_path, breakage, fragment):
    """The reader's own checks, on a folder from before checksum manifests (with one, the manifest names
    the damaged file first: tests/test_manifest.py)."""
    d = _finished(tmp_path).path
    (d / "manifest.json").unlink()
    meta = json.loads((d / "config.json").read_text())
    meta.pop("manifest")
    (d / "config.json").write_text(json.dumps(meta))
    if breakage == "no_config":
        (d / "config.json").unlink()
    elif breakage == "bad_json":
        (d / "config.json").write_text("{not json")
    elif breakage == "other_format":
        meta = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(meta | {"format_version": RUN_FORMAT_VERSION + 1}))
    elif breakage == "unfinished":
        (d / "results.csv").unlink()
    else:
        (d / "results.csv").write_text('a,b\n"1,2\n')
    with pytest.raises(BenchError, match=fragment) as e:
        RunFolder(d)
    assert "\n" not in str(e.value)


# what opening, listing or writing a path looks like in code (a buffer, `savefig(buf`, is fine)
OPENS_A_PATH = re.compile(
    r"\bopen\(|\.read_(text|bytes)\(|\.write_(text|bytes)\(|read_csv|to_csv|np\.load|"
    r"np\.save|savez|\bglob\b|iterdir|mkdir|unlink|rmtree|json\.load\(|json\.dump\(|"
    r"atomic_|torch\.(load|save)|os\.(path|remove|replace|listdir|scandir)|savefig\((?!buf\b)"
)


def test_reports_and_metrics_never_open_a_path():
    """Only bench/run_folder.py knows the run folder: reports and metrics get frames and arrays."""
    files = sorted((ROOT / "reports").rglob("*.py")) + sorted((ROOT / "bench" / "metrics").rglob("*.py"))
    assert len(files) >= 8
    hits = [
        f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
        for f in files
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if OPENS_A_PATH.search(line)
    ]
    assert not hits, "\n".join(hits)
