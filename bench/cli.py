"""Command line: `python -m bench run|list|report|hessian-bench`."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from bench.config import PRESETS, parse_value, preset_config, apply_overrides
from bench.errors import BenchError

# flag -> RunConfig field; each overrides the preset's value
RUN_FLAGS = {
    "--methods": ("methods", "comma-separated method names, or 'all' (see `bench list`)"),
    "--dataset": ("dataset", "dataset name (see `bench list`)"),
    "--seed": ("seed", "random seed"),
    "--seeds": ("seeds", "comma-separated seeds: repeat the run per seed"),
    "--epochs": ("epochs", "training epochs"),
    "--batch-size": ("batch_size", "training batch size"),
    "--device": ("device", "auto (cuda when available), cpu, cuda or cuda:N"),
    "--data-dir": ("data_dir", "folder holding the dataset files (overrides the default search)"),
    "--out": ("out", "parent folder of run folders (default runs/)"),
    "--name": ("name", "run name, used in the run folder's name (default: the preset)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BenchError(f"{message} (see `python -m bench {self.prog.split()[-1]} --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench", description="Benchmark uncertainty methods for deep metric learning.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    r = sub.add_parser("run", help="train once, apply every method, score and report")
    r.add_argument("--preset", default="default", help=f"one of: {', '.join(PRESETS)}")
    for flag, (_, help_) in RUN_FLAGS.items():
        r.add_argument(flag, default=None, help=help_)
    r.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set hidden=32,32 --set prior_precision=1.0")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--no-report", action="store_true", help="skip rendering report.md/report.html")
    sub.add_parser("list", help="registered methods, datasets and presets")
    rep = sub.add_parser("report", help="re-render tables and plots from a run folder")
    rep.add_argument("run_dir")
    rep.add_argument("--format", default="md,html", help="comma-separated: md, html, latex")
    hb = sub.add_parser("hessian-bench", help="time the Hessian hot path against laplace-torch and a bare matmul")
    try:
        from bench.tools import hessian_bench
        hessian_bench.add_arguments(hb)
    except ImportError:
        pass
    return p


def config_from_args(args: argparse.Namespace):
    """Preset, then named flags, then --set FIELD=VALUE; every value parsed and validated."""
    cfg = preset_config(args.preset)
    overrides = {}
    for flag, (field_, _) in RUN_FLAGS.items():
        val = getattr(args, flag.lstrip("-").replace("-", "_"))
        if val is not None:
            overrides[field_] = parse_value(field_, val)
    for item in args.set:
        if "=" not in item:
            raise BenchError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip().replace("-", "_")] = parse_value(k.strip().replace("-", "_"), v)
    if args.quiet:
        overrides["quiet"] = True
    if args.no_report:
        overrides["report"] = False
    return apply_overrides(cfg, overrides)


def cmd_list() -> int:
    from tabulate import tabulate
    from bench.registry import BACKBONES, DATASETS, METHODS

    for reg in (METHODS, DATASETS, BACKBONES):
        print(tabulate(reg.descriptions().items(), headers=[reg.kind, "description"]))
        print()
    print(tabulate([(n, d) for n, (d, _) in PRESETS.items()], headers=["preset", "description"]))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bench.runner import run
    from reports.render import print_summary, render_report

    cfg = config_from_args(args)
    run_dir = run(cfg)
    print_summary(run_dir)
    if cfg.report:
        for path in render_report(run_dir, ["md", "html"]):
            print(f"wrote {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from reports.render import render_report

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    for path in render_report(args.run_dir, formats):
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; BenchError becomes one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "list":
            return cmd_list()
        if args.command == "report":
            return cmd_report(args)
        if args.command == "hessian-bench":
            from bench.tools import hessian_bench
            return hessian_bench.main(args)
        build_parser().print_help()
        return 2
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
