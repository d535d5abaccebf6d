"""The report of a grid folder: per dataset (per preset / dataset in a grid over several presets) the
method table across seeds, mean ranks, how often each pairwise difference is significant (paired
bootstrap per seed, Wilcoxon across seeds) and cost vs quality; first, the findings across all
(preset / dataset, seed) blocks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure
from scipy import stats

from bench.config import bootstrap_resamples
from bench.conventions import BASE_METHOD as BASE
from bench.conventions import NEAR_OOD_SET, STAGES, split_score_metric
from bench.errors import BenchError
from bench.metrics.aggregate import paired_differences, seed_summary
from bench.metrics.seed_interval import MIN_SEEDS, SEED_INTERVAL_NOTE
from bench.run_folder import GridFolder
from reports import plots as P
from reports.formats import Block, Cell, Code, Figure, Heading, Para, Table, to_text
from reports.render import WRITERS
from reports.tables import base_metric, direction, header, ordered, seeds_tables

HEADLINE = ("mAP@1", "ECE", "AUSE")  # plus AUROC and FPR95 of every OOD set (Recall@1 equals mAP@1)
PAIRWISE_COLUMNS = [
    "dataset",
    "metric",
    "a",
    "b",
    "n_seeds",
    "mean_diff",
    "a_better",
    "b_better",
    "wilcoxon_p",
]


def headline(metrics) -> list[str]:
    """The metrics ranked and tested pairwise: mAP@1, ECE, AUSE, AUROC[s], FPR95[s] (the default
    scores'; per-score metrics such as `AUROC[s]:trace` are not headline)."""
    return [
        m
        for m in ordered(metrics)
        if split_score_metric(m)[1] is None and (m in HEADLINE or base_metric(m) in ("AUROC", "FPR95"))
    ]


def variant_names(grid: GridFolder) -> dict[str, str]:
    """Cell -> the row label of its method: the method, plus its axis values when the grid has axes."""
    axes = grid.meta.get("axes") or {}
    out = {}
    for cid, c in grid.meta["cells"].items():
        point = ", ".join(f"{k}={_show(c['point'].get(k))}" for k in axes)
        out[cid] = c["method"] + (f" [{point}]" if point else "")
    return out


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _level(grid: GridFolder) -> float:
    return float(grid.meta.get("base_config", {}).get("ci_level", 0.95))


def cell_group(grid: GridFolder, cell: dict) -> str:
    """The report group of a grid.json cell: its dataset, or `preset / dataset` over several presets."""
    return f"{cell['preset']} / {cell['dataset']}" if "base_configs" in grid.meta else cell["dataset"]


def groups(grid: GridFolder) -> list[str]:
    """The report's groups in the order of the grid's spec (one section each)."""
    spec = grid.meta.get("spec", {})
    if spec.get("presets"):  # several presets: one dataset each, in the same order
        return [f"{p} / {d}" for p, d in zip(spec["presets"], spec["datasets"])]
    return list(spec.get("datasets", [])) or sorted(
        {cell_group(grid, c) for c in grid.meta["cells"].values()}
    )


def with_groups(df: pd.DataFrame) -> pd.DataFrame:
    """A merged table with its `group` column: `preset / dataset` when it has presets, else dataset."""
    if df.empty:
        return df.assign(group=pd.Series(dtype=str))
    g = df["preset"].astype(str) + " / " + df["dataset"].astype(str) if "preset" in df else df["dataset"]
    return df.assign(group=g)


def header_blocks(grid: GridFolder) -> list[Block]:
    m, spec = grid.meta, grid.meta.get("spec", {})
    cells = m["cells"]
    status = pd.Series([c["status"] for c in cells.values()]).value_counts().to_dict()
    last = (m.get("invocations") or [{}])[-1]
    facts = [
        ("presets" if spec.get("presets") else "preset", spec.get("preset")),
        ("datasets", ", ".join(spec.get("datasets", []))),
        ("methods", ", ".join(dict.fromkeys(c["method"] for c in cells.values()))),
        ("seeds", ", ".join(map(str, spec.get("seeds", [])))),
        ("axes", "; ".join(f"{k} = {' | '.join(v)}" for k, v in (m.get("axes") or {}).items()) or "none"),
        ("cells", f"{len(cells)} ({', '.join(f'{v} {k}' for k, v in status.items())})"),
        ("status", m.get("status")),
        ("created", m.get("created")),
        ("git commit", m.get("git_commit")),
        ("bench version", m.get("bench_version")),
        ("invocations", len(m.get("invocations", []))),
        (
            "last invocation",
            ", ".join(
                f"{k} {last[k]}"
                for k in ("executor", "jobs", "nodes", "wall_seconds")
                if last.get(k) is not None
            )
            or None,
        ),
        ("packages", ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items()) or None),
    ]
    t = Table("Grid", ["", ""], [[Cell(k), Cell(str(v))] for k, v in facts if v not in (None, "")])
    cmds = [m["command"]] if m.get("command") else []
    return [
        Heading(f"bench grid report: {grid.path.name}", 1),
        t,
        Para("Commands: the grid as created, and how to finish it (reruns failed or missing cells only):"),
        Code("\n".join(cmds + [f"python -m bench grid --resume {grid.path}"])),
    ]


