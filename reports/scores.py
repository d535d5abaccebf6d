"""The uncertainty-score section of a run's report: for every method x score, whether the score
predicts the method's own retrieval errors (AUSE, AURG, R-AUROC, ECE), the confound diagnostics
(Spearman overall and within class), OOD separation per set, the best score of each method, which
method predicts its own errors best, and sparsification curves per score. Read from results.csv
and the saved score vectors alone; metric names follow `<metric>:<score>` (bench.conventions)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure

from bench.config import bootstrap_resamples
from bench.conventions import CORRECTNESS_METRIC, ID_SET, split_score_metric
from bench.evaluate import ALIASES
from bench.metrics.aggregate import seed_summary
from bench.metrics.paired import difference_ci, ranking_of
from bench.metrics.ranking import RANKING_METRICS
from bench.metrics.seed_interval import SEED_INTERVAL_NOTE
from bench.metrics.sparsification import FRACTIONS, sparsification_curves
from bench.run_folder import RunFolder, score_arrays
from reports import plots as P
from reports.formats import Block, Cell, Figure, Heading, Para, Table
from reports.tables import fmt_ci, ood_set, ordered

ID_COLUMNS = ("AUSE", "AURG", "R-AUROC", "ECE", "Spearman", "Spearman_within")
OOD_COLUMNS = ("AUROC", "FPR95")
SELECT_BY = "AURG"  # a method's best score: the largest gain over a random order (= the lowest AUSE)
COMPARE_BY = "R-AUROC"  # methods compared by their best score's error-detection AUROC (base-rate free)
CORRECT = f"pq_{CORRECTNESS_METRIC}"


def score_frame(results: pd.DataFrame) -> pd.DataFrame:
    """The per-score rows of results.csv with `metric` split into (metric, score): method, seed,
    metric (e.g. `AUROC[heldout]`), score, value, ci_low, ci_high."""
    parts = [split_score_metric(m) for m in results["metric"]]
    df = results.assign(metric=[p[0] for p in parts], score=[p[1] for p in parts])
    df = df[df["score"].notna()]
    for old, new in ALIASES.items():  # an alias row duplicates its new name; older folders have only the old
        df = df[df["metric"] != old] if (df["metric"] == new).any() else df.replace({"metric": {old: new}})
    return df.reset_index(drop=True)


def score_summary(run: RunFolder) -> tuple[pd.DataFrame, str]:
    """(method, score, metric, value, lo, hi, n) and how the interval was made: one seed, its
    bootstrap CI over queries; several seeds, the mean over seeds with its interval
    (`bench.metrics.seed_interval`)."""
    df = score_frame(run.results)
    level = float(run.config.get("ci_level", 0.95))
    if df.empty:
        return pd.DataFrame(columns=["method", "score", "metric", "value", "lo", "hi", "n"]), ""
    if df["seed"].nunique() == 1:
        out = df.rename(columns={"ci_low": "lo", "ci_high": "hi"}).assign(n=1)
        return out[
            ["method", "score", "metric", "value", "lo", "hi", "n"]
        ], f"{100 * level:g}% bootstrap CI over queries"
    per_score = run.results[[split_score_metric(m)[1] is not None for m in run.results["metric"]]]
    s = score_frame(seed_summary(per_score, level)).rename(
        columns={"mean": "value", "t_low": "lo", "t_high": "hi", "n_seeds": "n"}
    )
    return s[
        ["method", "score", "metric", "value", "lo", "hi", "n"]
    ], f"mean over {df['seed'].nunique()} seeds [{100 * level:g}% {SEED_INTERVAL_NOTE}]"


def _cell(rec: dict | None, bold_if=None) -> Cell:
    if rec is None:
        return Cell("–")
    bold = bool(bold_if(rec)) if bold_if is not None and np.isfinite([rec["lo"], rec["hi"]]).all() else False
    return Cell(fmt_ci(rec["value"], rec["lo"], rec["hi"]), bold)


def _beats_random(rec: dict) -> bool:
    return rec["lo"] > 0  # AURG CI above 0


def _negative(rec: dict) -> bool:
    return rec["hi"] < 0  # correlation CI below 0


BOLD_RULES = {
    "AURG": _beats_random,
    "R-AUROC": lambda r: r["lo"] > 0.5,
    "Spearman": _negative,
    "Spearman_within": _negative,
}


def score_tables(summ: pd.DataFrame, methods: list[str], how: str, suffix: str = "") -> list[Table]:
    """Method x score tables: the ID metrics, then AUROC / FPR95 per OOD set. A row is `method / score`;
    rows where every value is n/a (a predictive score of a deterministic method) are left out.
    `suffix` ends the titles (` (seed k)` for a one-seed run)."""
    idx = {(r["method"], r["score"], r["metric"]): r for r in summ.to_dict("records")}
    rows = [
        (m, s)
        for m in ordered(summ["method"], methods)
        for s in ordered(summ["score"])
        if any(np.isfinite(idx.get((m, s, c), {}).get("value", np.nan)) for c in ID_COLUMNS)
    ]
    id_rows = [
        [Cell(f"{m} / {s}")] + [_cell(idx.get((m, s, c)), BOLD_RULES.get(c)) for c in ID_COLUMNS]
        for m, s in rows
    ]
    sets = ordered(ood_set(x) for x in summ["metric"] if ood_set(x) is not None)
    ood_cols = [f"{c}[{s}]" for s in sets for c in OOD_COLUMNS]
    ood_rows = [[Cell(f"{m} / {s}")] + [_cell(idx.get((m, s, c))) for c in ood_cols] for m, s in rows]
    notes = [
        f"Cells: {how}. AURG = AUSE of a random order - AUSE: **bold** when its interval lies above 0 "
        "(the score's sparsification curve beats a random order); R-AUROC (P(score of a wrong query > "
        "score of a right one), chance 0.5, independent of the error rate): bold above 0.5; Spearman "
        "(score vs precision@1 correctness; negative = informative) overall and averaged within the "
        "queries' true classes: bold below 0. A score that is informative overall but not within class "
        "ranks classes, not queries."
    ]
    return [
        Table(
            "Uncertainty scores: do they predict the method's own retrieval errors? "
            f"(ID test queries){suffix}",
            ["method / score", "AUSE ↓", "AURG ↑", "R-AUROC ↑", "ECE ↓", "Spearman ↓", "Spearman_within ↓"],
            id_rows,
            notes,
        ),
        Table(
            f"Uncertainty scores: OOD separation (ID test queries vs each OOD set; OOD positive){suffix}",
            ["method / score", *[c + (" ↑" if c.startswith("AUROC") else " ↓") for c in ood_cols]],
            ood_rows,
        ),
    ]


def _seeds_beating_random(frame: pd.DataFrame, method: str, score: str) -> str:
    """`k/n`: on how many of the n seeds the bootstrap CI of AURG:<score> lies above 0."""
    d = frame[(frame["method"] == method) & (frame["score"] == score) & (frame["metric"] == SELECT_BY)]
    return f"{int((d['ci_low'] > 0).sum())}/{len(d)}"


def best_score_table(summ: pd.DataFrame, methods: list[str], frame: pd.DataFrame) -> Table | None:
    """Per method, the score with the largest AURG (lowest AUSE), whether it beats a random order (the
    interval of AURG above 0; and on how many seeds its bootstrap CI does, from `frame` =
    score_frame(results)), and its R-AUROC and within-class Spearman."""
    idx = {(r["method"], r["score"], r["metric"]): r for r in summ.to_dict("records")}
    out = []
    for m in ordered(summ["method"], methods):
        cands = [
            (idx[(m, s, SELECT_BY)]["value"], s)
            for s in ordered(summ["score"])
            if (m, s, SELECT_BY) in idx and np.isfinite(idx[(m, s, SELECT_BY)]["value"])
        ]
        if not cands:
            continue
        _, s = max(cands)
        a = idx[(m, s, SELECT_BY)]
        beats = "yes" if np.isfinite(a["lo"]) and a["lo"] > 0 else "no"
        out.append(
            [
                Cell(m),
                Cell(s),
                _cell(idx.get((m, s, "AUSE"))),
                _cell(a, _beats_random),
                Cell(beats, beats == "yes"),
                Cell(_seeds_beating_random(frame, m, s)),
                _cell(idx.get((m, s, COMPARE_BY))),
                _cell(idx.get((m, s, "Spearman_within")), _negative),
            ]
        )
    if not out:
        return None
    note = (
        "Chosen on the same queries it is scored on (the best of several scores: the interval of the chosen "
        "one is optimistic)."
    )
    return Table(
        "Best score per method (largest AURG = lowest AUSE)",
        [
            "method",
            "best score",
            "AUSE ↓",
            "AURG ↑",
            "beats random",
            "seeds: AURG CI > 0",
            "R-AUROC ↑",
            "Spearman_within ↓",
        ],
        out,
        [note],
    )


def method_comparison(run: RunFolder, summ: pd.DataFrame, methods: list[str]) -> tuple[Table | None, str]:
    """Methods ranked by the R-AUROC of their best score (by R-AUROC), and the paired bootstrap
    difference (same queries resampled for both; per seed) of the leader against every other method."""
    idx = {(r["method"], r["score"], r["metric"]): r for r in summ.to_dict("records")}
    best: dict[str, tuple[float, str]] = {}
    for m in ordered(summ["method"], methods):
        c = [
            (idx[(m, s, COMPARE_BY)]["value"], s)
            for s in ordered(summ["score"])
            if (m, s, COMPARE_BY) in idx and np.isfinite(idx[(m, s, COMPARE_BY)]["value"])
        ]
        if c:
            best[m] = max(c)
    if len(best) < 2:
        return None, ""
    order = sorted(best, key=lambda m: -best[m][0])
    leader, (_, lscore) = order[0], best[order[0]]
    cfg = run.config
    boot = dict(
        n_resamples=bootstrap_resamples(cfg),
        level=float(cfg.get("ci_level", 0.95)),
        seed=int(cfg.get("seed", 0)),
    )
    rows = []
    for m in order:
        v, s = best[m]
        diffs = []
        for seed in run.seeds:
            a, b = run.perquery(leader, seed), run.perquery(m, seed)
            if m == leader or a is None or b is None:
                continue
            ua, ub = score_arrays(a).get((ID_SET, lscore)), score_arrays(b).get((ID_SET, s))
            if ua is None or ub is None or CORRECT not in a or CORRECT not in b or ua.shape != ub.shape:
                continue
            r_auroc = [RANKING_METRICS.index("R-AUROC")]
            d = difference_ci(
                [(ranking_of(ua, a[CORRECT], r_auroc), ranking_of(ub, b[CORRECT], r_auroc))], **boot
            )
            d = d.triple()
            diffs.append(fmt_ci(*d, signed=True) + (f" (seed {seed})" if len(run.seeds) > 1 else ""))
        rows.append(
            [
                Cell(m, m == leader),
                Cell(s),
                _cell(idx.get((m, s, COMPARE_BY))),
                Cell("; ".join(diffs) if diffs else "–"),
            ]
        )
    note = (
        f"Each method with its best score by {COMPARE_BY} (chosen on the same queries: optimistic). "
        f"Last column: {COMPARE_BY} of {leader} / {lscore} minus this row's, paired bootstrap over the "
        "same queries per seed; an interval above 0 means the leader predicts its own errors better."
    )
    return Table(
        f"Which method predicts its own retrieval errors best ({COMPARE_BY} of its best score)",
        ["method", "score", f"{COMPARE_BY} ↑", f"{leader} − method"],
        rows,
        [note],
    ), leader


BASELINE = "knn_disagreement"  # the score that needs no predictive (bench/scores/knn_disagreement.py)


def baseline_comparison(run: RunFolder, summ: pd.DataFrame, methods: list[str]) -> Table | None:
    """Per method and seed: its best predictive score (largest mean AURG among the scores that need a
    predictive) minus the predictive-free BASELINE on the same method's mean embedding, in AURG and
    R-AUROC, paired bootstrap over the same queries (one resample for both scores)."""
    idx = {(r["method"], r["score"], r["metric"]): r for r in summ.to_dict("records")}
    cfg = run.config
    boot = dict(
        n_resamples=bootstrap_resamples(cfg),
        level=float(cfg.get("ci_level", 0.95)),
        seed=int(cfg.get("seed", 0)),
    )
    rows = []
    for m in ordered(summ["method"], methods):
        cands = [
            (idx[(m, s, SELECT_BY)]["value"], s)
            for s in ordered(summ["score"])
            if s != BASELINE and (m, s, SELECT_BY) in idx and np.isfinite(idx[(m, s, SELECT_BY)]["value"])
        ]
        if not cands:
            continue
        _, s = max(cands)
        for seed in run.seeds:
            a = run.perquery(m, seed)
            vecs = score_arrays(a) if a is not None else {}
            if (ID_SET, s) not in vecs or (ID_SET, BASELINE) not in vecs or CORRECT not in a:
                continue
            rows_ = [RANKING_METRICS.index("AURG"), RANKING_METRICS.index("R-AUROC")]
            ci = difference_ci(
                [
                    (
                        ranking_of(vecs[(ID_SET, s)], a[CORRECT], rows_),
                        ranking_of(vecs[(ID_SET, BASELINE)], a[CORRECT], rows_),
                    )
                ],
                **boot,
            )
            cells = [
                Cell(fmt_ci(*ci.triple(i), signed=True), bool(ci.low[i] > 0 or ci.high[i] < 0))
                for i in (0, 1)
            ]
            rows.append([Cell(m), Cell(str(seed)), Cell(s), *cells])
    if not rows:
        return None
    note = (
        f"Best predictive score (by mean AURG) minus `{BASELINE}` (no predictive: the label disagreement "
        "of the K nearest neighbours of the mean embedding), same method, same queries, paired bootstrap; "
        "**bold**: the interval excludes 0. Above 0: the predictive adds to what the mean embedding's "
        "neighbourhood already says."
    )
    return Table(
        f"Does the predictive beat the no-predictive baseline ({BASELINE})?",
        ["method", "seed", "score", "Δ AURG", "Δ R-AUROC"],
        rows,
        [note],
    )


def score_sparsification_figure(
    per_method: dict[str, dict[str, np.ndarray]], scores: list[str]
) -> MplFigure | None:
    """One panel per score: each method's sparsification gain S(f) - S_rand (mAP@1 of the queries
    left after removing the most uncertain fraction f, minus the mean over all queries: a random order
    is the 0 line), dashed: the oracle's gain. None without score vectors."""
    grid = P.score_panel_grid(per_method, scores, top=0.93)
    if grid is None:
        return None
    fig, axes, panels = grid
    for ax, s in zip(axes, panels):
        for i, (m, a) in enumerate(per_method.items()):
            u = score_arrays(a).get((ID_SET, s))
            if u is None or CORRECT not in a:
                continue
            c = np.asarray(a[CORRECT], float)
            curve, oracle = sparsification_curves(u, c)
            st = P.method_style(i)
            ax.plot(
                FRACTIONS,
                curve - c.mean(),
                color=st["color"],
                marker=st["marker"],
                linestyle=st["linestyle"],
                ms=3,
                lw=1.6,
                label=m,
            )
            ax.plot(FRACTIONS, oracle - c.mean(), color=st["color"], lw=0.8, alpha=0.6, linestyle="--")
        ax.axhline(0, color="black", lw=1, linestyle=":")
        ax.set_title(s)
        ax.set_xlabel("fraction removed (most uncertain first)")
        ax.set_ylabel("mAP@1 gain over random")
        ax.grid(alpha=0.3)
    P.finish_panels(fig, axes, len(panels))
    fig.suptitle(
        "Sparsification per score: gain over a random order (dotted 0); thin dashed: each method's oracle"
    )
    return fig


