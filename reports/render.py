"""Render a run folder into report.md, a self-contained report.html and report.tex, from the run
folder alone (config.json, results.csv, timings.csv, perquery/*.npz, optional seeds.csv and
paired.csv): no model files, no retraining.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and written in
each requested format, so every format shows the same numbers. Figures go to RUN_DIR/plots/*.png and
are embedded in the HTML as base64 data URIs (the HTML opens offline, alone).
"""
from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench import RUN_FORMAT_VERSION
from bench.errors import BenchError
from bench.atomic import atomic_write_bytes, atomic_write_text
from reports import plots as P
from bench.metrics.aggregate import paired_differences, seed_summary
from reports.tables import (RESULTS_NOTE, Cell, Table, latex_escape, ordered, paired_tables, results_tables,
                            seeds_tables, stage_frame, timing_table)

FORMATS = {"md": "report.md", "html": "report.html", "latex": "report.tex"}
REFERENCE = "plain"


# ---------------------------------------------------------------------------------------- loading

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
    try:
        return meta, pd.read_csv(d / "results.csv"), pd.read_csv(d / "timings.csv")
    except (ValueError, pd.errors.ParserError) as e:
        raise BenchError(f"{d}: cannot read results.csv/timings.csv ({e})") from None


@dataclass
class RunData:
    """Everything a report needs from a run folder; per-query arrays are loaded once, on demand."""

    dir: Path
    meta: dict
    results: pd.DataFrame
    timings: pd.DataFrame
    seeds_csv: pd.DataFrame | None = None
    paired_csv: pd.DataFrame | None = None
    _pq: dict = field(default_factory=dict)

    @property
    def cfg(self) -> dict:
        return self.meta.get("config", {})

    @property
    def methods(self) -> list[str]:
        """Methods in the run's order (config.json), then any others found in results.csv."""
        return ordered(list(self.results["method"]), list(self.meta.get("methods", [])))

    @property
    def seeds(self) -> list[int]:
        s = list(self.cfg.get("seeds") or [])
        found = [int(x) for x in dict.fromkeys(self.results["seed"])] if not self.results.empty else []
        return [int(x) for x in s if int(x) in found] + [x for x in found if x not in s] or [int(self.cfg.get("seed", 0))]

    def perquery(self, method: str, seed: int) -> dict[str, np.ndarray] | None:
        """Arrays of perquery/<method>-seed<seed>.npz, or None when the file is absent or unreadable."""
        key = (method, seed)
        if key not in self._pq:
            f = self.dir / "perquery" / f"{method}-seed{seed}.npz"
            try:
                with np.load(f, allow_pickle=False) as z:
                    self._pq[key] = {k: z[k] for k in z.files}
            except (OSError, ValueError):
                self._pq[key] = None
        return self._pq[key]

    def class_names(self) -> list[str]:
        """Class names from config.json (data.class_names or class_names); else the dataset module's
        CLASS_NAMES constant (no data loaded); else an empty list (legends then say `class k`)."""
        names = (self.meta.get("data") or {}).get("class_names") or self.meta.get("class_names")
        if names:
            return list(names)
        try:
            import importlib
            mod = importlib.import_module(f"datasets.{self.cfg.get('dataset', '')}")
            return list(getattr(mod, "CLASS_NAMES", []))
        except Exception:  # noqa: BLE001 - optional lookup only
            return []


def load_run_data(run_dir: str | Path) -> RunData:
    """A RunData for run_dir (BenchError when it is not a finished run folder)."""
    meta, results, timings = load_run(run_dir)
    d = Path(run_dir)
    extra = {}
    for name, f in (("seeds_csv", "seeds.csv"), ("paired_csv", "paired.csv")):
        try:
            extra[name] = pd.read_csv(d / f) if (d / f).is_file() else None
        except (ValueError, pd.errors.ParserError):
            extra[name] = None
    return RunData(d, meta, results, timings, **extra)


# ----------------------------------------------------------------------------------------- blocks

@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    """A paragraph; `code` and **bold** spans are rendered in every format."""
    text: str
    note: bool = False


@dataclass
class Code:
    text: str


