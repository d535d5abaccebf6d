"""Result tables: methods as rows, metrics as columns, `value [ci_low, ci_high]`."""
from __future__ import annotations

import math

import pandas as pd
from tabulate import tabulate


def fmt_ci(value: float, lo: float, hi: float, digits: int = 3) -> str:
    """`0.712 [0.701, 0.723]`; NaN values print as n/a, a missing CI is left out."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def wide_results(results: pd.DataFrame, seed: int | None = None) -> pd.DataFrame:
    """Methods x metrics with formatted cells, for one seed (the first when None)."""
    if results.empty:
        return pd.DataFrame()
    seed = results["seed"].iloc[0] if seed is None else seed
    df = results[results["seed"] == seed].copy()
    df["cell"] = [fmt_ci(v, lo, hi) for v, lo, hi in zip(df["value"], df["ci_low"], df["ci_high"])]
    order_m = list(dict.fromkeys(df["method"]))
    order_c = list(dict.fromkeys(df["metric"]))
    wide = df.pivot(index="method", columns="metric", values="cell")
    return wide.reindex(index=order_m, columns=order_c)


def results_table(results: pd.DataFrame, tablefmt: str = "simple", seed: int | None = None) -> str:
    """The results table as text (tabulate)."""
    wide = wide_results(results, seed)
    if wide.empty:
        return "(no results)"
    return tabulate(wide.reset_index().values.tolist(), headers=["method", *wide.columns], tablefmt=tablefmt)


def timing_table(timings: pd.DataFrame, tablefmt: str = "simple") -> str:
    """Seconds per stage per method (summed over seeds), with the total."""
    if timings.empty:
        return "(no timings)"
    wide = timings.pivot_table(index="method", columns="stage", values="seconds", aggfunc="sum", fill_value=0.0)
    wide["total"] = wide.sum(axis=1)
    return tabulate(wide.reset_index().values.tolist(), headers=["method", *wide.columns], tablefmt=tablefmt, floatfmt=".2f")
