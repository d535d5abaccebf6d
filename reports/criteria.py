"""The criteria a reader chooses a method by, in one list: which metric of the run folder answers each
question, its direction, and how two methods are compared on the same queries (paired bootstrap).
The findings, the rank heat-map, the quality-vs-cost plot, the per-criterion detail tables and the
terminal summary all iterate over `criteria(run)`: a new criterion (e.g. a selective-risk metric) is
one more entry in `criteria()` below, and needs no edit elsewhere."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bench.conventions import CORRECTNESS_METRIC, ID_SET, NEAR_OOD_SET, score_metric, split_score_metric
from bench.metrics.paired import Weighted, difference_ci, ece_of, mean_of, ood_of, ranking_of
from bench.metrics.ranking import RANKING_METRICS
from bench.metrics.seed_interval import seed_interval
from bench.metrics.uncertainty import score_from_var
from bench.run_folder import RunFolder, score_arrays

COST = "seconds"  # the cost criterion's pseudo-metric: wall time incl. the base-training share
CORRECT = f"pq_{CORRECTNESS_METRIC}"


@dataclass(frozen=True)
class Criterion:
    """One question a reader asks of a run, answered by one metric.

    key: short id (figure names, anchors); title: the criterion in words; question: the plain-language
    question the findings sentence answers; metric: the results.csv metric (COST for the wall time);
    higher: whether larger is better; label: its terminal-summary column (<= 10 characters);
    paired: how two methods' difference is bootstrapped on the same queries (`mean`, `ranking`,
    `ood`, `ece`; None: no paired test); score: the uncertainty score the metric is of; ood_set: the
    OOD set of an OOD criterion; detail: metrics shown beside it in its detail table (prefixes of
    results.csv names, matched with the same score / set); companion: a second metric whose value for
    the best method the findings sentence quotes."""

    key: str
    title: str
    question: str
    metric: str
    higher: bool
    label: str
    paired: str | None = None
    score: str | None = None
    ood_set: str | None = None
    detail: tuple[str, ...] = field(default_factory=tuple)
    companion: str | None = None


def _present(run: RunFolder, metric: str) -> bool:
    return bool((run.results["metric"] == metric).any()) if not run.results.empty else False


def ood_sets(run: RunFolder) -> list[str]:
    """The run's OOD sets (from the `AUROC[<set>]` rows), the near-OOD set first."""
    sets = []
    for m in dict.fromkeys(run.results["metric"]) if not run.results.empty else []:
        base, score = split_score_metric(m)
        if base.startswith("AUROC[") and base.endswith("]"):
            sets.append(base[6:-1])
    sets = list(dict.fromkeys(sets))
    near = run.near_ood_sets()
    return sorted(sets, key=lambda s: s not in near)


def error_metric(run: RunFolder, name: str, score: str | None) -> str:
    """The headline name of an ID ranking metric when results.csv has it, else `<name>:<id score>`."""
    return name if _present(run, name) or score is None else score_metric(name, score)


def criteria(run: RunFolder) -> list[Criterion]:
    """The criteria of this run, in report order; those without any value in the run are left out.
    Add a criterion here (and nowhere else)."""
    cfg = run.config
    id_score, ood_score = cfg.get("id_score"), cfg.get("ood_score")
    out = [
        Criterion(
            "retrieval",
            "Retrieval",
            "Which method puts a correct item first most often?",
            "mAP@1",
            True,
            "mAP@1",
            "mean",
            detail=("mAP@", "Recall@", "MAP@R"),
        ),
        Criterion(
            "errors",
            "Predicting its own errors",
            "Whose uncertainty best tells its wrong retrievals from its right ones?",
            error_metric(run, "R-AUROC", id_score),
            True,
            "R-AUROC",
            "ranking",
            id_score,
            detail=("R-AUROC", "AURG", "AUSE", "Spearman"),
            companion=error_metric(run, "AURG", id_score),
        ),
    ]
    sets, near_sets = ood_sets(run), run.near_ood_sets()
    far = [s for s in sets if s not in near_sets]
    for s in sets:
        near = s in near_sets
        label = "near AUROC" if near else ("far AUROC" if len(far) == 1 else f"far:{s}"[:10])
        out.append(
            Criterion(
                f"ood_{s}",
                f"{'Near' if near else 'Far'}-OOD detection ({s})",
                f"Whose uncertainty best separates "
                f"{'held-out classes' if s == NEAR_OOD_SET else s} from ID queries?",
                f"AUROC[{s}]",
                True,
                label,
                "ood",
                ood_score,
                s,
                detail=(f"AUROC[{s}]", f"AUPR[{s}]", f"FPR95[{s}]"),
            )
        )
    out += [
        Criterion(
            "calibration",
            "Calibration",
            "Whose confidence matches how often its top-1 is right?",
            "ECE",
            False,
            "ECE",
            "ece",
            id_score,
            detail=("ECE",),
        ),
        Criterion(
            "cost",
            "Cost",
            "Which method is cheapest (wall time, its share of the base training included)?",
            COST,
            False,
            "seconds",
        ),
    ]
    return [c for c in out if c.metric == COST or _present(run, c.metric)]