def failure_blocks(grid: GridFolder) -> list[Block]:
    bad = [(cid, c) for cid, c in grid.meta["cells"].items() if c["status"] != "done"]
    if not bad:
        return []
    rows = [
        [
            Cell(cid),
            Cell(c["status"]),
            Cell(str(c.get("error") or "").splitlines()[0] if c.get("error") else ""),
        ]
        for cid, c in bad
    ]
    return [
        Heading("Unfinished cells"),
        Table(
            "Cells not done",
            ["cell", "status", "error"],
            rows,
            ["Tracebacks are in grid.json; `bench grid --resume` reruns these cells."],
        ),
    ]


def rank_table(res: pd.DataFrame, variants: list[str], metrics: list[str]) -> Table | None:
    """Mean rank over seeds (1 = best; ties share the average rank) of each variant per metric, among
    the variants that have the metric on that seed."""
    ranks = []
    for (metric, _seed), g in res[res["metric"].isin(metrics)].groupby(["metric", "seed"], sort=False):
        g = g[np.isfinite(g["value"].to_numpy(float))]
        if len(g) >= 2:
            r = stats.rankdata(-direction(metric) * g["value"].to_numpy(float), method="average")
            ranks += [{"variant": v, "metric": metric, "rank": x} for v, x in zip(g["variant"], r)]
    if not ranks:
        return None
    mean = pd.DataFrame(ranks).groupby(["variant", "metric"])["rank"].mean()
    cols = [m for m in metrics if m in mean.index.get_level_values("metric")]
    best = {m: mean.xs(m, level="metric").min() for m in cols}
    rows = []
    for v in variants:
        vals = {m: mean.get((v, m), math.nan) for m in cols}
        rows.append(
            [Cell(v)]
            + [
                Cell("n/a" if math.isnan(x) else f"{x:.2f}", not math.isnan(x) and x == best[m])
                for m, x in vals.items()
            ]
        )
    return Table(
        "Mean rank over seeds (1 = best)",
        ["method", *map(header, cols)],
        rows,
        [
            "Ranked per seed among the methods that have the metric (n/a: no uncertainty), then averaged; "
            "**bold**: the best mean rank."
        ],
    )