@dataclass
class Figure:
    """A figure written to plots/<name>.png."""
    name: str
    caption: str
    png: bytes


Block = Heading | Para | Code | Table | Figure


def reproduce_command(meta: dict) -> str:
    """The recorded command, or one rebuilt from the config: preset, dataset, methods, seeds, out, and
    `--set FIELD=VALUE` for every other field that differs from the preset."""
    if meta.get("command"):
        return meta["command"]
    from bench.config import PRESETS, RunConfig, preset_config

    cfg = meta.get("config", {})
    preset = cfg.get("preset", "default")
    base = (preset_config(preset) if preset in PRESETS else RunConfig()).to_dict()
    val = lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    parts = ["python -m bench run", f"--preset {preset}"]
    named = {"dataset": "--dataset", "methods": "--methods", "seed": "--seed", "seeds": "--seeds", "out": "--out", "name": "--name"}
    methods = meta.get("methods") or cfg.get("methods")
    if methods:
        parts.append(f"--methods {val(methods)}")
    for k in ("dataset", "seed", "seeds", "out", "name"):
        if k in cfg and cfg[k] != base.get(k) and cfg[k] not in ([], None):
            parts.append(f"{named[k]} {val(cfg[k])}")
    for k, v in sorted(cfg.items()):
        if k in named or k in ("preset", "quiet", "report") or k not in base or base[k] == v:
            continue
        parts.append(f"--set {k}={'none' if v is None else val(v)}")
    return " ".join(parts)


def header_blocks(run: RunData) -> list[Block]:
    """Title, the run's facts (dataset, preset, seeds, device, versions, commit) and its command."""
    m, cfg = run.meta, run.cfg
    data = m.get("data") or {}
    sizes = ", ".join(f"{k} {v}" for k, v in data.items() if isinstance(v, (int, float)))
    pk = m.get("packages") or {}
    facts = [("dataset", cfg.get("dataset")), ("preset", cfg.get("preset")), ("methods", ", ".join(run.methods)),
             ("seeds", ", ".join(map(str, run.seeds))), ("device", m.get("device_description") or m.get("device")),
             ("git commit", m.get("git_commit")), ("bench version", m.get("bench_version")),
             ("status", m.get("status")), ("data sizes", sizes or None),
             ("wall time (last invocation)", f"{m['wall_seconds']:.1f} s" if isinstance(m.get("wall_seconds"), (int, float)) else None),
             ("models trained", m.get("models_trained")), ("config digest", m.get("config_digest")),
             ("packages", ", ".join(f"{k} {v}" for k, v in pk.items()) or None)]
    t = Table("Run", ["", ""], [[Cell(k), Cell(str(v))] for k, v in facts if v not in (None, "")])
    return [Heading(f"bench report: {cfg.get('name', run.dir.name)}", 1), t,
            Para("Command that reproduces this run:"), Code(reproduce_command(m))]


def failure_blocks(run: RunData) -> list[Block]:
    f = run.meta.get("failures") or []
    if not f:
        return []
    out: list[Block] = [Heading("Failures")]
    out += [Para(f"`{x['method']}` (seed {x['seed']}) failed: {x['error']}") for x in f]
    return out


def results_blocks(run: RunData) -> list[Block]:
    """Per-seed tables; with several seeds, the across-seed summary first (seeds.csv, else computed)."""
    out: list[Block] = [Heading("Results")]
    if run.results.empty:
        return out + [Para("No results: every method failed (see Failures).")]
    level = float(run.cfg.get("ci_level", 0.95))
    if len(run.seeds) > 1:
        summ, src = run.seeds_csv, "seeds.csv"
        if summ is None or summ.empty:
            summ, src = seed_summary(run.results, level), "computed from results.csv"
        out += [Heading("Across seeds", 3),
                Para(f"Mean over {len(run.seeds)} seeds [Student-t {100 * level:g}% interval across seeds] ({src}); "
                     "**bold**: best mean per column.", note=True)]
        out += seeds_tables(summ, run.methods)
        out.append(Heading("Per seed", 3))
    out.append(Para(RESULTS_NOTE, note=True))
    for s in run.seeds:
        out += results_tables(run.results, s, run.methods)
    return out