# ---- values -------------------------------------------------------------------------------------


def cost_frame(run: RunFolder) -> pd.DataFrame:
    """(method, seed, value): wall seconds of each (method, seed), post-hoc methods including the base
    training they share (charged to the pseudo-method `base`)."""
    from bench.conventions import BASE_METHOD as BASE

    t = run.timings
    if t.empty:
        return pd.DataFrame(columns=["method", "seed", "value"])
    per = t.groupby(["method", "seed"], sort=False)["seconds"].sum().reset_index()
    base = per[per["method"] == BASE].set_index("seed")["seconds"]
    post_hoc = run.post_hoc_methods()
    if post_hoc is None:  # older folders: methods that trained nothing themselves
        trained = set(t[t["stage"] == "train"]["method"])
        post_hoc = set(per["method"]) - trained
    per = per[per["method"] != BASE]
    share = per["seed"].map(base).fillna(0.0) * per["method"].isin(post_hoc)
    return per.assign(value=per["seconds"] + share)[["method", "seed", "value"]]


def criterion_values(run: RunFolder, c: Criterion) -> pd.DataFrame:
    """(method, value, lo, hi) of a criterion, in the run's method order: one seed, the value and its
    bootstrap CI over queries; several seeds, the mean and its interval across seeds, which stays in
    the metric's range and is NaN below 3 seeds (`bench.metrics.seed_interval`; cost: seconds, log
    scale)."""
    from reports.tables import ci_level

    if c.metric == COST:
        long = cost_frame(run)
    else:
        r = run.results
        long = r[r["metric"] == c.metric].rename(columns={"ci_low": "lo", "ci_high": "hi"})
    rows = []
    for m in run.methods:
        d = long[long["method"] == m]
        v = d["value"].astype(float).to_numpy()
        if len(v) == 0 or not np.isfinite(v).any():
            rows.append({"method": m, "value": np.nan, "lo": np.nan, "hi": np.nan})
            continue
        if len(v) == 1:
            lo, hi = (float(d["lo"].iloc[0]), float(d["hi"].iloc[0])) if "lo" in d else (np.nan, np.nan)
            rows.append({"method": m, "value": float(v[0]), "lo": lo, "hi": hi})
            continue
        mean, lo, hi = seed_interval(v, c.metric, ci_level(run))
        rows.append({"method": m, "value": mean, "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=["method", "value", "lo", "hi"])


# ---- paired comparison --------------------------------------------------------------------------


def _score(arrs: dict[str, np.ndarray], query_set: str, score: str | None) -> np.ndarray | None:
    """The saved vector of `score` on a query set; older folders: tr Sigma from the variances."""
    saved = score_arrays(arrs)
    if saved:
        return saved.get((query_set, score))
    v = arrs.get("id_var" if query_set == ID_SET else f"ood_{query_set}_var")
    return None if v is None else score_from_var(v)


def _side(c: Criterion, arrs: dict[str, np.ndarray]) -> Weighted | None:
    """The criterion's statistic of one method from its per-query arrays, as a function of the queries'
    multiplicities (`bench.metrics.paired`); None when the arrays are missing."""
    if c.paired == "mean":
        v = arrs.get(f"pq_{split_score_metric(c.metric)[0]}")
        return None if v is None else mean_of(v)
    if c.paired in ("ranking", "ece"):
        u = _score(arrs, ID_SET, c.score) if c.paired == "ranking" else arrs.get("extra_confidence")
        m = arrs.get(CORRECT)
        if u is None or m is None or u.shape != m.shape:
            return None
        if c.paired == "ece":
            return ece_of(u, m)
        return ranking_of(u, m, [RANKING_METRICS.index(split_score_metric(c.metric)[0])])
    if c.paired == "ood":
        i, o = _score(arrs, ID_SET, c.score), _score(arrs, c.ood_set, c.score)
        return None if i is None or o is None else ood_of(i, o, [0])
    return None


def paired_difference(
    run: RunFolder, c: Criterion, a: str, b: str, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(diff, lo, hi) of value(a) - value(b), averaged over the seeds both ran, with a percentile
    bootstrap CI that resamples the same queries for both methods (ID and OOD queries separately,
    each seed's queries separately); NaNs when the run folder lacks the per-query arrays."""
    nan = (np.nan, np.nan, np.nan)
    if c.paired is None:
        return nan
    pairs = []
    for s in run.seeds:
        pa, pb = run.perquery(a, s), run.perquery(b, s)
        sa, sb = (_side(c, pa) if pa else None), (_side(c, pb) if pb else None)
        if sa is None or sb is None or sa.sizes != sb.sizes:
            continue
        pairs.append((sa, sb))
    if not pairs:
        return nan
    return difference_ci(pairs, n_resamples, level, seed).triple()
