"""Command line: `python -m bench run|grid|list|report|export|inspect|hessian-bench|step-profile`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.config import PRESETS, apply_overrides, parse_value, preset_config
from bench.errors import BenchError
from bench.tracking import check_tracker, default_uri

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
    "--workers": (
        "workers",
        "method fits at once in CPU worker processes (0: one per core, the default; 1: serial)",
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sub = self.prog.split()[1:]  # "bench report" -> ["report"]; the top-level parser -> []
        raise BenchError(f"{message} (see `python -m bench {' '.join([*sub, '--help'])}`)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench", description="Benchmark uncertainty methods for deep metric learning.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    r = sub.add_parser("run", help="train once, apply every method, score and report")
    r.add_argument(
        "--config",
        metavar="FILE",
        help="an experiment file (YAML or JSON: docs/experiment-files.md), or a run folder's "
        "config.json to rerun it; the flags below override it",
    )
    r.add_argument(
        "--preset", default=None, help=f"one of: {', '.join(PRESETS)} (default: the file's, else default)"
    )
    for flag, (_, help_) in RUN_FLAGS.items():
        r.add_argument(flag, default=None, help=help_)
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any config field, e.g. --set hidden=32,32 --set prior_precision=1.0",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--no-report", action="store_true", help="skip rendering report.md/report.html")
    add_log_flags(r)
    ls = sub.add_parser("list", help="registered methods (with their recipes), datasets and presets")
    ls.add_argument(
        "--recipes",
        action="store_true",
        help="only the methods' recipes, in full: settings, source, note and tunable knobs",
    )
    add_grid_parser(sub)
    rep = sub.add_parser("report", help="re-render tables and plots from a run folder or a grid folder")
    rep.add_argument("run_dir", help="a run folder, or a grid folder (then one report over the whole grid)")
    rep.add_argument(
        "--format",
        default="md,html",
        help="comma-separated: md, html, latex (files in the folder); text (every table, printed)",
    )
    rep.add_argument(
        "--page",
        metavar="FILE.md",
        default=None,
        help="also write a results page (findings and detail tables; command, commit, machine on top)",
    )
    ex = sub.add_parser(
        "export",
        help="refit one method of a finished run, check it, save it as one file",
        description="Refits METHOD from RUN's config.json and model cache, checks that it reproduces the "
        "run's saved predictions and scores bit for bit, and writes one self-contained file that "
        "`bench.load(FILE)` serves (docs/export.md).",
    )
    ex.add_argument("run_dir", metavar="RUN", help="a finished run folder")
    ex.add_argument("--method", required=True, help="the method to export (one the run has results of)")
    ex.add_argument("--seed", type=int, default=None, help="which of the run's seeds (default: its first)")
    ex.add_argument("--out", required=True, metavar="FILE", help="the file to write (e.g. diag_la.pt)")
    ins = sub.add_parser("inspect", help="what an exported file holds: method, seed, source, fit, sizes")
    ins.add_argument("file", metavar="FILE", help="a file written by `bench export`")
    hb = sub.add_parser(
        "hessian-bench", help="time the Hessian hot path against laplace-torch and a bare matmul"
    )
    try:
        from bench.tools import hessian_bench

        hessian_bench.add_arguments(hb)
    except ImportError:
        pass
    sp = sub.add_parser(
        "step-profile", help="where a training step's time goes (fast path vs PML), and torch.compile"
    )
    from bench.tools import step_profile

    step_profile.add_arguments(sp)
    return p


def add_grid_parser(sub) -> None:
    g = sub.add_parser(
        "grid",
        help="many runs (datasets x methods x seeds x settings) on a local pool or Ray",
        description="Every cell (dataset, setting, method, seed) is one run folder in one grid folder; "
        "`--resume GRID_DIR` finishes what is missing or failed.",
    )
    g.add_argument(
        "--resume",
        metavar="GRID_DIR",
        help="finish an existing grid (its recorded spec; other spec flags refused)",
    )
    spec = g.add_argument_group("what to run (not with --resume)")
    spec.add_argument(
        "--config",
        metavar="FILE",
        help="a grid experiment file (YAML or JSON: docs/experiment-files.md); the flags below override it",
    )
    spec.add_argument("--datasets", help="comma-separated dataset names (default: the preset's)")
    spec.add_argument("--methods", default=None, help="comma-separated method names, or 'all' (default)")
    spec.add_argument("--seeds", default=None, help="seeds: 0-4, 0,1,2 or 0-2,7 (default: 0)")
    spec.add_argument("--preset", default=None, help=f"one of: {', '.join(PRESETS)} (default: default)")
    spec.add_argument(
        "--presets",
        default=None,
        help="several presets, comma-separated (e.g. default,cifar): each runs its own dataset with its "
        "own config (backbone, OOD sets, feature cache); the report groups cells by preset / dataset",
    )
    spec.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=V[;V...]",
        help="a config field for every cell; several values make a grid axis: repeat --set, or "
        "separate values with ';' (and with ',' for non-tuple fields), e.g. "
        "--set prior_precision=marglik,grid --set 'hidden=32,32;64,64'",
    )
    spec.add_argument("--device", default=None, help="auto (cuda when available), cpu, cuda or cuda:N")
    spec.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    spec.add_argument("--out", default=None, help="parent folder of the grid folder (default runs/)")
    spec.add_argument("--name", default=None, help="grid name, used in the grid folder's name (default grid)")
    ex = g.add_argument_group("where to run (may change on --resume)")
    ex.add_argument(
        "--executor", default="local", choices=["local", "ray"], help="local process pool (default) or Ray"
    )
    ex.add_argument(
        "--address", default=None, help="Ray cluster address (e.g. auto); default: start Ray on this machine"
    )
    ex.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="tasks at once (local default: CPUs / cpus-per-job; Ray: as resources allow)",
    )
    ex.add_argument(
        "--cpus-per-job", type=float, default=1.0, help="CPUs (and torch threads) per task (default 1)"
    )
    ex.add_argument(
        "--gpus-per-job",
        type=float,
        default=0.0,
        help="GPUs per task, fractions share a GPU (Ray only; default 0)",
    )
    g.add_argument("--quiet", action="store_true", help="no live progress bar: a line per finished cell")
    g.add_argument("--no-report", action="store_true", help="skip rendering the grid report")
    add_log_flags(g)


def add_log_flags(p: argparse.ArgumentParser) -> None:
    """--log TRACKER and --log-uri URI (bench/tracking.py; docs/tracking.md)."""
    p.add_argument(
        "--log",
        default=None,
        metavar="TRACKER",
        help="also log to an experiment tracker: mlflow "
        "(one run per method and seed, nested under the bench run; needs the tracking extra)",
    )
    p.add_argument(
        "--log-uri",
        default=None,
        metavar="URI",
        help="the tracker's store or server (default: "
        "sqlite:///<out>/mlflow.db, a local store that `mlflow ui` opens)",
    )


def config_from_args(args: argparse.Namespace):
    """Preset (--preset, else the experiment file's, else default), then the experiment file
    (--config), then named flags, then --set FIELD=VALUE; every value parsed and validated."""
    from bench.experiment import run_overrides

    file_preset, overrides = run_overrides(args.config) if getattr(args, "config", None) else (None, {})
    cfg = preset_config(args.preset or file_preset or "default")
    given: dict = {}  # flags and --set items
    for flag, (field_, _) in RUN_FLAGS.items():
        val = getattr(args, flag.lstrip("-").replace("-", "_"))
        if val is not None:
            given[field_] = parse_value(field_, val)
    for item in args.set:
        if "=" not in item:
            raise BenchError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        given[k.strip().replace("-", "_")] = parse_value(k.strip().replace("-", "_"), v)
    if args.quiet:
        given["quiet"] = True
    if args.no_report:
        given["report"] = False
    # a run folder's config.json records what was set on purpose then: that record, plus what is given now
    marked = set(given) if "explicit" in overrides else None
    return apply_overrides(cfg, {**overrides, **given}, marked)


def cmd_list(recipes_only: bool = False) -> int:
    from tabulate import tabulate

    from bench.recipes import recipe_table, recipes_text
    from bench.registry import BACKBONES, DATASETS, METHODS, SCORES

    if recipes_only:
        print(recipes_text(), end="")
        return 0
    print(tabulate(METHODS.descriptions().items(), headers=[METHODS.kind, "description"]))
    print()
    print(recipe_table())
    print()
    for reg in (DATASETS, BACKBONES, SCORES):
        print(tabulate(reg.descriptions().items(), headers=[reg.kind, "description"]))
        print()
    print(tabulate([(n, d) for n, (d, _) in PRESETS.items()], headers=["preset", "description"]))
    options = [
        (name, m, opt.type.__name__, opt.default, opt.help)
        for m in METHODS.names()
        for name, opt in METHODS.get(m).options.items()
    ]
    if options:
        print()
        print(
            tabulate(
                options,
                headers=["method option (--set NAME=VALUE)", "method", "type", "recipe=default", "what"],
            )
        )
        print("(recipe=paper, the run's default, sets some of these: the recipe table above)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bench.runner import run
    from reports.render import print_summary, render_report

    cfg = config_from_args(args)
    check_tracker(args.log)  # before any work: a missing MLflow is one line now, not after the run
    run_dir = run(cfg)
    report = None
    if cfg.report:
        report = next(p for p in render_report(run_dir, ["md", "html"]) if p.suffix == ".html")
    print_summary(run_dir, report)
    if report is None:
        print(f"run folder: {run_dir}")
    if args.log:
        from bench.tracking import log_run

        uri = args.log_uri or default_uri(cfg.out)
        print(f"logged to MLflow: run {log_run(run_dir, uri)} at {uri}")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from bench.grid import ExecutorOptions, create_grid, run_grid
    from bench.run_folder import GridFolder, verify
    from reports.grid_report import print_grid_summary, render_grid_report

    check_tracker(args.log)
    opts = ExecutorOptions(args.executor, args.address, args.jobs, args.cpus_per_job, args.gpus_per_job)
    spec_flags = {
        "--config": args.config,
        "--datasets": args.datasets,
        "--methods": args.methods,
        "--seeds": args.seeds,
        "--preset": args.preset,
        "--presets": args.presets,
        "--set": args.set or None,
        "--device": args.device,
        "--data-dir": args.data_dir,
        "--out": args.out,
        "--name": args.name,
    }
    if args.resume:
        given = [f for f, v in spec_flags.items() if v is not None]
        if given:
            raise BenchError(f"--resume runs the grid's recorded spec; drop {', '.join(given)}")
        verify(args.resume, outputs=False)  # the grid's files and every cell's run folder
        grid = GridFolder(args.resume)
    else:
        spec = grid_spec(args)
        grid = create_grid(spec, args.out or "runs", args.name or "grid")
        verify(grid.path, outputs=False)  # an unfinished grid of the same spec is resumed: check it
    run_grid(grid, opts, quiet=args.quiet)
    report = None
    if not args.no_report:
        report = next(p for p in render_grid_report(grid.path, ["md", "html"]) if p.suffix == ".html")
    print_grid_summary(grid.path, report)
    if report is None:
        print(f"grid folder: {grid.path}")
    if args.log:
        from bench.tracking import log_grid

        uri = args.log_uri or default_uri(grid.path.parent)
        print(f"logged to MLflow: grid run {log_grid(grid.path, uri)} at {uri}")
    return 0


def grid_spec(args: argparse.Namespace):
    """The GridSpec of `bench grid` flags (not --resume): the experiment file's values (--config)
    where a flag is not given; --preset P (one) or --presets P1,P2 (several, each its own dataset)."""
    from bench.grid import GridSpec
    from bench.grid.spec import parse_seeds

    _merge_grid_file(args)
    presets = tuple(p.strip() for p in (args.presets or "").split(",") if p.strip())
    if presets and args.preset:
        raise BenchError("give --preset P (one) or --presets P1,P2 (several), not both")
    preset = args.preset or (presets[0] if presets else "default")
    default_datasets = "" if len(presets) > 1 else preset_config(preset).dataset
    return GridSpec(
        datasets=tuple(d.strip() for d in (args.datasets or default_datasets).split(",") if d.strip()),
        methods=parse_value("methods", args.methods or "all"),
        seeds=parse_seeds(args.seeds or "0"),
        preset=preset,
        sets=tuple(args.set),
        device=args.device,
        data_dir=args.data_dir,
        presets=presets if len(presets) > 1 else (),
    )


def _merge_grid_file(args: argparse.Namespace) -> None:
    """Fill the grid flags the user left out from the experiment file (--config); its settings become
    --set items, before the command line's (a field set on both: the command line's value)."""
    if not args.config:
        return
    from bench.experiment import grid_arguments

    found = grid_arguments(args.config)
    if args.preset is not None or args.presets is not None:  # the command line's preset(s) win
        found.pop("preset", None)
        found.pop("presets", None)
    for key in ("datasets", "methods", "seeds", "preset", "presets", "device", "data_dir", "name", "out"):
        if getattr(args, key) is None and key in found:
            setattr(args, key, found[key])
    flagged = {item.split("=", 1)[0].strip().replace("-", "_") for item in args.set if "=" in item}
    args.set = [f"{k}={v}" for k, v in found["sets"].items() if k not in flagged] + list(args.set)


def cmd_report(args: argparse.Namespace) -> int:
    from bench.run_folder import is_grid, verify
    from reports.render import render_report

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    grid = is_grid(args.run_dir)
    if grid:
        verify(args.run_dir, outputs=False)  # (a run folder verifies itself when it is read)
        from reports.grid_report import full_grid_text as full_text  # noqa: F811
        from reports.grid_report import render_grid_report as render_report  # noqa: F811
    else:
        from reports.render import full_text
    files = [f for f in formats if f != "text"]
    if files:
        for path in render_report(args.run_dir, files):
            print(f"wrote {path}")
    if "text" in formats:
        print(full_text(args.run_dir), end="")
    if args.page:
        from bench.atomic import atomic_write_text
        from reports.page import page_text

        atomic_write_text(Path(args.page), page_text(args.run_dir))
        print(f"wrote {args.page}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bench.export import export

    res = export(args.run_dir, args.method, args.out, seed=args.seed)
    retrained = f"; {res.trained} net(s) retrained (not cached)" if res.trained else ""
    print(
        f"wrote {res.path} ({res.size / 1e6:.2f} MB): {args.method}, state {', '.join(res.attributes)}; "
        f"{len(res.checked)} arrays reproduced bit for bit{retrained}"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from bench.export import describe

    print(describe(args.file))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; BenchError becomes one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "grid":
            return cmd_grid(args)
        if args.command == "list":
            return cmd_list(args.recipes)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "inspect":
            return cmd_inspect(args)
        if args.command == "hessian-bench":
            from bench.tools import hessian_bench

            return hessian_bench.main(args)
        if args.command == "step-profile":
            from bench.tools import step_profile

            return step_profile.main(args)
        build_parser().print_help()
        return 2
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