def paired_blocks(run: RunData) -> list[Block]:
    out: list[Block] = [Heading(f"Paired differences vs {REFERENCE}")]
    if run.paired_csv is not None and not run.paired_csv.empty:
        out.append(Para("Method − reference on the same queries (paired.csv), with the bootstrap CI of the difference; "
                        "**bold**: the CI excludes 0.", note=True))
        return out + paired_tables(run.paired_csv, run.methods)
    if REFERENCE not in run.methods:
        return out + [Para(f"Not available: `{REFERENCE}` is not in this run.")]
    df = paired_differences(run.dir, REFERENCE)
    if df.empty:
        return out + [Para(f"Not available: no paired.csv and no other method with per-query vectors to pair with `{REFERENCE}`.")]
    out.append(Para("No paired.csv in this run: differences computed here from the per-query vectors, "
                    "method − reference over the same queries with a bootstrap CI resampling queries "
                    "(the same resample for both methods). **bold**: the CI excludes 0.", note=True))
    return out + paired_tables(df, run.methods)


def timing_blocks(run: RunData) -> list[Block]:
    t = timing_table(run.timings, run.methods)
    if t is None:
        return [Heading("Wall time"), Para("No timings recorded.")]
    return [Heading("Wall time"), t]


def _metric_map(run: RunData, metric: str, seed: int) -> dict[str, float]:
    r = run.results
    d = r[(r["seed"] == seed) & (r["metric"] == metric)]
    return dict(zip(d["method"], d["value"].astype(float)))


def figure_blocks(run: RunData) -> list[Block]:
    """Every figure, with a note for each one skipped (and why)."""
    out: list[Block] = [Heading("Figures")]
    methods, seed = run.methods, run.seeds[0]
    seed_note = f" (seed {seed})" if len(run.seeds) > 1 else ""
    pq = {m: a for m in methods if (a := run.perquery(m, seed)) is not None}
    missing = [m for m in methods if m not in pq]
    if missing:
        out.append(Para(f"No per-query arrays for {', '.join(missing)}{seed_note}: their embedding and uncertainty plots are skipped.", note=True))

    out.append(Heading("Embeddings", 3))
    names = run.class_names()
    for m, a in pq.items():
        if "id_mean" not in a:
            continue
        fig, note = P.embedding_figure(a, m, names, seed)
        out.append(_fig(f"embedding_{m}", fig, f"{m}{seed_note}: ID test embeddings coloured by class; OOD points as crosses. Axes: {note}."))

    out.append(Heading("Uncertainty of ID vs OOD queries", 3))
    for m, a in pq.items():
        fig = P.uncertainty_figure(a, m, seed)
        if fig is None:
            out.append(Para(f"`{m}`: no uncertainty (no variance), so no uncertainty plot.", note=True))
        else:
            out.append(_fig(f"uncertainty_{m}", fig, f"{m}{seed_note}: uncertainty (sum of the embedding variance over "
                            "dimensions) per query for ID and each OOD set; histograms; ROC of OOD detection by uncertainty."))

    panels = [("Reliability", "reliability", P.reliability_figure, "ECE", "extra_reliability_conf",
               "Reliability diagrams{}: precision@1 against confidence per equal-mass bin."),
              ("Sparsification", "sparsification", P.sparsification_figure, "AUSE", "extra_sparsification_curve",
               "Sparsification curves{}: solid by uncertainty, dashed oracle.")]
    for title, name, draw, metric, key, caption in panels:
        out.append(Heading(title, 3))
        fig = draw(pq, _metric_map(run, metric, seed))
        if fig is not None:
            out.append(_fig(name, fig, caption.format(seed_note)))
        missing = [m for m, a in pq.items() if key not in a]
        if missing:
            out.append(Para(f"No {name} data for {', '.join(missing)} (methods without uncertainty have none).", note=True))

    out.append(Heading("Retrieval against K", 3))
    summ, band = _at_k_summary(run)
    fig = P.at_k_figure(summ, methods, band)
    out.append(_fig("map_at_k", fig, f"mAP@K and Recall@K against K; band: {band}.") if fig is not None
               else Para("No @K metrics in results.csv.", note=True))

    out.append(Heading("Wall time", 3))
    fig = P.timing_figure(stage_frame(run.timings, methods))
    out.append(_fig("timing", fig, "Seconds per stage per method, summed over seeds; post-hoc methods share the base "
                    "training, counted once under \"base\".") if fig is not None else Para("No timings recorded.", note=True))
    return out