def pairwise_frame(
    grid: GridFolder,
    dataset: str,
    res: pd.DataFrame,
    variants: list[str],
    metrics: list[str],
    cells: dict[str, str],
) -> pd.DataFrame:
    """Every pair (a, b) of variants per metric: seeds both ran (n_seeds), mean of value(a) - value(b)
    over seeds, seeds on which a (b) is significantly better (the paired bootstrap CI of the difference
    over the same queries excludes 0), and the Wilcoxon signed-rank p-value of the per-seed differences."""
    cfg = grid.meta.get("base_config", {})
    pq = {}
    for cid, v in cells.items():
        c = grid.meta["cells"][cid]
        run = grid.cell_run(cid) if cell_group(grid, c) == dataset else None
        if run is not None and (a := run.perquery(c["method"], int(c["seed"]))) is not None:
            pq[(v, int(c["seed"]))] = a
    boot = []
    for i, ref in enumerate(variants):
        sub = {k: a for k, a in pq.items() if k[0] in variants[i:]}
        boot.append(
            paired_differences(
                sub, ref, bootstrap_resamples(cfg), _level(grid), int(cfg.get("seed", 0)), metrics
            )
        )
    boot_df = pd.concat(boot, ignore_index=True) if boot else pd.DataFrame()
    vals = res.pivot_table(index=["metric", "seed"], columns="variant", values="value", aggfunc="first")
    rows = []
    for metric in metrics:
        d = direction(metric)
        for i, a in enumerate(variants):
            for b in variants[i + 1 :]:
                per_seed = (
                    vals.loc[metric][[a, b]].dropna()
                    if metric in vals.index and {a, b} <= set(vals.columns)
                    else None
                )
                if per_seed is None or per_seed.empty:
                    continue
                diff = (per_seed[a] - per_seed[b]).to_numpy(float)
                bt = (
                    boot_df[
                        (boot_df["metric"] == metric) & (boot_df["method"] == a) & (boot_df["reference"] == b)
                    ]
                    if not boot_df.empty
                    else boot_df
                )
                a_better = int(((d * bt["ci_low"] > 0) & (d * bt["ci_high"] > 0)).sum()) if len(bt) else 0
                b_better = int(((d * bt["ci_low"] < 0) & (d * bt["ci_high"] < 0)).sum()) if len(bt) else 0
                rows.append(
                    {
                        "dataset": dataset,
                        "metric": metric,
                        "a": a,
                        "b": b,
                        "n_seeds": len(diff),
                        "mean_diff": float(diff.mean()),
                        "a_better": a_better,
                        "b_better": b_better,
                        "wilcoxon_p": _wilcoxon(diff),
                    }
                )
    return pd.DataFrame(rows, columns=PAIRWISE_COLUMNS)


