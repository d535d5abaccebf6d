"""The report's opening section, "Findings": per criterion (reports/criteria.py) the best method with
its interval, the methods not significantly different from it (paired bootstrap over the same
queries), one plain-language sentence; a quality-against-cost plot with the Pareto front; a method x
criterion rank heat-map. Then the detail tables, one per criterion, and the terminal summary."""

from __future__ import annotations

import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from bench.metrics.seed_interval import MIN_SEEDS, SEED_INTERVAL_NOTE
from bench.parallel import cpu_count
from bench.recipes import recipe_summary
from bench.run_folder import RunFolder
from reports import plots as P
from reports.criteria import COST, Criterion, criteria, criterion_values, paired_difference
from reports.formats import Block, Cell, Figure, Heading, Para, Table
from reports.tables import MAX_COLUMNS as MAX_DETAIL_COLUMNS  # metric columns per detail table
from reports.tables import ci_level, column_chunks, fmt_ci, header, ordered, wide_cells


@dataclass
class Finding:
    """The verdict on one criterion: values per method, the best, those tied with it, those worse,
    those without a value, and how ties were decided."""

    criterion: Criterion
    values: pd.DataFrame  # method, value, lo, hi
    best: str | None  # the first of `co_best`
    co_best: list[str]  # every method with the best value (e.g. post-hoc methods sharing plain's mean)
    tied: list[str]
    worse: list[str]
    missing: list[str]
    untested: list[str]  # no paired arrays (or no paired test for this criterion)
    run_results: pd.DataFrame | None = None  # results.csv, for a companion metric's value


def decide(run: RunFolder, c: Criterion, n_resamples: int | None = None) -> Finding:
    """Best method by the point value; each other method is tied with it when the paired bootstrap CI
    of their difference contains 0, worse when it excludes 0, untested when no paired test applies."""
    vals = criterion_values(run, c)
    have = vals[np.isfinite(vals["value"])]
    missing = [m for m in vals["method"] if m not in set(have["method"])]
    if have.empty:
        return Finding(c, vals, None, [], [], [], missing, [])
    top = have["value"].max() if c.higher else have["value"].min()
    co_best = [
        str(m) for m, v in zip(have["method"], have["value"]) if np.isclose(v, top, rtol=1e-12, atol=1e-12)
    ]
    best = co_best[0]
    n = int(n_resamples or min(int(run.config.get("bootstrap_resamples", 1000)), 1000))
    tied, worse, untested = [], [], []
    for m in have["method"]:
        if m in co_best:
            continue
        d, lo, hi = paired_difference(run, c, m, best, n, ci_level(run), int(run.config.get("seed", 0)))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            untested.append(m)
        elif lo <= 0 <= hi:
            tied.append(m)
        else:
            worse.append(m)
    return Finding(c, vals, best, co_best, tied, worse, missing, untested, run.results)


def findings(run: RunFolder, n_resamples: int | None = None) -> list[Finding]:
    """One finding per criterion of the run (none when the run has no results), the criteria decided in
    threads over the cores (their bootstraps are numpy array passes, which release the GIL; each is
    seeded, so the outcome does not depend on the order)."""
    if run.results.empty:
        return []
    cs = criteria(run)
    with ThreadPoolExecutor(max_workers=max(1, min(cpu_count(), len(cs)))) as pool:
        return list(pool.map(lambda c: decide(run, c, n_resamples), cs))


def _fmt(c: Criterion, row: pd.Series) -> str:
    if c.metric == COST:
        return fmt_ci(row["value"], row["lo"], row["hi"], digits=1) + " s"
    return fmt_ci(row["value"], row["lo"], row["hi"])


def _names(ms: list[str]) -> str:
    return ", ".join(f"`{m}`" for m in ms)


