"""The selective-retrieval section of a run's report: per method x score, AURC, E-AURC, AUGRC and the
selective risk at 80/90/95% coverage (from results.csv), and the risk-coverage curves (from the saved
score vectors and per-query correctness). Definitions: bench.metrics.selective, docs/selective-risk.md."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure

from bench.conventions import CORRECTNESS_METRIC, ID_SET
from bench.metrics.selective import SELECTIVE_METRICS, risk_coverage_curve
from bench.run_folder import RunFolder, score_arrays
from reports import plots as P
from reports.formats import Block, Cell, Figure, Heading, Para, Table
from reports.tables import fmt_ci, ordered

CORRECT = f"pq_{CORRECTNESS_METRIC}"


def _losses(summ: pd.DataFrame) -> list[str]:
    """The loss suffixes present: '' (1 - precision@1) first, then `(mAP@K)`."""
    found = {m[len("AURC") :] for m in summ["metric"] if m.startswith("AURC")}
    return sorted(found, key=lambda s: (s != "", s))


def selective_tables(summ: pd.DataFrame, methods: list[str], how: str, suffix: str = "") -> list[Table]:
    """One method x score table per loss; rows where every value is n/a (a predictive score of a
    deterministic method) are left out; **bold**: the lowest AURC / E-AURC / AUGRC / risk per column."""
    idx = {(r["method"], r["score"], r["metric"]): r for r in summ.to_dict("records")}
    out = []
    for loss in _losses(summ):
        cols = [f"{m}{loss}" for m in SELECTIVE_METRICS]
        rows = [
            (m, s)
            for m in ordered(summ["method"], methods)
            for s in ordered(summ["score"])
            if any(np.isfinite(idx.get((m, s, c), {}).get("value", np.nan)) for c in cols)
        ]
        if not rows:
            continue
        best = {
            c: min(
                (
                    idx[(m, s, c)]["value"]
                    for m, s in rows
                    if (m, s, c) in idx and np.isfinite(idx[(m, s, c)]["value"])
                ),
                default=np.nan,
            )
            for c in cols
        }
        body = [[Cell(f"{m} / {s}")] + [_cell(idx.get((m, s, c)), best[c]) for c in cols] for m, s in rows]
        risk = "1 - precision@1 (the top-1 retrieval is wrong)" if not loss else f"1 - {loss.strip('()')}"
        note = (
            f"Cells: {how}. Queries accepted most certain first; risk = {risk}. AURC: mean selective risk "
            "over all coverages; E-AURC: AURC minus the oracle's (the ordering's cost alone); AUGRC: mean "
            "share of all queries that are accepted and wrong (Traub et al. 2024); Risk@cCov: selective risk "
            "when the fraction c of the queries is answered. Lower is better; **bold**: the lowest."
        )
        out.append(
            Table(
                f"Selective retrieval: risk {'of the top-1 error' if not loss else 'of ' + loss}{suffix}",
                ["method / score", *[f"{c} ↓" for c in cols]],
                body,
                [note],
            )
        )
    return out


def _cell(rec: dict | None, best: float) -> Cell:
    if rec is None:
        return Cell("–")
    return Cell(fmt_ci(rec["value"], rec["lo"], rec["hi"]), bool(np.isfinite(best) and rec["value"] == best))


def risk_coverage_figure(per_method: dict[str, dict[str, np.ndarray]], scores: list[str]) -> MplFigure | None:
    """One panel per score: each method's risk-coverage curve (selective risk 1 - precision@1 of the
    queries accepted, most certain first, against the fraction accepted), thin dashed: the method's
    oracle (right queries first). None without score vectors."""
    grid = P.score_panel_grid(per_method, scores, top=0.92)
    if grid is None:
        return None
    fig, axes, panels = grid
    for ax, s in zip(axes, panels):
        for i, (m, a) in enumerate(per_method.items()):
            u = score_arrays(a).get((ID_SET, s))
            if u is None or CORRECT not in a:
                continue
            loss = 1.0 - np.asarray(a[CORRECT], float)
            cov, risk, _ = risk_coverage_curve(u, loss)
            _, best, _ = risk_coverage_curve(loss, loss)
            st = P.method_style(i)
            ax.plot(cov, risk, color=st["color"], linestyle=st["linestyle"], lw=1.6, label=m)
            ax.plot(cov, best, color=st["color"], lw=0.8, alpha=0.6, linestyle="--")
        ax.set_title(s)
        ax.set_xlabel("coverage (fraction of queries answered)")
        ax.set_ylabel("selective risk (1 - precision@1)")
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    P.finish_panels(fig, axes, len(panels))
    fig.suptitle(
        "Risk-coverage per score: answer the most certain queries first (thin dashed: each method's oracle)"
    )
    return fig


def selective_blocks(run: RunFolder) -> list[Block]:
    """The report section on selective retrieval (nothing for runs without selective metrics)."""
    from reports.scores import score_summary

    summ, how = score_summary(run)
    summ = summ[summ["metric"].str.match(r"^(AURC|E-AURC|AUGRC|Risk@)")] if not summ.empty else summ
    if summ.empty:
        return []
    out: list[Block] = [
        Heading("Selective retrieval"),
        Para(
            "Abstain on the queries the score is least sure of: how the retrieval error of the "
            "answered queries falls as fewer are answered (docs/selective-risk.md). results.csv "
            "names the metrics `<metric>:<score>`.",
            note=True,
        ),
    ]
    out += selective_tables(summ, run.methods, how, f" (seed {run.seeds[0]})" if len(run.seeds) == 1 else "")
    seed = run.seeds[0]
    pq = {m: a for m in run.methods if (a := run.perquery(m, seed)) is not None}
    fig = risk_coverage_figure(pq, ordered(summ["score"]))
    if fig is not None:
        out.append(
            Figure(
                "risk_coverage",
                f"Risk-coverage curves per score (seed {seed}): selective risk "
                "1 - precision@1 against coverage.",
                P.png_bytes(fig),
            )
        )
    return out