def score_blocks(run: RunFolder) -> list[Block]:
    """The report section on uncertainty scores (nothing for runs without per-score metrics)."""
    summ, how = score_summary(run)
    if summ.empty:
        return []
    methods = run.methods
    cfg = run.config
    out: list[Block] = [
        Heading("Uncertainty scores"),
        Para(
            f"Every uncertainty score (bench/scores/) for every method; results.csv names them "
            f"`<metric>:<score>`. The headline ECE/AUSE/AURG above use `id_score` = "
            f"`{cfg.get('id_score', 'trace')}`, the headline OOD metrics `ood_score` = "
            f"`{cfg.get('ood_score', 'trace')}`.",
            note=True,
        ),
    ]
    out += score_tables(summ, methods, how, f" (seed {run.seeds[0]})" if len(run.seeds) == 1 else "")
    t = best_score_table(summ, methods, score_frame(run.results))
    if t is not None:
        out.append(t)
    cmp_table, _ = method_comparison(run, summ, methods)
    if cmp_table is not None:
        out.append(cmp_table)
    base = baseline_comparison(run, summ, methods)
    if base is not None:
        out.append(base)
    seed = run.seeds[0]
    pq = {m: a for m in methods if (a := run.perquery(m, seed)) is not None}
    fig = score_sparsification_figure(pq, ordered(summ["score"]))
    if fig is not None:
        out.append(
            Figure(
                "sparsification_scores",
                f"Sparsification curves per score (seed {seed}), as gain over a "
                "random order of the same method's queries.",
                P.png_bytes(fig),
            )
        )
    return out