def _companion(f: Finding) -> str | None:
    """`AURG 0.081 [0.070, 0.093]` of the best method, for a criterion with a companion metric."""
    c = f.criterion
    r = f.run_results
    if r is None or f.best is None:
        return None
    d = r[(r["metric"] == c.companion) & (r["method"] == f.best)]
    if d.empty or not np.isfinite(d["value"].astype(float)).any():
        return None
    v = d["value"].astype(float)
    if len(d) == 1:
        return f"{c.companion} {fmt_ci(v.iloc[0], d['ci_low'].iloc[0], d['ci_high'].iloc[0])}"
    return f"{c.companion} {v.mean():.3f} (mean over seeds)"


def sentence(f: Finding) -> str:
    """One plain-language sentence (two at most) answering the criterion's question."""
    c = f.criterion
    if f.best is None:
        return f"{c.question} No method has a value."
    v = f.values.set_index("method")
    row = v.loc[f.best]
    what = "" if c.metric == COST else f"{c.metric} "
    s = f"{c.question} **{', '.join(f.co_best)}** ({what}{_fmt(c, row)}" + (
        ", the same value: they share one model)" if len(f.co_best) > 1 else ")"
    )
    if c.companion:
        comp = _companion(f)
        if comp:
            s += f", {comp}"
    if c.paired is None:
        rest = v.drop(index=f.co_best).dropna(subset=["value"]).sort_values("value", ascending=not c.higher)
        nxt = ", ".join(f"`{m}` {_fmt(c, r)}" for m, r in rest.head(3).iterrows())
        return s + (f"; next: {nxt}" if nxt else "") + " (one measurement each: no significance test)."
    if f.tied:
        s += f"; not significantly different: {_names(f.tied)}"
    if f.worse:
        s += (
            f"; {len(f.worse)} other method{'s' if len(f.worse) > 1 else ''} significantly "
            f"{'worse' if c.metric != COST else 'slower'}"
        )
    if f.untested:
        s += f"; not tested (no paired per-query data): {_names(f.untested)}"
    s += "."
    if f.missing:
        s += f" No value for {_names(f.missing)}" + (" (no uncertainty)." if c.metric != "mAP@1" else ".")
    return s


def findings_table(fs: list[Finding]) -> Table:
    rows = []
    for f in fs:
        if f.best is None:
            continue
        row = f.values.set_index("method").loc[f.best]
        label = "seconds" if f.criterion.metric == COST else header(f.criterion.metric)
        rows.append(
            [
                Cell(f.criterion.title),
                Cell(label),
                Cell(", ".join(f.co_best), True),
                Cell(_fmt(f.criterion, row)),
                Cell(", ".join(f.tied) or "none" if f.criterion.paired else "(no paired test)"),
            ]
        )
    return Table(
        "Best method per criterion",
        ["criterion", "metric", "best", "value [interval]", "not significantly different"],
        rows,
        wrap=True,
    )


def ranks(fs: list[Finding], methods: list[str]) -> pd.DataFrame:
    """Methods x criteria: the rank of each method (1 = best, ties share the mean rank), NaN where a
    method has no value."""
    cols = {}
    for f in fs:
        v = f.values.set_index("method")["value"].reindex(methods)
        cols[f.criterion.title] = (-v if f.criterion.higher else v).rank(method="average")
    return pd.DataFrame(cols, index=methods)


def pareto_front(cost: np.ndarray, quality: np.ndarray, higher: bool = True) -> np.ndarray:
    """Indices of the points no other point dominates (cheaper-or-equal and better-or-equal, one of
    them strictly), ordered by cost."""
    q = np.asarray(quality, float) * (1 if higher else -1)
    c = np.asarray(cost, float)
    ok = np.flatnonzero(np.isfinite(c) & np.isfinite(q))
    front = []
    for i in ok:
        dominated = any(
            (c[j] <= c[i]) and (q[j] >= q[i]) and ((c[j] < c[i]) or (q[j] > q[i])) for j in ok if j != i
        )
        if not dominated:
            front.append(i)
    return np.array(sorted(front, key=lambda i: (c[i], -q[i])), dtype=int)


