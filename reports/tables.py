"""Result, seed, paired and timing tables from a run's frames, as `Table`s of `Cell`s: cells print
`value [ci_low, ci_high]` (NaN as n/a) and the best value per column is marked by its direction."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bench.conventions import BASE_METHOD as BASE
from bench.conventions import STAGES, split_score_metric
from bench.metrics.aggregate import seed_summary, stage_breakdown
from reports.formats import Cell, Table

if TYPE_CHECKING:
    from bench.run_folder import RunFolder


def ci_level(run: "RunFolder") -> float:
    """The run's confidence level (config `ci_level`, default 0.95)."""
    return float(run.config.get("ci_level", 0.95))


def run_seed_summary(run: "RunFolder") -> tuple[pd.DataFrame, str]:
    """(across-seed summary, where it comes from): seeds.csv, else computed from the results."""
    if run.seed_table is not None and not run.seed_table.empty:
        return run.seed_table, "seeds.csv"
    return seed_summary(run.results, ci_level(run)), "computed from results.csv"


DIGITS = 3
HIGHER_BETTER = (
    "mAP@",
    "mAP_pml@",
    "Recall@",
    "AUROC",
    "AUPR",
    "var_ratio",
    "MAP@R",
    "precision",
    "AURG",
    "error_AUROC",
    "R-AUROC",
)
# other metrics are shown but never marked
LOWER_BETTER = ("ECE", "AUSE", "FPR95", "Spearman", "AURC", "E-AURC", "AUGRC", "Risk@")


def _isnan(x) -> bool:
    return x is None or (isinstance(x, (float, np.floating)) and math.isnan(x))


def fmt_ci(value: float, lo: float, hi: float, digits: int = DIGITS, signed: bool = False) -> str:
    """`0.712 [0.701, 0.723]`; NaN values print as n/a, a missing CI is left out."""
    if _isnan(value):
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if _isnan(lo) or _isnan(hi):
        return f.format(value)
    return f"{f.format(value)} [{lo:.{digits}f}, {hi:.{digits}f}]"


def base_metric(metric: str) -> str:
    """`AUROC[heldout]` -> `AUROC` (also `AUROC[heldout]:trace`: the score suffix goes too)."""
    return split_score_metric(metric)[0].split("[", 1)[0]


def ood_set(metric: str) -> str | None:
    """`AUROC[heldout]` (or `AUROC[heldout]:trace`) -> `heldout`; None for metrics without a set."""
    m = re.search(r"\[(.+)\]$", split_score_metric(metric)[0])
    return m.group(1) if m else None


def direction(metric: str) -> int | None:
    """+1 when higher is better, -1 when lower is better, None when unknown."""
    b = base_metric(metric)
    if any(b.startswith(p) for p in HIGHER_BETTER):
        return 1
    if any(b.startswith(p) for p in LOWER_BETTER):
        return -1
    return None


def header(metric: str) -> str:
    """Column header with the direction arrow: `mAP@1 ↑`, `ECE ↓`."""
    d = direction(metric)
    return metric + ("" if d is None else (" ↑" if d > 0 else " ↓"))


def metric_groups(metrics: list[str]) -> list[tuple[str, list[str]]]:
    """Split metric names into titled groups: retrieval, calibration, one group per OOD set, other.
    Per-score metrics (`AUSE:top1_flip`) are left out: the score tables (reports/scores.py) show them."""
    groups: dict[str, list[str]] = {}
    for m in metrics:
        if split_score_metric(m)[1] is not None:
            continue
        b, s = base_metric(m), ood_set(m)
        if s is not None:
            key = f"OOD detection: {s}"
        elif b.startswith(("mAP@", "mAP_pml@", "Recall@", "MAP@R", "precision")):
            key = "Retrieval"
        elif b in ("ECE", "AUSE", "AURG"):
            key = "Calibration and sparsification"
        else:
            key = "Other metrics"
        groups.setdefault(key, []).append(m)
    order = ["Retrieval", "Calibration and sparsification"]
    keys = [k for k in order if k in groups] + sorted(k for k in groups if k.startswith("OOD"))
    keys += [k for k in groups if k not in keys]
    return [(k, groups[k]) for k in keys]