def _at_k_summary(run: RunData) -> tuple[pd.DataFrame, str]:
    """(method, metric, value, lo, hi) for the @K plot: the bootstrap CI of the single seed, or the
    mean and t-interval over seeds."""
    r = run.results
    if len(run.seeds) == 1:
        d = r[r["seed"] == run.seeds[0]]
        return d.rename(columns={"ci_low": "lo", "ci_high": "hi"})[["method", "metric", "value", "lo", "hi"]], \
            f"{int(100 * float(run.cfg.get('ci_level', 0.95)))}% bootstrap CI over queries"
    s = run.seeds_csv if run.seeds_csv is not None and not run.seeds_csv.empty else seed_summary(r)
    s = s.rename(columns={"mean": "value", "t_low": "lo", "t_high": "hi"})
    return s[["method", "metric", "value", "lo", "hi"]], f"t-interval over {len(run.seeds)} seeds"


def _fig(name: str, fig, caption: str) -> Figure:
    name = re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)
    return Figure(name, caption, P.png_bytes(fig))


def build_report(run: RunData) -> list[Block]:
    """The whole report as blocks."""
    return (header_blocks(run) + failure_blocks(run) + results_blocks(run) + paired_blocks(run)
            + timing_blocks(run) + figure_blocks(run))


# -------------------------------------------------------------------------------------- renderers

