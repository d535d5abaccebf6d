"""The report of a run folder, assembled once as blocks from the folder alone (no model files, no
retraining) and written as markdown, HTML and LaTeX; the console summary reuses its result tables."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from bench.config import bootstrap_resamples
from bench.conventions import REFERENCE_METHOD as REFERENCE
from bench.errors import BenchError
from bench.metrics.aggregate import paired_differences
from bench.metrics.seed_interval import SEED_INTERVAL_NOTE
from bench.recipes import recipe_summary
from bench.run_folder import RunFolder
from reports import plots as P
from reports.findings import detail_blocks, findings, findings_blocks, summary_text
from reports.formats import (
    Block,
    Cell,
    Code,
    Figure,
    Heading,
    Para,
    Table,
    to_html,
    to_latex,
    to_markdown,
    to_text,
)
from reports.online_comparison import comparison_blocks as online_comparison_blocks
from reports.scores import score_blocks
from reports.seed_comparison import seed_comparison_blocks
from reports.selective import selective_blocks
from reports.sensitivity import sensitivity_blocks
from reports.tables import ci_level as _level
from reports.tables import paired_tables, stage_frame
from reports.tables import run_seed_summary as _seed_summary

WRITERS = {"md": to_markdown, "html": to_html, "latex": to_latex}


def reproduce_command(meta: dict) -> str:
    """The recorded command, or one rebuilt from the config: preset, dataset, methods, seeds, out, and
    `--set FIELD=VALUE` for every other field that differs from the preset or was set on purpose."""
    if meta.get("command"):
        return meta["command"]
    from bench.config import PRESETS, RunConfig, preset_config

    cfg = meta.get("config", {})
    preset = cfg.get("preset", "default")
    base = (preset_config(preset) if preset in PRESETS else RunConfig()).to_dict()
    val = lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    parts = ["python -m bench run", f"--preset {preset}"]
    named = {
        "dataset": "--dataset",
        "methods": "--methods",
        "seed": "--seed",
        "seeds": "--seeds",
        "out": "--out",
        "name": "--name",
    }
    methods = meta.get("methods") or cfg.get("methods")
    if methods:
        parts.append(f"--methods {val(methods)}")
    for k in ("dataset", "seed", "seeds", "out", "name"):
        if k in cfg and cfg[k] != base.get(k) and cfg[k] not in ([], None):
            parts.append(f"{named[k]} {val(cfg[k])}")
    # set on purpose beyond the preset (they beat the methods' recipes, even at the preset's value)
    on_purpose = set(cfg.get("explicit") or ()) - set(base.get("explicit") or ())
    for k, v in sorted(cfg.items()):
        if (
            k in named
            or k in ("preset", "quiet", "report", "method_options", "explicit")
            or k not in base
            or (base[k] == v and k not in on_purpose)
        ):
            continue
        parts.append(f"--set {k}={'none' if v is None else val(v)}")
    parts += [f"--set {k}={v}" for k, v in cfg.get("method_options") or []]
    return " ".join(parts)


def header_blocks(run: RunFolder) -> list[Block]:
    """Title, the run's facts (dataset, preset, seeds, device, versions, commit) and its command."""
    m, cfg = run.meta, run.config
    data = m.get("data") or {}
    sizes = ", ".join(f"{k} {v}" for k, v in data.items() if isinstance(v, (int, float)))
    pk = m.get("packages") or {}
    label = m.get("data_label")
    dataset = (
        cfg.get("dataset") if not label or label == cfg.get("dataset") else f"{cfg.get('dataset')} ({label})"
    )
    feats = m.get("features") or {}
    raw = (feats.get("raw_features") or {}).get("mAP@1")
    facts = [
        ("dataset", dataset),
        ("preset", cfg.get("preset")),
        ("methods", ", ".join(run.methods)),
        ("recipe", recipe_summary(m)),
        ("frozen trunk", feats.get("note")),
        ("raw trunk features, mAP@1", f"{raw[0]:.3f} [{raw[1]:.3f}, {raw[2]:.3f}]" if raw else None),
        ("seeds", ", ".join(map(str, run.seeds))),
        ("device", m.get("device_description") or m.get("device")),
        ("git commit", m.get("git_commit")),
        ("bench version", m.get("bench_version")),
        ("status", m.get("status")),
        ("data sizes", sizes or None),
        (
            "wall time (last invocation)",
            f"{m['wall_seconds']:.1f} s" if isinstance(m.get("wall_seconds"), (int, float)) else None,
        ),
        ("models trained", m.get("models_trained")),
        ("config digest", m.get("config_digest")),
        ("packages", ", ".join(f"{k} {v}" for k, v in pk.items()) or None),
    ]
    t = Table("Run", ["", ""], [[Cell(k), Cell(str(v))] for k, v in facts if v not in (None, "")])
    return [
        Heading(f"bench report: {cfg.get('name', run.path.name)}", 1),
        t,
        Para("Command that reproduces this run:"),
        Code(reproduce_command(m)),
    ]