MAX_COLUMNS = 7  # metric columns per table (plus the row label): wider tables are split


def column_chunks(metrics: list[str], size: int = MAX_COLUMNS) -> list[tuple[str, list[str]]]:
    """(title suffix, metrics) chunks of at most `size` metrics, as even as possible (8 -> 4 + 4):
    `""` for the first, ` (2)`, ` (3)`, ... after."""
    n = -(-len(metrics) // size) if metrics else 0
    bounds = [round(i * len(metrics) / n) for i in range(n + 1)] if n else []
    return [("" if i == 0 else f" ({i + 1})", metrics[bounds[i] : bounds[i + 1]]) for i in range(n)]


def ordered(values, preferred: list[str] | None = None) -> list[str]:
    """Unique values in first-seen order, those in `preferred` first (in its order)."""
    seen = list(dict.fromkeys(values))
    pref = [p for p in (preferred or []) if p in seen]
    return pref + [v for v in seen if v not in pref]


def best_marks(values: dict[str, float], metric: str, digits: int = DIGITS) -> set[str]:
    """Rows holding the best value of a column (ties at the printed precision all marked); nothing
    is marked when the direction is unknown or fewer than two rows have a value."""
    d = direction(metric)
    finite = {k: v for k, v in values.items() if not _isnan(v)}
    if d is None or len(finite) < 2:
        return set()
    best = max(finite.values()) if d > 0 else min(finite.values())
    return {k for k, v in finite.items() if round(v, digits) == round(best, digits)}


def wide_cells(
    df: pd.DataFrame,
    row_key: str,
    metrics: list[str],
    rows: list[str],
    value: str = "value",
    lo: str = "ci_low",
    hi: str = "ci_high",
    mark_best: bool = True,
    signed: bool = False,
    mark_nonzero: bool = False,
) -> list[list[Cell]]:
    """Rows x metrics cells from a tidy frame with columns row_key, metric, value, lo, hi."""
    idx = {(r[row_key], r["metric"]): r for r in df.to_dict("records")}
    out = []
    marks = {}
    if mark_best:
        for m in metrics:
            marks[m] = best_marks({r: idx[(r, m)][value] for r in rows if (r, m) in idx}, m)
    for r in rows:
        cells = [Cell(str(r))]
        for m in metrics:
            rec = idx.get((r, m))
            if rec is None:
                cells.append(Cell("–"))
                continue
            text = fmt_ci(rec[value], rec[lo], rec[hi], signed=signed)
            bold = r in marks.get(m, set())
            if mark_nonzero and not (_isnan(rec[lo]) or _isnan(rec[hi])):
                bold = rec[lo] > 0 or rec[hi] < 0
            cells.append(Cell(text, bold))
        out.append(cells)
    return out


def results_tables(results: pd.DataFrame, seed: int, methods: list[str] | None = None) -> list[Table]:
    """One table per metric group for one seed: methods x metrics, `value [lo, hi]`, best in bold."""
    df = results[results["seed"] == seed]
    if df.empty:
        return []
    rows = ordered(df["method"], methods)
    tables = []
    for title, group in metric_groups(ordered(df["metric"])):
        for part, metrics in column_chunks(group):
            tables.append(
                Table(
                    f"{title} (seed {seed}){part}",
                    ["method", *map(header, metrics)],
                    wide_cells(df, "method", metrics, rows),
                )
            )
    return tables


RESULTS_NOTE = (
    "Cells are value [lower, upper] of the bootstrap confidence interval over queries "
    "(stratified ID/OOD resampling for OOD metrics); **bold** marks the best method per column "
    "(↑ higher is better, ↓ lower is better; ties at the printed precision are all marked). "
    "n/a: the method has no uncertainty, so the metric does not apply."
)


def seeds_tables(summary: pd.DataFrame, methods: list[str] | None = None) -> list[Table]:
    """Across-seed tables (mean [interval across seeds]) per metric group, best mean in bold."""
    if summary.empty:
        return []
    rows = ordered(summary["method"], methods)
    out = []
    for title, group in metric_groups(ordered(summary["metric"])):
        for part, metrics in column_chunks(group):
            cells = wide_cells(summary, "method", metrics, rows, value="mean", lo="t_low", hi="t_high")
            out.append(Table(f"{title} (mean over seeds){part}", ["method", *map(header, metrics)], cells))
    return out


def paired_tables(paired: pd.DataFrame, methods: list[str] | None = None) -> list[Table]:
    """Differences method − reference per metric group, one row per (method, seed); a bold cell's CI
    excludes 0."""
    if paired.empty:
        return []
    p = paired.copy()
    multi_seed = p["seed"].nunique() > 1
    p["row"] = [
        f"{m} − {r}" + (f" (seed {s})" if multi_seed else "")
        for m, r, s in zip(p["method"], p["reference"], p["seed"])
    ]
    order_m = ordered(p["method"], methods)
    p["_o"] = p["method"].map({m: i for i, m in enumerate(order_m)})
    rows = ordered(p.sort_values(["_o", "seed"], kind="stable")["row"])
    out = []
    for title, group in metric_groups(ordered(p["metric"])):
        for part, metrics in column_chunks(group):
            cells = wide_cells(
                p, "row", metrics, rows, value="diff", mark_best=False, signed=True, mark_nonzero=True
            )
            out.append(
                Table(f"{title}: paired difference{part}", ["difference", *map(header, metrics)], cells)
            )
    return out


def stage_frame(timings: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """Seconds per stage (columns, canonical order) per method (rows, base first), summed over seeds."""
    if timings.empty:
        return pd.DataFrame()
    wide = stage_breakdown(timings).set_index("method")
    present = set(timings["stage"])
    stages = [s for s in STAGES if s in present] + sorted(s for s in present if s not in STAGES)
    rows = ordered(([BASE] if BASE in wide.index else []) + list(wide.index), ([BASE] + (methods or [])))
    return wide.reindex(index=rows, columns=stages)


def timing_table(
    timings: pd.DataFrame, methods: list[str] | None = None, post_hoc: set[str] | None = None
) -> Table | None:
    """Wall time per stage per method (s, summed over seeds), total, share of the run's total, and for
    post-hoc methods (those in `post_hoc`; when unknown, those that trained nothing themselves) the
    total including the shared base training."""
    wide = stage_frame(timings, methods)
    if wide.empty:
        return None
    total = wide.sum(axis=1)
    grand = float(total.sum())
    base_total = float(total.get(BASE, 0.0))
    own_train = wide["train"] if "train" in wide.columns else pd.Series(0.0, index=wide.index)
    rows = []
    for m in wide.index:
        cells = [Cell(m)] + [Cell(f"{wide.loc[m, s]:.2f}") for s in wide.columns]
        cells.append(Cell(f"{total[m]:.2f}"))
        cells.append(Cell(f"{100 * total[m] / grand:.1f}%" if grand > 0 else "n/a"))
        reuses = (m in post_hoc) if post_hoc is not None else own_train[m] == 0
        shares_base = m != BASE and BASE in wide.index and reuses
        cells.append(Cell(f"{total[m] + base_total:.2f}" if shares_base else "–"))
        rows.append(cells)
    n_seeds = timings["seed"].nunique()
    notes = [
        f"Seconds summed over {n_seeds} seed(s). Post-hoc methods share the base training, counted once "
        f'under "{BASE}"; "with base" adds it to each post-hoc method.'
    ]
    return Table(
        "Wall time per stage (s)", ["method", *wide.columns, "total", "share", "with base"], rows, notes
    )
