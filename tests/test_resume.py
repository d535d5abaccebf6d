"""Resume promises of a run folder, through the runner and the folder alone: a run that ended with failures
retries only its failed methods; a finished method whose per-query file is missing or corrupt is fitted
again (never silently dropped from paired.csv); an atomic write that fails leaves the old file and no
temporary file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.config import preset_config
from bench.errors import BenchError
from bench.registry import METHODS, register_method
from bench.run_folder import RunFolder, RunWriter
from bench.runner import run

FLAKY = "_flaky_once"


def _cfg(tmp_path: Path, methods: tuple[str, ...]):
    return preset_config("smoke").replace(
        dataset="synthetic",
        quiet=True,
        report=False,
        methods=methods,
        out=str(tmp_path),
        bootstrap_resamples=50,
        far_ood=(),
    )


@pytest.fixture
def flaky(tmp_path):
    """A test-only method (plain embeddings) whose fit fails while the file `switch` exists."""
    from methods.plain import PlainEmbedding

    switch = tmp_path / "fail-now"

    @register_method(FLAKY)
    class FlakyOnce(PlainEmbedding):
        """Fails while its switch file exists (a transient failure: memory, a lost node)."""

        def fit(self, ctx):
            if switch.exists():
                raise BenchError("transient failure (test)")
            super().fit(ctx)

    try:
        yield switch
    finally:
        METHODS.remove(FLAKY)


def _marker(folder: Path, method: str) -> Path:
    (m,) = folder.glob(f"methods/{method}-seed0.json")
    return m


def test_a_run_with_failures_retries_only_the_failed_methods(tmp_path, flaky):
    flaky.touch()
    cfg = _cfg(tmp_path / "runs", ("plain", FLAKY, "diag_la"))
    folder = run(cfg, log=lambda *_: None)
    meta = json.loads((folder / "config.json").read_text())
    assert meta["status"] == "complete-with-failures" and [f["method"] for f in meta["failures"]] == [FLAKY]
    kept = {m: _marker(folder, m).stat().st_mtime_ns for m in ("plain", "diag_la")}
    flaky.unlink()
    lines: list[str] = []
    again = run(cfg, log=lines.append)
    assert again == folder and "(resuming)" in lines[0]
    assert {ln.strip() for ln in lines if "done earlier, reused" in ln} == {
        "plain (seed 0): done earlier, reused",
        "diag_la (seed 0): done earlier, reused",
    }
    assert f"  {FLAKY} (seed 0) ..." in lines and not any(
        ln.startswith("  plain (seed 0) ...") for ln in lines
    )
    assert {m: _marker(folder, m).stat().st_mtime_ns for m in kept} == kept, (
        "finished methods are not refitted"
    )
    meta = json.loads((folder / "config.json").read_text())
    assert meta["status"] == "complete" and meta["failures"] == []
    rf = RunFolder(folder)
    assert rf.methods == ["plain", FLAKY, "diag_la"] and set(rf.paired["method"]) == {FLAKY, "diag_la"}


def _stopped_before_final_tables(folder: Path, damage: str, legacy: bool) -> None:
    """The run stopped before its final tables, and diag_la's per-query file is lost or cut short; a
    `legacy` folder is one written before checksum manifests (no manifest.json, none in config.json)."""
    meta = json.loads((folder / "config.json").read_text())
    if legacy:
        meta.pop("manifest", None)
        (folder / "manifest.json").unlink()
        (folder / "config.json").write_text(json.dumps({**meta, "status": "running"}))
        (folder / "paired.csv").unlink()
    else:
        writer = RunWriter(folder, resumed=True)
        writer.write_config({k: v for k, v in meta.items() if k != "status"}, "running")
        writer.manifest.remove(["paired.csv"])
    npz = folder / "perquery" / "diag_la-seed0.npz"
    if damage == "missing":
        npz.unlink()
    else:
        npz.write_bytes(npz.read_bytes()[:100])


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_damaged_per_query_file_is_named_on_resume(tmp_path, damage):
    """With a checksum manifest, resuming names the damaged file in one line before building on it."""
    cfg = _cfg(tmp_path / "runs", ("plain", "diag_la"))
    folder = run(cfg, log=lambda *_: None)
    _stopped_before_final_tables(folder, damage, legacy=False)
    with pytest.raises(
        BenchError, match=r"perquery/diag_la-seed0\.npz (is missing|changed after bench wrote it)"
    ):
        run(cfg, log=lambda *_: None)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_legacy_finished_method_without_readable_arrays_is_fitted_again(tmp_path, damage):
    """A folder from before manifests: the method is fitted again with one line, never dropped from
    paired.csv."""
    cfg = _cfg(tmp_path / "runs", ("plain", "diag_la"))
    folder = run(cfg, log=lambda *_: None)
    paired = pd.read_csv(folder / "paired.csv")
    assert set(paired["method"]) == {"diag_la"}
    _stopped_before_final_tables(folder, damage, legacy=True)
    lines: list[str] = []
    assert run(cfg, log=lines.append) == folder
    assert "  plain (seed 0): done earlier, reused" in lines
    said = [ln for ln in lines if "diag_la" in ln and "per-query" in ln]
    assert len(said) == 1 and "fitting it again" in said[0], lines
    assert RunFolder(folder).perquery("diag_la", 0) is not None
    again = pd.read_csv(folder / "paired.csv")
    pd.testing.assert_frame_equal(again, paired)  # the refit is the same fit: the same paired differences


@pytest.mark.parametrize("when", ["writing", "replacing"])
@pytest.mark.parametrize("kind", ["text", "csv", "npz", "torch"])
def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, when, kind):
    from bench import atomic

    target = tmp_path / "sub" / f"file.{kind}"
    write = {
        "text": lambda v: atomic.atomic_write_text(target, str(v)),
        "csv": lambda v: atomic.atomic_write_csv(target, pd.DataFrame({"v": [v]})),
        "npz": lambda v: atomic.atomic_savez(target, v=np.array([v])),
        "torch": lambda v: atomic.atomic_torch_save({"v": v}, target),
    }[kind]
    write(1)
    old = target.read_bytes()

    def boom(*_, **__):
        raise KeyboardInterrupt  # the worst case: Ctrl-C, a BaseException, mid-write

    if when == "replacing":
        monkeypatch.setattr(atomic.os, "replace", boom)
    else:  # the serialiser fails after the temporary file exists
        owner, name = {
            "text": (atomic, "open"),
            "csv": (pd.DataFrame, "to_csv"),
            "npz": (atomic.np, "savez_compressed"),
            "torch": (atomic.torch, "save"),
        }[kind]
        monkeypatch.setattr(owner, name, boom, raising=False)  # bench.atomic's `open` shadows the builtin
    with pytest.raises(KeyboardInterrupt):
        write(2)
    assert target.read_bytes() == old
    assert os.listdir(target.parent) == [target.name], "no temporary file is left behind"
