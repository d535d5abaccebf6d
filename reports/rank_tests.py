"""Verdicts across blocks (datasets x seeds x settings) of a grid: the Friedman test that all methods
rank alike (two methods: the Wilcoxon signed-rank test), then the Nemenyi post-hoc test (Demsar
2006): two methods differ when their mean ranks differ by more than the critical difference
CD = q_alpha sqrt(k (k + 1) / (6 N)), q_alpha the studentized range quantile over sqrt(2), k methods,
N blocks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


@dataclass
class RankVerdict:
    """mean_ranks: method -> mean rank over blocks (1 = best); p: Friedman p-value, Wilcoxon's for two
    methods (NaN when it cannot be computed: one method or one block); cd: Nemenyi critical difference
    at `alpha`; best: the best mean rank's method; tied: methods not significantly different from it."""

    mean_ranks: pd.Series
    n_blocks: int
    p: float
    cd: float
    best: str | None
    tied: list[str]


def nemenyi_cd(k: int, n_blocks: int, alpha: float = 0.05) -> float:
    """Critical difference of mean ranks for k methods over n_blocks blocks."""
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return float(q * np.sqrt(k * (k + 1) / (6.0 * n_blocks)))


def friedman_nemenyi(values: pd.DataFrame, higher: bool, alpha: float = 0.05) -> RankVerdict:
    """`values`: blocks (rows) x methods (columns); rows with a missing value are dropped (methods
    without any value first). Ranks within each block (1 = best, ties averaged)."""
    v = values.dropna(axis=1, how="all").dropna(axis=0, how="any")
    if v.shape[1] == 0 or v.shape[0] == 0:
        return RankVerdict(pd.Series(dtype=float), 0, np.nan, np.nan, None, [])
    ranks = (-v if higher else v).rank(axis=1, method="average")
    mean = ranks.mean(axis=0).sort_values(kind="stable")
    best = str(mean.index[0])
    k, n = v.shape[1], v.shape[0]
    if k == 2 and n >= 2:  # two methods: the Wilcoxon signed-rank test of their paired differences
        diff = (v[best] - v[str(mean.index[1])]).to_numpy(float)
        p = float(stats.wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
        return RankVerdict(mean, n, p, np.nan, best, [] if p < alpha else [str(mean.index[1])])
    if k < 3 or n < 2:
        return RankVerdict(mean, n, np.nan, np.nan, best, [str(m) for m in mean.index[1:]])
    arr = v.to_numpy(float)
    p = float(stats.friedmanchisquare(*arr.T).pvalue) if np.ptp(arr, axis=1).any() else 1.0
    cd = nemenyi_cd(k, n, alpha)
    if not p < alpha:  # the omnibus test finds no difference: every method is tied with the best
        return RankVerdict(mean, n, p, cd, best, [str(m) for m in mean.index[1:]])
    tied = [str(m) for m in mean.index[1:] if mean[m] - mean[best] <= cd]
    return RankVerdict(mean, n, p, cd, best, tied)


def significance_matrix(v: RankVerdict, alpha: float = 0.05) -> pd.DataFrame:
    """Methods x methods: 0 where the pair differs significantly, 1 where it does not (the diagonal 1),
    by the verdict's own test: Nemenyi's critical difference after a significant Friedman test (no pair
    differs when Friedman does not reject), Wilcoxon's p for two methods."""
    names = [str(m) for m in v.mean_ranks.index]
    r = v.mean_ranks.to_numpy(float)
    if len(names) == 2:
        sig = np.full((2, 2), 1.0)
        if v.p < alpha:
            sig[0, 1] = sig[1, 0] = 0.0
        return pd.DataFrame(sig, index=names, columns=names)
    differ = (np.abs(r[:, None] - r[None, :]) > v.cd) if v.p < alpha else np.zeros((len(r), len(r)), bool)
    return pd.DataFrame(np.where(differ, 0.0, 1.0), index=names, columns=names)


def cd_diagram(v: RankVerdict, title: str, alpha: float = 0.05):
    """Demsar's critical-difference diagram (scikit-posthocs' `critical_difference_diagram`): the mean
    ranks on an axis, bars joining methods not significantly different (`significance_matrix`), the
    CD in the title. A matplotlib Figure (Agg canvas), or None with fewer than 2 methods."""
    import scikit_posthocs as sp
    from matplotlib.figure import Figure

    if len(v.mean_ranks) < 2:
        return None
    k = len(v.mean_ranks)
    # room beside the axis for the longest label, "name (rank)" (grid axes make long names, e.g.
    # "laplace_torch [recipe=tuned]"): about 0.085 in per character of scikit-posthocs' 10 pt labels
    longest = max(len(f"{name} ({rank:.1f})") for name, rank in dict(v.mean_ranks).items())
    side = 0.085 * longest + 0.4
    width = max(8.0, 4.0 + 2 * side)
    fig = Figure(figsize=(width, 1.4 + 0.3 * k))
    ax = fig.subplots()
    sp.critical_difference_diagram(v.mean_ranks, significance_matrix(v, alpha), ax=ax, alpha=alpha)
    test = "Wilcoxon" if k == 2 else "Friedman"
    p = "n/a" if np.isnan(v.p) else f"{v.p:.2g}"
    cd = "" if np.isnan(v.cd) else f", Nemenyi CD {v.cd:.2f}"
    ax.set_title(f"{title}: mean rank over {v.n_blocks} blocks ({test} p={p}{cd})", fontsize=9)
    fig.subplots_adjust(left=side / width, right=1 - side / width, top=0.72, bottom=0.04)
    return fig