def findings_blocks(run: RunFolder, fs: list[Finding] | None = None) -> list[Block]:
    """The Findings section: the verdict table, one sentence per criterion, the cost plot and the
    rank heat-map."""
    fs = findings(run) if fs is None else fs
    out: list[Block] = [Heading("Findings")]
    if run.results.empty:
        return out + [Para("No results: every method failed (see Failures).")]
    seeds = run.seeds
    how = (
        f"paired bootstrap over the same queries, {100 * ci_level(run):g}%"
        if len(seeds) == 1
        else f"paired bootstrap over the same queries, the difference averaged over {len(seeds)} seeds"
    )
    out.append(
        Para(
            f"Best method per criterion by its value; methods whose difference from the best has a "
            f"CI containing 0 ({how}) are not significantly different. Intervals: "
            + (
                "bootstrap CI over queries."
                if len(seeds) == 1
                else f"mean over {len(seeds)} seeds, {SEED_INTERVAL_NOTE}."
                + (
                    f" Only {len(seeds)} seeds here: too few for an interval across seeds, none is shown."
                    if len(seeds) < MIN_SEEDS
                    else ""
                )
            ),
            note=True,
        )
    )
    out.append(findings_table(fs))
    out += [Para(f"**{f.criterion.title}.** {sentence(f)}") for f in fs]
    cost = next((f for f in fs if f.criterion.metric == COST), None)
    quality = [f for f in fs if f.criterion.metric != COST and f.best is not None]
    if cost is not None and cost.best is not None and quality:
        fig = quality_cost_figure(cost, quality)
        out.append(
            Figure(
                "findings_cost",
                "Quality against wall time (log scale; post-hoc methods include the "
                "base training). Line: the Pareto front (no method is both cheaper and better).",
                P.png_bytes(fig, dpi=90),
            )
        )
    rk = ranks(fs, run.methods)
    if rk.shape[1] >= 2 and len(run.methods) >= 2:
        out.append(
            Figure(
                "findings_ranks",
                "Rank of each method per criterion (1 = best; blank: no value).",
                P.png_bytes(rank_heatmap(rk), dpi=90),
            )
        )
    return out


