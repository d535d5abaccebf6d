"""Render a run folder into report.md / report.html and print its summary."""
from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from bench import RUN_FORMAT_VERSION
from bench.errors import BenchError
from bench.store import atomic_write_text
from reports.tables import results_table, timing_table


def load_run(run_dir: str | Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(config.json, results, timings) of a finished run folder, or a BenchError saying what is wrong."""
    d = Path(run_dir)
    if not (d / "config.json").is_file():
        raise BenchError(f"{d} is not a run folder (no config.json)")
    try:
        meta = json.loads((d / "config.json").read_text())
    except ValueError:
        raise BenchError(f"{d}/config.json is not valid JSON") from None
    if meta.get("format_version") != RUN_FORMAT_VERSION:
        raise BenchError(f"{d} was written by an incompatible bench version (format {meta.get('format_version')}, expected {RUN_FORMAT_VERSION})")
    for f in ("results.csv", "timings.csv"):
        if not (d / f).is_file():
            raise BenchError(f"{d} has no {f}: the run did not finish; rerun its command to resume it")
    return meta, pd.read_csv(d / "results.csv"), pd.read_csv(d / "timings.csv")


def print_summary(run_dir: str | Path) -> None:
    """Print the results and timing tables and any failures."""
    meta, results, timings = load_run(run_dir)
    print(results_table(results))
    print()
    print(timing_table(timings))
    for f in meta.get("failures", []):
        print(f"FAILED {f['method']} (seed {f['seed']}): {f['error']}")


def render_report(run_dir: str | Path, formats: list[str]) -> list[Path]:
    """Write report.md (and report.html) with the tables; returns the paths written."""
    meta, results, timings = load_run(run_dir)
    d = Path(run_dir)
    cfg = meta["config"]
    md = "\n".join([
        f"# bench report: {cfg['name']}",
        "",
        f"dataset `{cfg['dataset']}`, preset `{cfg['preset']}`, device {meta['device_description']}, commit `{meta['git_commit']}`",
        "",
        "## Results (value [95% bootstrap CI])",
        "",
        results_table(results, tablefmt="github"),
        "",
        "## Wall time per stage (s)",
        "",
        timing_table(timings, tablefmt="github"),
        "",
    ])
    written = []
    bad = [f for f in formats if f not in ("md", "html")]
    if bad:
        raise BenchError(f"unknown report format {bad[0]!r}; known: md, html")
    if "md" in formats:
        atomic_write_text(d / "report.md", md)
        written.append(d / "report.md")
    if "html" in formats:
        atomic_write_text(d / "report.html", f"<!doctype html><meta charset='utf-8'><pre>{html.escape(md)}</pre>\n")
        written.append(d / "report.html")
    return written
