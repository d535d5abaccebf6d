"""The sensitivity figure of a run folder's sensitivity.csv (`bench.sensitivity`): per method and seed,
mAP@1, AUSE, ECE and AUROC[<set>] against the prior precision, one line per likelihood temperature
(or against the temperature when only that axis was swept), bootstrap CIs as bands, the fitted point
marked."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench.run_folder import RunFolder
from reports.formats import Block, Heading, Para
from reports.formats import Figure as FigureBlock
from reports.plots import method_style, png_bytes

NOTE = (
    "Each point is the fitted method's posterior at that (prior precision, likelihood temperature), from the "
    "fit's own factorisation, scored by the same evaluation as the results tables (sensitivity.csv); bands: "
    "bootstrap CIs over queries; dashed: the fitted value. The temperature multiplies the accumulated "
    "curvature (batch observations unless likelihood_scale=pair); a low-rank full posterior's `rank_bound` "
    "(relative covariance error bound) is in the CSV."
)


def _metrics(df: pd.DataFrame) -> list[str]:
    order = ["mAP@1", "AUSE", "ECE"]
    found = list(dict.fromkeys(df["metric"]))
    return [m for m in order if m in found] + sorted(m for m in found if m not in order)


def sensitivity_figure(
    df: pd.DataFrame, title: str, fitted: tuple[float, float] | None = None
) -> Figure | None:
    """Panels per metric for the rows of one (method, seed); x: prior precision (log) with a line per
    temperature, or the temperature when every row has one prior precision. None without rows."""
    if df.empty:
        return None
    x_axis, line_axis = "prior_precision", "likelihood_scale"
    if df[x_axis].nunique() == 1:
        x_axis, line_axis = line_axis, x_axis
    metrics = _metrics(df)
    cols = min(3, len(metrics))
    rows = int(np.ceil(len(metrics) / cols))
    spare = rows * cols > len(metrics)  # an empty cell holds the legend, else it goes to the right
    fig = Figure(figsize=(4.2 * cols + (0 if spare else 1.6), 3.2 * rows + 0.6))
    fig.subplots_adjust(
        left=0.07, right=0.97 if spare else 0.84, top=0.88, bottom=0.12, wspace=0.32, hspace=0.45
    )
    lines = sorted(df[line_axis].unique())
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, k + 1)
        d = df[df["metric"] == metric]
        for i, v in enumerate(lines):
            s = d[d[line_axis] == v].sort_values(x_axis)
            st = method_style(i)
            label = f"{'temperature' if line_axis == 'likelihood_scale' else 'prior'} {v:.3g}"
            ax.plot(
                s[x_axis],
                s["value"],
                color=st["color"],
                linestyle=st["linestyle"],
                marker=st["marker"],
                markersize=4,
                label=label,
            )
            ax.fill_between(s[x_axis], s["ci_low"], s["ci_high"], color=st["color"], alpha=0.15, linewidth=0)
        if fitted is not None:
            ax.axvline(
                fitted[0] if x_axis == "prior_precision" else fitted[1],
                color="#555555",
                linestyle="--",
                linewidth=1,
            )
        ax.set_xscale("log")
        ax.set_xlabel("prior precision" if x_axis == "prior_precision" else "likelihood temperature")
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    if spare:
        cell = fig.add_subplot(rows, cols, rows * cols)
        cell.axis("off")
        cell.legend(handles, labels, loc="center", fontsize=9, frameon=False)
    else:
        fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title)
    return fig


def sensitivity_blocks(run: RunFolder) -> list[Block]:
    """The Sensitivity section: one figure per (method, seed) in sensitivity.csv;
    nothing when no sweep ran."""
    df = run.sensitivity
    if df is None or df.empty:
        return []
    out: list[Block] = [
        Heading("Sensitivity to the prior precision and the likelihood temperature"),
        Para(NOTE, note=True),
    ]
    diags = run.meta.get("diagnostics") or {}
    for (method, seed), d in df.groupby(["method", "seed"], sort=False):
        dg = diags.get(f"{method}-seed{seed}", {})
        fitted = (dg["prior_precision"], dg["temperature"]) if "temperature" in dg else None
        fig = sensitivity_figure(d, f"{method} (seed {seed})", fitted)
        if fig is not None:
            where = (
                f" (fitted: prior precision {fitted[0]:.3g}, temperature {fitted[1]:.3g})" if fitted else ""
            )
            name = re.sub(r"[^A-Za-z0-9_.@-]+", "_", f"sensitivity_{method}_seed{seed}")
            out.append(
                FigureBlock(
                    name,
                    f"{method}, seed {seed}: headline metrics against the prior precision and "
                    f"the likelihood temperature{where}.",
                    png_bytes(fig),
                )
            )
    return out