def failure_blocks(run: RunFolder) -> list[Block]:
    f = run.meta.get("failures") or []
    if not f:
        return []
    out: list[Block] = [Heading("Failures")]
    out += [Para(f"`{x['method']}` (seed {x['seed']}) failed: {x['error']}") for x in f]
    return out


def paired_blocks(run: RunFolder) -> list[Block]:
    out: list[Block] = [Heading(f"Paired differences vs {REFERENCE}")]
    if run.paired is not None and not run.paired.empty:
        out.append(
            Para(
                "Method − reference on the same queries (paired.csv), "
                "with the bootstrap CI of the difference; **bold**: the CI excludes 0.",
                note=True,
            )
        )
        return out + paired_tables(run.paired, run.methods)
    if REFERENCE not in run.methods:
        return out + [Para(f"Not available: `{REFERENCE}` is not in this run.")]
    cfg = run.config
    df = paired_differences(
        run.all_perquery(), REFERENCE, bootstrap_resamples(cfg), _level(run), int(cfg.get("seed", 0))
    )
    if df.empty:
        return out + [
            Para(
                "Not available: no paired.csv and no other method with per-query vectors "
                f"to pair with `{REFERENCE}`."
            )
        ]
    out.append(
        Para(
            "No paired.csv in this run: differences computed here from the per-query vectors, "
            "method − reference over the same queries with a bootstrap CI resampling queries "
            "(the same resample for both methods). **bold**: the CI excludes 0.",
            note=True,
        )
    )
    return out + paired_tables(df, run.methods)


def _metric_map(run: RunFolder, metric: str, seed: int) -> dict[str, float]:
    r = run.results
    d = r[(r["seed"] == seed) & (r["metric"] == metric)]
    return dict(zip(d["method"], d["value"].astype(float)))


def figure_blocks(run: RunFolder) -> list[Block]:
    """Every figure, with a note for each one skipped (and why)."""
    out: list[Block] = [Heading("Figures")]
    methods, seed = run.methods, run.seeds[0]
    seed_note = f" (seed {seed})" if len(run.seeds) > 1 else ""
    pq = {m: a for m in methods if (a := run.perquery(m, seed)) is not None}
    missing = [m for m in methods if m not in pq]
    if missing:
        out.append(
            Para(
                f"No per-query arrays for {', '.join(missing)}{seed_note}: "
                "their embedding and uncertainty plots are skipped.",
                note=True,
            )
        )

    out += embedding_blocks(run, pq, seed, seed_note)

    out.append(Heading("Uncertainty of ID vs OOD queries", 3))
    for m, a in pq.items():
        fig = P.uncertainty_figure(a, m, seed)
        if fig is None:
            out.append(Para(f"`{m}`: no uncertainty (no variance), so no uncertainty plot.", note=True))
        else:
            out.append(
                _fig(
                    f"uncertainty_{m}",
                    fig,
                    f"{m}{seed_note}: uncertainty (sum of the embedding variance over "
                    "dimensions) per query for ID and each OOD set; histograms; "
                    "ROC of OOD detection by uncertainty.",
                )
            )

    panels = [
        (
            "Reliability",
            "reliability",
            P.reliability_figure,
            "ECE",
            "extra_reliability_conf",
            "Reliability diagrams{}: precision@1 against confidence per equal-mass bin.",
        ),
        (
            "Sparsification",
            "sparsification",
            P.sparsification_figure,
            "AUSE",
            "extra_sparsification_curve",
            "Sparsification curves{}: solid by uncertainty, dashed oracle.",
        ),
    ]
    for title, name, draw, metric, key, caption in panels:
        out.append(Heading(title, 3))
        fig = draw(pq, _metric_map(run, metric, seed))
        if fig is not None:
            out.append(_fig(name, fig, caption.format(seed_note)))
        missing = [m for m, a in pq.items() if key not in a]
        if missing:
            out.append(
                Para(
                    f"No {name} data for {', '.join(missing)} (methods without uncertainty have none).",
                    note=True,
                )
            )

    out.append(Heading("Retrieval against K", 3))
    summ, band = _at_k_summary(run)
    fig = P.at_k_figure(summ, methods, band)
    out.append(
        _fig("map_at_k", fig, f"mAP@K and Recall@K against K; band: {band}.")
        if fig is not None
        else Para("No @K metrics in results.csv.", note=True)
    )

    out.append(Heading("Wall time", 3))
    fig = P.timing_figure(stage_frame(run.timings, methods))
    out.append(
        _fig(
            "timing",
            fig,
            "Seconds per stage per method, summed over seeds; post-hoc methods share the base "
            'training, counted once under "base".',
        )
        if fig is not None
        else Para("No timings recorded.", note=True)
    )
    return out


def distinct_means(pq: dict[str, dict[str, np.ndarray]]) -> list[list[str]]:
    """Methods grouped by identical ID and OOD mean embeddings (post-hoc methods share the base model's
    mean), in method order."""
    groups: list[list[str]] = []
    for m, a in pq.items():
        if "id_mean" not in a:
            continue
        for g in groups:
            b = pq[g[0]]
            if all(k in b and np.array_equal(a[k], b[k]) for k in a if k.endswith("_mean")):
                g.append(m)
                break
        else:
            groups.append([m])
    return groups


