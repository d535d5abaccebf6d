"""The checksum manifest of run and grid folders: every written file recorded; a file cut, edited or
deleted afterwards named in one line by `verify`, RunFolder (`bench report`) and resuming; a run
killed in the middle of a write still verifies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.errors import BenchError
from bench.run_folder import MANIFEST, GridFolder, Manifest, RunFolder, RunWriter, sha256_of, verify
from tests.test_run_folder import _finished


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != MANIFEST}


def _one_line_error(fn, *fragments: str) -> str:
    with pytest.raises(BenchError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


def test_every_written_file_is_recorded_with_its_hash(tmp_path):
    d = _finished(tmp_path).path
    RunFolder(d).write_report({"md": "# r\n", "html": "<p>r</p>"}, {"fig": b"png-bytes"})
    files = json.loads((d / MANIFEST).read_text())["files"]
    assert set(files) == _files(d)  # nothing left out, nothing staged left behind
    assert {
        "config.json",
        "results.csv",
        "perquery/a-seed0.npz",
        "methods/a-seed0.json",
        "report.md",
        "plots/fig.png",
    } <= set(files)
    for rel, e in files.items():
        assert e == {"sha256": sha256_of(d / rel), "bytes": (d / rel).stat().st_size}, rel
    verify(d)


@pytest.mark.parametrize("damage", ["cut", "edit", "delete"])
@pytest.mark.parametrize(
    "rel", ["results.csv", "perquery/a-seed1.npz", "methods/b-seed0.json", "config.json"]
)
def test_a_damaged_file_is_named_in_one_line(tmp_path, damage, rel):
    d = _finished(tmp_path).path
    f = d / rel
    if damage == "cut":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "edit":  # one byte, the size unchanged
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 1
        f.write_bytes(bytes(b))
    else:
        f.unlink()
    what = "is missing" if damage == "delete" else "changed after bench wrote it"
    _one_line_error(lambda: verify(d), rel, what)
    if rel != "config.json" or damage != "delete":  # (no config.json: not a run folder, said first)
        _one_line_error(lambda: RunFolder(d), rel, what)


def test_reports_and_figures_are_checked_by_verify_but_not_when_reading(tmp_path):
    d = _finished(tmp_path).path
    RunFolder(d).write_report({"md": "# r\n"}, {"fig": b"png"})
    (d / "report.md").write_text("edited by hand\n")
    RunFolder(d)  # `bench report` rewrites it anyway
    _one_line_error(lambda: verify(d), "report.md", "changed")
    RunFolder(d).write_report({"md": "# r\n"}, {})  # re-rendered: recorded again; the stale figure removed
    verify(d)
    assert not (d / "plots" / "fig.png").exists() and "plots/fig.png" not in Manifest(d).load()["files"]


def test_manifest_damaged_or_removed(tmp_path):
    d = _finished(tmp_path).path
    (d / MANIFEST).write_text("{")
    _one_line_error(lambda: RunFolder(d), MANIFEST, "damaged")
    (d / MANIFEST).unlink()
    _one_line_error(lambda: RunFolder(d), MANIFEST, "missing")


def test_a_run_killed_in_the_middle_of_a_write_still_verifies_and_resumes(tmp_path, monkeypatch):
    w = _finished(tmp_path)
    d = w.path
    w.write_config({"config_digest": "abc"}, "running")
    old = (d / "results.csv").read_bytes()
    new = pd.DataFrame(
        {"method": ["a"], "seed": [0], "metric": ["m"], "value": [1.0], "ci_low": [0.0], "ci_high": [2.0]}
    )

    def killed(*a, **k):
        raise KeyboardInterrupt

    # killed after the manifest recorded the staged file, before it replaced the old one
    with monkeypatch.context() as m:
        m.setattr(Manifest, "_move", staticmethod(killed))
        with pytest.raises(KeyboardInterrupt):
            w.write_tables(new, new, new, None)
    assert (d / "results.csv").read_bytes() == old
    verify(d)
    assert RunWriter.open(tmp_path, "t", "abc").path == d  # resumes
    # killed after the files were replaced, before the manifest dropped their previous versions
    saves, real_save = [], Manifest._save

    def save_once(self, doc):
        saves.append(1)
        return real_save(self, doc) if len(saves) == 1 else killed()

    with monkeypatch.context() as m:
        m.setattr(Manifest, "_save", save_once)
        with pytest.raises(KeyboardInterrupt):
            w.write_tables(new, new, new, None)
    assert (d / "results.csv").read_bytes() != old
    verify(d)
    # a new file killed before it existed: recorded as possibly absent, so not missing
    with monkeypatch.context() as m:
        m.setattr(Manifest, "_move", staticmethod(killed))
        with pytest.raises(KeyboardInterrupt):
            w.save_method("c", 0, {"x": np.zeros(2)}, [], [], {})
    assert not (d / "methods" / "c-seed0.json").exists()
    verify(d)
    w.save_method("c", 0, {"x": np.zeros(2)}, [], [], {})
    verify(d)


def test_resuming_a_damaged_run_names_the_file(tmp_path):
    w = _finished(tmp_path)
    w.write_config({"config_digest": "abc"}, "running")  # an unfinished run of this config
    (w.path / "perquery" / "a-seed0.npz").write_bytes(b"x" * 100)
    _one_line_error(lambda: RunWriter.open(tmp_path, "t", "abc"), "perquery/a-seed0.npz", "changed")


def test_grid_folder_and_its_cells_are_verified(tmp_path):
    g = GridFolder.create(tmp_path, "g", {"spec": {}, "cells": {}, "status": "pending"})
    g.meta["status"] = "done"
    g.save()
    g.write_merged(pd.DataFrame({"a": [1]}), pd.DataFrame({"b": [2]}))
    cell = _finished(g.cells_dir).path
    verify(g.path)
    (cell / "timings.csv").write_text("x")
    _one_line_error(lambda: verify(g.path), "timings.csv", str(cell.name))
    (cell / "timings.csv").unlink()
    (g.path / "results.csv").write_text("cut")
    _one_line_error(lambda: verify(g.path), "results.csv", "changed")


def test_cli_report_and_rerun_name_the_damaged_file(cli, tmp_path):
    out = tmp_path / "runs"
    args = (
        "run",
        "--preset",
        "smoke",
        "--dataset",
        "synthetic",
        "--methods",
        "plain",
        "--out",
        str(out),
        "--quiet",
        "--no-report",
    )
    code, _, err = cli(*args)
    assert code == 0, err
    run = next(d for d in out.iterdir() if d.name != "cache")
    assert cli("report", str(run), "--format", "md")[0] == 0
    results = run / "results.csv"
    good = results.read_bytes()
    results.write_bytes(good[:100])  # cut to 100 bytes: the report used to render without a word
    code, _, err = cli("report", str(run))
    assert code == 2 and "results.csv" in err and "changed" in err and len(err.strip().splitlines()) == 1
    results.write_bytes(good.replace(b"plain", b"plaim", 1))  # edited, same size
    code, _, err = cli("report", str(run))
    assert code == 2 and "results.csv" in err and len(err.strip().splitlines()) == 1
    results.write_bytes(good)
    assert cli("report", str(run), "--format", "md")[0] == 0
    # an unfinished run (status written through the writer, as a killed run leaves it) resumes when intact ...
    meta = json.loads((run / "config.json").read_text())
    RunWriter(run).write_config(
        {k: v for k, v in meta.items() if k not in ("format_version", "status")}, "running"
    )
    code, stdout, err = cli(*args)
    assert code == 0 and "resuming" in stdout and "done earlier, reused" in stdout, err
    # ... and names the damaged file when not
    RunWriter(run).write_config(
        {k: v for k, v in meta.items() if k not in ("format_version", "status")}, "running"
    )
    (run / "methods" / "plain-seed0.json").write_text("{}")
    code, _, err = cli(*args)
    assert code == 2 and "methods/plain-seed0.json" in err and len(err.strip().splitlines()) == 1