def _wilcoxon(diff: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; NaN with < 2 of them or all zero."""
    if len(diff) < 2 or not np.any(diff != 0):
        return math.nan
    return float(stats.wilcoxon(diff).pvalue)


def significance_tables(pw: pd.DataFrame, variants: list[str]) -> list[Table]:
    """One matrix per metric: row a, column b holds `k/n` = seeds on which a is significantly better
    than b, and the Wilcoxon p across seeds; bold when a is better on every seed."""
    out = []
    for metric, g in pw[pw["metric"].map(base_metric) != "FPR95"].groupby(
        "metric", sort=False
    ):  # FPR95: pairwise.csv
        cell = {}
        for r in g.to_dict("records"):
            p = "" if math.isnan(r["wilcoxon_p"]) else f", p={r['wilcoxon_p']:.2g}"
            cell[(r["a"], r["b"])] = Cell(f"{r['a_better']}/{r['n_seeds']}{p}", r["a_better"] == r["n_seeds"])
            cell[(r["b"], r["a"])] = Cell(f"{r['b_better']}/{r['n_seeds']}{p}", r["b_better"] == r["n_seeds"])
        shown = [v for v in variants if any(v in k for k in cell)]
        rows = [[Cell(a)] + [cell.get((a, b), Cell("–")) for b in shown] for a in shown]
        out.append(
            Table(
                f"{header(metric)}: seeds on which the row beats the column significantly",
                ["row vs column", *shown],
                rows,
            )
        )
    if out:
        out[-1].notes.append(
            "k/n: on k of the n seeds both methods ran, the paired bootstrap CI of the difference "
            "(same queries resampled for both) excludes 0 in the row's favour; p: two-sided Wilcoxon "
            "signed-rank test of the n per-seed differences (it cannot go below 0.05 with fewer than "
            "6 seeds). **bold**: significant on every seed."
        )
    return out


def cost_frame(tim: pd.DataFrame) -> pd.DataFrame:
    """Mean seconds per seed of each variant: its own stages, and the base training it used
    (post-hoc methods record the shared base model's training cost in their cell)."""
    if tim.empty:
        return pd.DataFrame()
    t = tim.assign(stage=np.where(tim["method"] == BASE, "base train", tim["stage"]))
    per_cell = t.pivot_table(
        index=["variant", "seed"], columns="stage", values="seconds", aggfunc="sum", fill_value=0.0
    )
    mean = per_cell.groupby(level="variant").mean()
    cols = [c for c in ("base train", *STAGES) if c in mean.columns] + sorted(
        c for c in mean.columns if c not in STAGES and c != "base train"
    )
    mean = mean[cols]
    mean["total"] = mean.sum(axis=1)
    return mean


def cost_table(cost: pd.DataFrame, variants: list[str]) -> Table | None:
    if cost.empty:
        return None
    rows = [
        [Cell(v)] + [Cell(f"{cost.loc[v, c]:.2f}") for c in cost.columns] for v in variants if v in cost.index
    ]
    return Table(
        "Wall time per seed (s, mean over seeds)",
        ["method", *cost.columns],
        rows,
        [
            '"base train": the shared base model\'s training, counted in every post-hoc method that uses it '
            "(in the grid it was trained once per dataset, setting and seed)."
        ],
    )


def cost_quality_figure(
    cost: pd.DataFrame, summ: pd.DataFrame, variants: list[str], metrics: list[str]
) -> MplFigure | None:
    """Wall time per seed (x, log) against each metric's mean over seeds with its interval (y)."""
    metrics = [m for m in metrics if not summ[summ["metric"] == m].empty]
    if cost.empty or not metrics:
        return None
    fig = MplFigure(figsize=(6.0 * len(metrics), 4.6))
    fig.subplots_adjust(left=0.08 / len(metrics), right=0.98, top=0.9, bottom=0.13, wspace=0.25)
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    for ax, metric in zip(axes, metrics):
        s = summ[summ["metric"] == metric].set_index("method")
        for i, v in enumerate(variants):
            if v not in s.index or v not in cost.index or not np.isfinite(s.loc[v, "mean"]):
                continue
            y, lo, hi = s.loc[v, ["mean", "t_low", "t_high"]].astype(float)
            err = None if not np.isfinite(lo) else [[y - lo], [hi - y]]
            st = P.method_style(i)
            ax.errorbar(
                [cost.loc[v, "total"]], [y], yerr=err, fmt=st["marker"], color=st["color"], capsize=3, label=v
            )
        ax.set_xscale("log")
        ax.set_xlabel("wall seconds per seed (incl. base training)")
        ax.set_ylabel(header(metric))
        ax.set_title(f"cost vs {metric}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return fig


def quality_metrics(metrics) -> list[str]:
    """The y-axes of the cost plot: mAP@1 and the AUROC of the near-OOD set (else the first AUROC)."""
    metrics = list(metrics)
    aurocs = [m for m in metrics if base_metric(m) == "AUROC" and split_score_metric(m)[1] is None]
    near = f"AUROC[{NEAR_OOD_SET}]"
    return [m for m in ["mAP@1", near if near in aurocs else next(iter(aurocs), None)] if m in metrics]


def dataset_blocks(
    grid: GridFolder, dataset: str, res: pd.DataFrame, tim: pd.DataFrame, cells: dict[str, str]
) -> tuple[list[Block], pd.DataFrame]:
    """Heading, method table across seeds, ranks, significance, cost table and plot of one dataset
    (one report group: `preset / dataset` in a grid over several presets)."""
    variants = ordered([cells[c] for c in cells if cell_group(grid, grid.meta["cells"][c]) == dataset])
    several = "base_configs" in grid.meta
    out: list[Block] = [Heading(f"{'Preset / dataset' if several else 'Dataset'}: {dataset}")]
    if res.empty:
        return out + [Para("No finished cells.")], pd.DataFrame(columns=PAIRWISE_COLUMNS)
    n_seeds = res["seed"].nunique()
    summ = seed_summary(res.assign(method=res["variant"]), _level(grid))
    out += [
        Heading("Methods across seeds", 3),
        Para(
            f"Mean over {n_seeds} seed(s) [{100 * _level(grid):g}% {SEED_INTERVAL_NOTE}]; "
            "**bold**: best mean per column."
            + (
                f" **Only {n_seeds} seed(s): too few for an interval across seeds (it needs "
                f"{MIN_SEEDS}); none is shown.** Each seed's bootstrap CI over queries is in its cell's "
                "run folder."
                if n_seeds < MIN_SEEDS
                else ""
            ),
            note=True,
        ),
    ]
    out += seeds_tables(summ, variants)
    metrics = headline(res["metric"])
    out.append(Heading("Ranks and significance", 3))
    rt = rank_table(res, variants, metrics)
    out += (
        [rt] if rt is not None else [Para("Fewer than two methods per metric: nothing to rank.", note=True)]
    )
    pw = pairwise_frame(grid, dataset, res, variants, metrics, cells)
    out += significance_tables(pw, variants)
    cost = cost_frame(tim)
    out.append(Heading("Cost vs quality", 3))
    ct = cost_table(cost, variants)
    out += [ct] if ct is not None else [Para("No timings recorded.", note=True)]
    fig = cost_quality_figure(cost, summ, variants, quality_metrics(summ["metric"]))
    if fig is not None:
        out.append(
            Figure(
                f"cost_quality_{_safe(dataset)}",
                f"{dataset}: wall time per seed against quality "
                "(mean over seeds, bars: the interval across seeds, none below 3 seeds); methods without "
                "uncertainty have no AUROC point.",
                P.png_bytes(fig),
            )
        )
    return out, pw


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in name)


def _merged(grid: GridFolder) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    res, tim = grid.merged()
    cells = variant_names(grid)
    if res.empty:
        raise BenchError(
            f"{grid.path} has no finished cells yet (no merged results.csv); "
            f"run `bench grid --resume {grid.path}`"
        )
    res, tim = with_groups(res), with_groups(tim)
    return res.assign(variant=res["cell"].map(cells)), tim.assign(variant=tim["cell"].map(cells)), cells


def _blocks_by_criterion(res: pd.DataFrame, tim: pd.DataFrame, c) -> pd.DataFrame:
    """(group, seed) blocks x variants of one criterion's metric, group = dataset or preset / dataset
    (cost: seconds per cell, base training included)."""
    from reports.criteria import COST

    if c.metric == COST:
        if tim.empty:
            return pd.DataFrame()
        cost = tim.groupby(["group", "seed", "variant"])["seconds"].sum().reset_index(name="value")
        return cost.pivot_table(index=["group", "seed"], columns="variant", values="value", aggfunc="first")
    d = res[res["metric"] == c.metric]
    return d.pivot_table(index=["group", "seed"], columns="variant", values="value", aggfunc="first")


def grid_findings_blocks(grid: GridFolder, res: pd.DataFrame, tim: pd.DataFrame) -> list[Block]:
    """Findings across the grid: per criterion (reports/criteria.py), the method with the best mean rank
    over the (dataset, seed) blocks and those not significantly different from it (Friedman test,
    then Nemenyi's critical difference; reports/rank_tests.py), one sentence each, the rank heat-map."""
    from types import SimpleNamespace

    from reports.criteria import criteria
    from reports.findings import rank_heatmap
    from reports.rank_tests import cd_diagram, friedman_nemenyi

    out: list[Block] = [Heading("Findings")]
    crits = criteria(
        SimpleNamespace(
            results=res, config=grid.meta.get("base_config", {}), near_ood_sets=grid.near_ood_sets
        )
    )
    variants = ordered(res["variant"])
    rows, sentences, ranks, diagrams = [], [], {}, []
    for c in crits:
        v = friedman_nemenyi(_blocks_by_criterion(res, tim, c), c.higher)
        if v.best is None:
            continue
        ranks[c.title] = v.mean_ranks
        fig = cd_diagram(v, c.title) if len(v.mean_ranks) >= 2 and v.n_blocks >= 2 else None
        if fig is not None:
            diagrams.append(
                Figure(
                    f"cd_{c.key}",
                    f"{c.title} ({header(c.metric) if c.metric != 'seconds' else 'seconds'}): critical-"
                    "difference diagram, mean rank over the blocks (1 = best, on the right); a bar joins "
                    "methods not significantly different.",
                    P.png_bytes(fig, dpi=90),
                )
            )
        p = "n/a" if math.isnan(v.p) else f"{v.p:.2g}"
        label = header(c.metric) if c.metric != "seconds" else "seconds"
        rows.append(
            [
                Cell(c.title),
                Cell(label),
                Cell(v.best, True),
                Cell(f"{v.mean_ranks[v.best]:.2f}"),
                Cell(", ".join(v.tied) or "none"),
                Cell(p),
                Cell(str(v.n_blocks)),
            ]
        )
        test = "Wilcoxon" if len(v.mean_ranks) == 2 else "Friedman"
        if math.isnan(v.p):
            why = "too few blocks for a test"
        elif not v.p < 0.05:
            why = f"the {test} test finds no difference"
        else:
            why = f"within Nemenyi's critical difference {v.cd:.2f} of its mean rank"
        names = ", ".join(f"`{t}`" for t in v.tied)
        tied = (
            f"; not significantly different ({why}): {names}"
            if v.tied
            else f"; every other method ranks significantly worse ({why})"
        )
        sentences.append(
            Para(
                f"**{c.title}.** {c.question} **{v.best}** (mean rank "
                f"{v.mean_ranks[v.best]:.2f} over {v.n_blocks} {_block_word(grid)} blocks){tied}."
            )
        )
    if not rows:
        return out + [Para("No criterion has values in every block.", note=True)]
    out.append(
        Para(
            f"Methods ranked within each ({_block_word(grid).replace(' x ', ', ')}) block (1 = best), "
            "ranks averaged; Friedman "
            "test that all methods rank alike (two methods: Wilcoxon), then Nemenyi's critical "
            "difference (alpha 0.05) for which methods are not significantly different from the "
            "best. Blocks missing a method's value are left out.",
            note=True,
        )
    )
    heads = [
        "criterion",
        "metric",
        "best",
        "mean rank",
        "not significantly different",
        "p (Friedman)",
        "blocks",
    ]
    out.append(Table("Best method per criterion across the grid", heads, rows, wrap=True))
    out += sentences
    rk = pd.DataFrame(ranks).reindex(variants)
    if rk.shape[1] >= 2 and len(rk) >= 2:
        out.append(
            Figure(
                "findings_ranks",
                "Mean rank over (dataset, seed) blocks per criterion (1 = best).",
                P.png_bytes(rank_heatmap(rk.round(2)), dpi=90),
            )
        )
    if diagrams:
        out += [Heading("Critical-difference diagrams", 3), *diagrams]
    return out


def _block_word(grid: GridFolder) -> str:
    """What a block is: `dataset x seed`, or `preset/dataset x seed` over several presets."""
    return "preset/dataset x seed" if "base_configs" in grid.meta else "dataset x seed"


def build_grid_report(grid: GridFolder) -> tuple[list[Block], pd.DataFrame]:
    """The whole report as blocks (the title, Findings first), and the pairwise significance frame
    (pairwise.csv)."""
    res, tim, cells = _merged(grid)
    head = header_blocks(grid)
    blocks = (
        head[:1] + grid_findings_blocks(grid, res, tim) + [Heading("Grid")] + head[1:] + failure_blocks(grid)
    )
    frames = []
    for d in groups(grid):
        b, pw = dataset_blocks(grid, d, res[res["group"] == d], tim[tim["group"] == d], cells)
        blocks += b
        frames.append(pw)
    return blocks, pd.concat(frames, ignore_index=True)


def render_grid_report(grid_dir: str | Path, formats: list[str]) -> list[Path]:
    """Write the grid report in each format, its figures and pairwise.csv into the grid folder."""
    bad = [f for f in formats if f not in WRITERS]
    if bad:
        raise BenchError(f"unknown report format {bad[0]!r}; known: {', '.join(WRITERS)}")
    grid = GridFolder(grid_dir)
    blocks, pw = build_grid_report(grid)
    grid.write_pairwise(pw)
    figures = {b.name: b.png for b in blocks if isinstance(b, Figure)}
    return grid.write_report({fmt: WRITERS[fmt](blocks) for fmt in dict.fromkeys(formats)}, figures)


def full_grid_text(grid_dir: str | Path) -> str:
    """Every table of the grid report as console text (`bench report GRID --format text`)."""
    return to_text(build_grid_report(GridFolder(grid_dir))[0])


def grid_summary_text(grid_dir: str | Path, report: str | Path | None = None) -> str:
    """Per dataset one table of at most 100 columns: a row per method (variant), a column per criterion,
    the mean over seeds; then where the report is."""
    from types import SimpleNamespace

    from reports.criteria import criteria
    from reports.findings import SUMMARY_NOTE, display_path, summary_table

    grid = GridFolder(grid_dir)
    try:
        res, tim, _ = _merged(grid)
    except BenchError as e:
        return f"{e}\n"
    out = []
    for d in groups(grid):
        r, t = res[res["group"] == d], tim[tim["group"] == d] if not tim.empty else tim
        if r.empty:
            continue
        crits = criteria(
            SimpleNamespace(
                results=r, config=grid.meta.get("base_config", {}), near_ood_sets=grid.near_ood_sets
            )
        )
        vals = {c.key: _blocks_by_criterion(r, t, c).mean(axis=0) for c in crits}
        out.append(f"== {d} (mean over seeds) ==\n" + summary_table(ordered(r["variant"]), crits, vals))
    out.append(SUMMARY_NOTE)
    if report is not None:
        out.append(f"report: {display_path(report)}")
    return "\n".join(out) + "\n"


def print_grid_summary(grid_dir: str | Path, report: str | Path | None = None) -> None:
    """Print `grid_summary_text`."""
    print(grid_summary_text(grid_dir, report), end="")
