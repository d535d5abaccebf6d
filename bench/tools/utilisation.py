"""`python -m bench.tools.utilisation RUN_DIR [RUN_DIR ...] [--min 0.85]`: how busy a run kept the CPU,
from the `cpu` record of its config.json (`bench.parallel.utilisation_record`):

    utilisation = busy core-seconds / (wall seconds x cores)

busy core-seconds being the user + system CPU time of the run's process and of its worker processes
(getrusage of the process and of its reaped children) from the start of `bench.runner.run` (data
loading and feature extraction included) to config.json's final write; several runs together are
sum(busy) / sum(wall x cores). Exit status 1 when `--min` is given and the combined utilisation is below
it, 2 for a folder without the record (one line each)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from bench.errors import BenchError


def cpu_record(run_dir: str | Path) -> dict:
    """config.json's `cpu` record of a finished run folder (BenchError when absent)."""
    path = Path(run_dir) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise BenchError(f"{run_dir}: no readable config.json (not a run folder?)") from None
    rec = meta.get("cpu")
    if not isinstance(rec, dict) or not rec.get("wall_seconds"):
        raise BenchError(
            f"{run_dir}: config.json has no cpu record (an unfinished run, or one older than this tool)"
        )
    return rec


def combined(records: list[dict]) -> float:
    """sum(busy core-seconds) / sum(wall x cores) over runs."""
    return sum(r["busy_core_seconds"] for r in records) / sum(r["wall_seconds"] * r["cores"] for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tools.utilisation", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("--min", type=float, default=None, help="fail (exit 1) below this combined share")
    args = parser.parse_args(argv)
    try:
        records = [cpu_record(r) for r in args.runs]
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [
        [r, f"{c['wall_seconds']:.1f}", f"{c['busy_core_seconds']:.1f}", c["cores"],
         f"{c['busy_core_seconds'] / (c['wall_seconds'] * c['cores']):.1%}"]
        for r, c in zip(args.runs, records)
    ]  # fmt: skip
    total = combined(records)
    if len(records) > 1:
        wall = sum(c["wall_seconds"] for c in records)
        busy = sum(c["busy_core_seconds"] for c in records)
        rows.append(["(together)", f"{wall:.1f}", f"{busy:.1f}", "", f"{total:.1%}"])
    print(tabulate(rows, headers=["run", "wall s", "busy core-s", "cores", "utilisation"]))
    if args.min is not None and total < args.min:
        print(f"utilisation {total:.1%} is below {args.min:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