def embedding_blocks(
    run: RunFolder, pq: dict[str, dict[str, np.ndarray]], seed: int, seed_note: str
) -> list[Block]:
    """One figure per distinct mean embedding, ID and OOD together, each method sharing it shown as a
    panel coloured by its OOD score (the seed paper's Fig. 3)."""
    from reports.criteria import _score

    score = run.config.get("ood_score")
    out: list[Block] = [Heading("Embeddings and their uncertainty", 3)]
    names = run.class_names()
    for group in distinct_means(pq):
        a = pq[group[0]]
        sets = ["id", *P.ood_sets(a)]
        scores = {m: {s: v for s in sets if (v := _score(pq[m], s, score)) is not None} for m in group}
        scores = {m: v for m, v in scores.items() if "id" in v}
        title = ", ".join(group) if len(group) <= 4 else f"{group[0]} and {len(group) - 1} post-hoc methods"
        fig, note = P.uncertainty_embedding_figure(
            a, scores, f"Mean embedding of {title}{seed_note}", names, score or "uncertainty"
        )
        shared = f"shared by {', '.join(group)}; " if len(group) > 1 else ""
        out.append(
            _fig(
                f"embedding_{group[0]}",
                fig,
                f"Mean embedding of {group[0]} ({shared}axes: {note}). "
                "First panel by class, OOD as crosses; then per method each point coloured and sized "
                "by its "
                f"uncertainty ({score or 'trace'}) percentile, ID (o) and OOD (x) together.",
                dpi=80,
            )
        )
    return out


def _at_k_summary(run: RunFolder) -> tuple[pd.DataFrame, str]:
    """(method, metric, value, lo, hi) for the @K plot: the bootstrap CI of the single seed, or the
    mean and its interval across seeds (`bench.metrics.seed_interval`; none below 3 seeds)."""
    r = run.results
    if len(run.seeds) == 1:
        d = r[r["seed"] == run.seeds[0]]
        return d.rename(columns={"ci_low": "lo", "ci_high": "hi"})[
            ["method", "metric", "value", "lo", "hi"]
        ], f"{int(100 * _level(run))}% bootstrap CI over queries"
    s = _seed_summary(run)[0].rename(columns={"mean": "value", "t_low": "lo", "t_high": "hi"})
    return s[
        ["method", "metric", "value", "lo", "hi"]
    ], f"interval across {len(run.seeds)} seeds ({SEED_INTERVAL_NOTE})"


def _fig(name: str, fig, caption: str, dpi: int = 90) -> Figure:
    name = re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)
    return Figure(name, caption, P.png_bytes(fig, dpi=dpi))


def build_report(run: RunFolder) -> list[Block]:
    """The whole report as blocks: the title, Findings first, then the details per criterion, the
    figures, the uncertainty-score analysis, the comparisons, and the run's facts and command."""
    fs = findings(run)
    return (
        [title_block(run)]
        + findings_blocks(run, fs)
        + failure_blocks(run)
        + detail_blocks(run, fs)
        + figure_blocks(run)
        + score_blocks(run)
        + selective_blocks(run)
        + seed_comparison_blocks(run)
        + paired_blocks(run)
        + online_comparison_blocks(run)
        + sensitivity_blocks(run)
        + [Heading("Run")]
        + header_blocks(run)[1:]
    )


def title_block(run: RunFolder) -> Heading:
    return Heading(f"bench report: {run.config.get('name', run.path.name)}", 1)


def summary(run_dir: str | Path, report: str | Path | None = None) -> str:
    """The terminal summary after a run: one table of at most 100 columns and the report's path
    (relative to the working directory when it lies under it)."""
    from reports.findings import display_path

    return summary_text(RunFolder(run_dir), None if report is None else display_path(report))


def print_summary(run_dir: str | Path, report: str | Path | None = None) -> None:
    """Print `summary()`."""
    print(summary(run_dir, report), end="")


def full_text(run_dir: str | Path) -> str:
    """Every table of the report as console text (`bench report RUN --format text`)."""
    return to_text(build_report(RunFolder(run_dir)))


def render_report(run_dir: str | Path, formats: list[str]) -> list[Path]:
    """Write the report in each format (md, html with embedded images, latex) and its figures under
    the run folder; returns the report files written, then the plots folder when it holds figures."""
    bad = [f for f in formats if f not in WRITERS]
    if bad:
        raise BenchError(f"unknown report format {bad[0]!r}; known: {', '.join(WRITERS)}")
    run = RunFolder(run_dir)
    blocks = build_report(run)
    figures = {b.name: b.png for b in blocks if isinstance(b, Figure)}
    return run.write_report({fmt: WRITERS[fmt](blocks) for fmt in dict.fromkeys(formats)}, figures)