def _inline_md_to_html(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def _inline_md_to_latex(text: str) -> str:
    parts = re.split(r"(`[^`]+`|\*\*[^*]+\*\*)", text)
    out = []
    for p in parts:
        if p.startswith("`") and p.endswith("`") and len(p) > 1:
            out.append(r"\texttt{" + latex_escape(p[1:-1]) + "}")
        elif p.startswith("**") and p.endswith("**") and len(p) > 3:
            out.append(r"\textbf{" + latex_escape(p[2:-2]) + "}")
        else:
            out.append(latex_escape(p))
    return "".join(out)


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(f"_{b.text}_" if b.note and "_" not in b.text else b.text)
        elif isinstance(b, Code):
            out.append(f"```\n{b.text}\n```")
        elif isinstance(b, Table):
            if b.headers == ["", ""]:  # key/value facts
                out.append("\n".join(f"- **{r[0].text}**: {r[1].text}" for r in b.rows))
            else:
                out.append(f"**{b.title}**\n\n{b.to_markdown()}" + "".join(f"\n\n_{n}_" for n in b.notes))
        elif isinstance(b, Figure):
            out.append(f"![{b.caption}](plots/{b.name}.png)\n\n_{b.caption}_")
    return "\n\n".join(out) + "\n"


CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1500px;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.4em 0 1.2em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}caption{text-align:left;font-weight:600;padding:4px 0}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}.note{color:#555;font-size:13px}.wrap{overflow-x:auto}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#555;font-size:13px}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:14px}dl.facts dt{font-weight:600}dl.facts dd{margin:0}"""


def to_html(blocks: list[Block]) -> str:
    title = next((b.text for b in blocks if isinstance(b, Heading)), "bench report")
    out = ["<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p{' class=note' if b.note else ''}>{_inline_md_to_html(b.text)}</p>")
        elif isinstance(b, Code):
            out.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif isinstance(b, Table):
            if b.headers == ["", ""]:
                out.append("<dl class=facts>" + "".join(f"<dt>{html.escape(r[0].text)}</dt><dd>{html.escape(r[1].text)}</dd>"
                                                        for r in b.rows) + "</dl>")
            else:
                tab = b.to_html().replace("<table>", f"<table><caption>{html.escape(b.title)}</caption>", 1)
                out.append(f"<div class=wrap>{tab}</div>" + "".join(f"<p class=note>{_inline_md_to_html(n)}</p>" for n in b.notes))
        elif isinstance(b, Figure):
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(b.caption, quote=True)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def to_latex(blocks: list[Block]) -> str:
    out = [r"\documentclass[10pt]{article}", r"\usepackage[margin=2cm]{geometry}", r"\usepackage{booktabs,graphicx}",
           r"\usepackage[T1]{fontenc}", r"\usepackage[utf8]{inputenc}", r"\DeclareUnicodeCharacter{2212}{-}",
           r"\DeclareUnicodeCharacter{2013}{--}", r"\begin{document}"]
    for b in blocks:
        if isinstance(b, Heading):
            cmd = {1: "section*", 2: "subsection*", 3: "subsubsection*"}.get(b.level, "paragraph")
            out.append(f"\\{cmd}{{{latex_escape(b.text)}}}")
        elif isinstance(b, Para):
            out.append(_inline_md_to_latex(b.text) + "\n")
        elif isinstance(b, Code):
            out.append(r"\begin{verbatim}" + "\n" + b.text + "\n" + r"\end{verbatim}")
        elif isinstance(b, Table):
            if b.headers == ["", ""]:
                out.append(r"\begin{description}" + "".join(f"\n\\item[{latex_escape(r[0].text)}] {latex_escape(r[1].text)}"
                                                              for r in b.rows) + "\n" + r"\end{description}")
            else:
                out.append(b.to_latex() + "".join(f"\n{_inline_md_to_latex(n)}\n" for n in b.notes))
        elif isinstance(b, Figure):
            out.append(r"\begin{figure}[ht]\centering" + f"\n\\includegraphics[width=\\linewidth]{{plots/{b.name}.png}}\n"
                       f"\\caption{{{_inline_md_to_latex(b.caption)}}}\n" + r"\end{figure}")
    out.append(r"\end{document}")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------- public API

def print_summary(run_dir: str | Path) -> None:
    """Print the results tables (with several seeds: the mean and t-interval across seeds, then
    each seed's bootstrap CIs), the wall-time table and any failures."""
    run = load_run_data(run_dir)
    tables = []
    if run.results.empty:
        print("(no results)")
    else:
        if len(run.seeds) > 1:
            summ = run.seeds_csv if run.seeds_csv is not None and not run.seeds_csv.empty \
                else seed_summary(run.results, float(run.cfg.get("ci_level", 0.95)))
            tables += seeds_tables(summ, run.methods)
        for seed in run.seeds:
            tables += results_tables(run.results, seed, run.methods)
    for t in tables:
        print(t.title)
        print(t.to_text())
        print()
    t = timing_table(run.timings, run.methods)
    if t is not None:
        print(t.title)
        print(t.to_text())
    for f in run.meta.get("failures", []):
        print(f"FAILED {f['method']} (seed {f['seed']}): {f['error']}")


def render_report(run_dir: str | Path, formats: list[str]) -> list[Path]:
    """Write the report in each format (md -> report.md, html -> report.html with embedded images,
    latex -> report.tex) and its figures under plots/; returns the report files written, then the
    plots folder when it holds figures."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise BenchError(f"unknown report format {bad[0]!r}; known: {', '.join(FORMATS)}")
    run = load_run_data(run_dir)
    blocks = build_report(run)
    d = Path(run_dir)
    figs = [b for b in blocks if isinstance(b, Figure)]
    plots_dir = d / "plots"
    fig_paths = []
    for f in figs:
        atomic_write_bytes(plots_dir / f"{f.name}.png", f.png)
        fig_paths.append(plots_dir / f"{f.name}.png")
    if plots_dir.is_dir():  # figures of an earlier render that no longer exist (e.g. a method removed)
        for old in plots_dir.glob("*.png"):
            if old not in fig_paths:
                old.unlink(missing_ok=True)
    written = []
    writers = {"md": to_markdown, "html": to_html, "latex": to_latex}
    for fmt in dict.fromkeys(formats):
        path = d / FORMATS[fmt]
        atomic_write_text(path, writers[fmt](blocks))
        written.append(path)
    return written + ([plots_dir] if fig_paths else [])