def point_style(i: int) -> dict:
    """Colour and marker of the i-th method in a scatter: the colour cycles every 8 methods and the
    marker shifts by 3 each cycle, so no two of up to 64 methods look alike."""
    st = P.method_style(i)
    return {"color": st["color"], "marker": P.METHOD_MARKERS[(i + 3 * (i // 8)) % len(P.METHOD_MARKERS)]}


def quality_cost_figure(cost: Finding, quality: list[Finding]):
    """One panel per quality criterion: value (with interval) against seconds, the Pareto front drawn.
    Each method keeps its style in every panel (its index in the run's method order), one legend."""
    fig, axes = P._grid(len(quality), width=3.6, height=3.2, max_cols=3)
    secs = cost.values.set_index("method")["value"]
    order = list(cost.values["method"])
    handles: dict[str, object] = {}
    for ax, f in zip(axes, quality):
        v = f.values.set_index("method")
        ms = [m for m in v.index if np.isfinite(v.loc[m, "value"]) and np.isfinite(secs.get(m, np.nan))]
        x = np.array([secs[m] for m in ms])
        y = v.loc[ms, "value"].to_numpy(float)
        for i, m in enumerate(ms):
            st = point_style(order.index(m) if m in order else len(order) + i)
            err = np.array([[y[i] - v.loc[m, "lo"]], [v.loc[m, "hi"] - y[i]]])
            yerr = None if not np.isfinite(err).all() else np.abs(err)
            h = ax.errorbar(
                x[i], y[i], yerr=yerr, fmt=st["marker"], color=st["color"], ms=5, capsize=2, label=m
            )
            handles.setdefault(m, h)
        front = pareto_front(x, y, f.criterion.higher)
        if len(front):
            ax.plot(x[front], y[front], "-", color="#555", lw=1, zorder=0)
        ax.set_xscale("log")
        ax.set_xlabel("seconds")
        ax.set_title(f"{f.criterion.title}\n{header(f.criterion.metric)}", fontsize=9)
        ax.grid(alpha=0.3)
    labels = [m for m in order if m in handles] + [m for m in handles if m not in order]
    fig.legend(
        [handles[m] for m in labels],
        labels,
        loc="lower center",
        ncol=min(len(labels), 6),
        fontsize=7,
        frameon=False,
    )
    fig.subplots_adjust(bottom=0.22 if len(quality) <= 3 else 0.14)
    return fig


def rank_heatmap(rk: pd.DataFrame):
    """Methods (rows) x criteria (columns) coloured by rank, the rank written in each cell."""
    from matplotlib.figure import Figure as MplFigure

    h = 0.3 * len(rk) + 1.6
    fig = MplFigure(figsize=(1.0 * rk.shape[1] + 2.2, h))
    fig.subplots_adjust(left=1.6 / (1.0 * rk.shape[1] + 2.2), right=0.98, top=1 - 1.1 / h, bottom=0.05)
    ax = fig.add_subplot()
    data = np.ma.masked_invalid(rk.to_numpy(float))
    ax.imshow(data, cmap="viridis_r", aspect="auto", vmin=1, vmax=max(len(rk), 2))
    for (i, j), v in np.ndenumerate(rk.to_numpy(float)):
        if np.isfinite(v):
            ax.text(
                j,
                i,
                f"{v:g}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if v <= len(rk) / 2 else "white",
            )
    ax.set_yticks(range(len(rk)), rk.index, fontsize=8)
    ax.set_xticks(
        range(rk.shape[1]), [t.replace(" (", "\n(") for t in rk.columns], fontsize=7, rotation=30, ha="left"
    )
    ax.xaxis.tick_top()
    return fig


def detail_blocks(run: RunFolder, fs: list[Finding] | None = None) -> list[Block]:
    """One table per criterion with its supporting metrics (at most MAX_DETAIL_COLUMNS metric columns
    each; more are split into further tables), then the headline metrics no criterion shows (a new
    metric appears there until a criterion claims it), then, with several seeds, every seed's tables."""
    from reports.tables import RESULTS_NOTE, metric_groups, results_tables, timing_table

    fs = findings(run) if fs is None else fs
    out: list[Block] = [Heading("Details per criterion")]
    r = run.results
    if r.empty:
        return out + [Para("No results.")]
    out.append(
        Para(
            RESULTS_NOTE
            if len(run.seeds) == 1
            else f"Cells: mean over {len(run.seeds)} seeds [{100 * ci_level(run):g}% {SEED_INTERVAL_NOTE}]"
            + (
                f" (only {len(run.seeds)} seeds here: too few, no interval across seeds)"
                if len(run.seeds) < MIN_SEEDS
                else ""
            )
            + "; **bold**: best per column. Each seed's bootstrap intervals: the per-seed tables below.",
            note=True,
        )
    )
    all_metrics = ordered(r["metric"])
    shown: set[str] = set()
    for f in fs:
        c = f.criterion
        out.append(Heading(c.title, 3))
        if c.metric == COST:
            t = timing_table(run.timings, run.methods, run.post_hoc_methods())
            out += [t] if t is not None else [Para("No timings recorded.", note=True)]
            continue
        metrics = detail_metrics(c, all_metrics)
        shown |= set(metrics)
        out += metric_tables(run, metrics, c.title)
    rest = [m for _, ms in metric_groups(all_metrics) for m in ms if m not in shown]
    if rest:
        out += [Heading("Other metrics", 3)] + metric_tables(run, rest, "Other metrics")
    if len(run.seeds) > 1:
        out.append(Heading("Per seed", 3))
        for s in run.seeds:
            out += results_tables(r, s, run.methods)
    return out


def detail_metrics(c: Criterion, metrics: list[str]) -> list[str]:
    """The criterion's metric, then the metrics of results.csv its detail table shows: those starting
    with one of `c.detail`, of the same uncertainty score (headline names with headline names)."""
    from bench.conventions import split_score_metric

    want = split_score_metric(c.metric)[1]
    out = [
        m
        for m in metrics
        if m == c.metric
        or (split_score_metric(m)[1] == want and split_score_metric(m)[0].startswith(c.detail))
    ]
    return ordered(out, [c.metric])


def metric_tables(run: RunFolder, metrics: list[str], title: str) -> list[Table]:
    """Methods x metrics tables, at most MAX_DETAIL_COLUMNS metrics each: one seed, `value [CI]` of that
    seed (titled `(seed k)`); several, the mean [interval across seeds] over seeds."""
    from reports.tables import run_seed_summary

    if not metrics:
        return []
    r = run.results
    multi = len(run.seeds) > 1
    if multi:
        df, value, lo, hi = run_seed_summary(run)[0], "mean", "t_low", "t_high"
    else:
        df, value, lo, hi = r[r["seed"] == run.seeds[0]], "value", "ci_low", "ci_high"
    rows = ordered(df[df["metric"].isin(metrics)]["method"], run.methods)
    suffix = " (mean over seeds)" if multi else f" (seed {run.seeds[0]})"
    return [
        Table(
            f"{title}{part}{suffix}",
            ["method", *map(header, chunk)],
            wide_cells(df, "method", chunk, rows, value=value, lo=lo, hi=hi),
        )
        for part, chunk in column_chunks(metrics, MAX_DETAIL_COLUMNS)
    ]


# ---- terminal summary ---------------------------------------------------------------------------

SUMMARY_WIDTH = 100


def _seconds(v: float) -> str:
    """3 significant digits below 1000 s, whole seconds above (no exponent in a terminal table)."""
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def summary_table(methods: list[str], crits: list[Criterion], vals: dict[str, pd.Series]) -> str:
    """Methods x criteria as plain text within SUMMARY_WIDTH columns (criteria that would not fit are
    left out): the value only, `*` on the best of each column; `vals`: criterion key -> value per method."""
    best: dict[str, set[str]] = {}
    for c in crits:
        v = vals[c.key].dropna()
        if len(v) >= 2:
            top = v.max() if c.higher else v.min()
            best[c.key] = set(v.index[np.isclose(v, top, rtol=1e-12, atol=1e-12)])
    name_w = max(8, min(20, max((len(m) for m in methods), default=8)))
    cols, width = [], name_w
    for c in crits:  # keep columns while the table fits
        w = max(len(c.label), 8) + 2
        if width + w > SUMMARY_WIDTH:
            break
        cols.append(c)
        width += w
    rows = []
    for m in methods:
        row = [m[:name_w]]
        for c in cols:
            v = vals[c.key].get(m, np.nan)
            txt = "n/a" if not np.isfinite(v) else (_seconds(v) if c.metric == COST else f"{v:.3f}")
            row.append(txt + ("*" if m in best.get(c.key, ()) else ""))
        rows.append(row)
    return tabulate(
        rows,
        headers=["method", *[c.label for c in cols]],
        tablefmt="simple",
        disable_numparse=True,
        colalign=("left", *["right"] * len(cols)),
    )


def display_path(path: str | Path) -> str:
    """`path` relative to the working directory when it lies under it (short terminal lines), else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


SUMMARY_NOTE = "* best per column (ECE, seconds: lowest; others: highest). Intervals, tests: report."


def summary_text(run: RunFolder, report: str | None = None) -> str:
    """One table, at most SUMMARY_WIDTH columns: a row per method, a column per criterion (value
    only; the best in each column marked *), any failures, then where the full report is."""
    crits = criteria(run) if not run.results.empty else []
    vals = {c.key: criterion_values(run, c).set_index("method")["value"] for c in crits}
    seeds = f"Mean over {len(run.seeds)} seeds. " if len(run.seeds) > 1 else ""
    lines = [summary_table(run.methods, crits, vals), seeds + SUMMARY_NOTE]
    recipe = recipe_summary(run.meta)
    if recipe:
        lines += textwrap.wrap(f"Recipe {recipe}.", SUMMARY_WIDTH)
    for f in run.meta.get("failures", []):
        lines.append(f"FAILED {f['method']} (seed {f['seed']}): {f['error']}"[:SUMMARY_WIDTH])
    if report:
        lines.append(f"report: {report}")
    return "\n".join(lines) + "\n"
