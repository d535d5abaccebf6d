"""Across-seed summaries, paired differences from per-query arrays, and the stage breakdown."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.metrics.aggregate import PAIRED_COLUMNS, paired_differences, seed_summary, stage_breakdown
from bench.metrics.ood import auroc


def test_seed_summary_t_interval():
    """mAP@1 is in [0, 1]: the Student-t interval on the logit scale, mapped back (scipy's t.interval
    of the logits); an unbounded metric keeps the plain t-interval."""
    from scipy import special

    res = pd.DataFrame(
        {
            "method": ["a"] * 3 + ["b"] * 2 + ["c"] * 3,
            "seed": [0, 1, 2, 0, 1, 0, 1, 2],
            "metric": ["mAP@1"] * 3 + ["ECE"] * 2 + ["loss"] * 3,
            "value": [0.2, 0.4, 0.6, 0.5, np.nan, 1.0, 2.0, 3.0],
        }
    )
    s = seed_summary(res).set_index(["method", "metric"])
    z = special.logit([0.2, 0.4, 0.6])
    lo, hi = special.expit(stats.t.interval(0.95, 2, loc=z.mean(), scale=stats.sem(z)))
    assert s.loc[("a", "mAP@1"), "mean"] == pytest.approx(0.4) and s.loc[("a", "mAP@1"), "n_seeds"] == 3
    assert s.loc[("a", "mAP@1"), "t_low"] == pytest.approx(lo) and lo > 0
    assert s.loc[("a", "mAP@1"), "t_high"] == pytest.approx(hi) and hi < 1
    half = stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)
    assert s.loc[("c", "loss"), "t_low"] == pytest.approx(2 - half)
    assert s.loc[("c", "loss"), "t_high"] == pytest.approx(2 + half)
    # one finite seed: mean, NaN interval
    assert s.loc[("b", "ECE"), "mean"] == 0.5 and np.isnan(s.loc[("b", "ECE"), "t_low"])
    assert s.loc[("b", "ECE"), "n_seeds"] == 1


def test_stage_breakdown():
    t = pd.DataFrame(
        {
            "method": ["base", "la", "la", "la", "la"],
            "seed": [0, 0, 0, 1, 0],
            "stage": ["train", "hessian", "predict", "hessian", "custom"],
            "seconds": [2.0, 1.0, 0.5, 1.5, 1.0],
        }
    )
    b = stage_breakdown(t).set_index("method")
    assert list(b.columns) == ["train", "hessian", "prior", "predict", "evaluate", "custom", "total", "share"]
    assert b.loc["la", "hessian"] == 2.5 and b.loc["la", "prior"] == 0.0 and b.loc["la", "total"] == 4.0
    assert b.loc["base", "share"] == pytest.approx(2 / 6) and b["share"].sum() == pytest.approx(1.0)
    assert stage_breakdown(t.iloc[:0]).empty


@pytest.fixture
def perquery():
    rng = np.random.default_rng(0)
    n, n_ood = 60, 40

    def corr():
        return (rng.random(n) < 0.6).astype(float)

    base = dict(id_labels=np.arange(n) % 3, ood_far_labels=np.zeros(n_ood))
    plain = dict(
        base, id_mean=rng.random((n, 2)), ood_far_mean=rng.random((n_ood, 2)), **{"pq_mAP@1": corr()}
    )

    def mk(shift):
        return dict(
            base,
            id_mean=rng.random((n, 2)),
            id_var=rng.random((n, 2)),
            ood_far_mean=rng.random((n_ood, 2)),
            ood_far_var=rng.random((n_ood, 2)) + shift,
            extra_confidence=rng.random(n),
            **{"pq_mAP@1": corr()},
        )

    arrs = {"plain": plain, "la": mk(0.5), "ens": mk(0.1)}
    return {(m, 0): a for m, a in arrs.items()}, arrs


def test_paired_differences_from_per_query_arrays(perquery):
    pq, arrs = perquery
    p = paired_differences(pq, reference="plain", n_resamples=200)
    assert list(p.columns) == PAIRED_COLUMNS
    assert set(p["metric"]) == {"mAP@1"}  # plain has no uncertainty: nothing else can be paired
    row = p[p["method"] == "la"].iloc[0]
    assert row["diff"] == pytest.approx(arrs["la"]["pq_mAP@1"].mean() - arrs["plain"]["pq_mAP@1"].mean())
    assert row["ci_low"] <= row["diff"] <= row["ci_high"]

    q = paired_differences(pq, reference="ens", n_resamples=200)
    la = q[q["method"] == "la"].set_index("metric")
    assert {"mAP@1", "ECE", "AUSE", "AUROC[far]", "AUPR[far]", "FPR95[far]", "var_ratio[far]"} <= set(
        la.index
    )
    expect = auroc(arrs["la"]["id_var"].sum(1), arrs["la"]["ood_far_var"].sum(1)) - auroc(
        arrs["ens"]["id_var"].sum(1), arrs["ens"]["ood_far_var"].sum(1)
    )
    assert la.loc["AUROC[far]", "diff"] == pytest.approx(expect)
    assert la.loc["AUROC[far]", "ci_low"] <= expect <= la.loc["AUROC[far]", "ci_high"]
    only = paired_differences(pq, reference="ens", metrics=["AUROC[far]"], n_resamples=50)
    assert set(only["metric"]) == {"AUROC[far]"}


def test_method_against_itself_is_zero():
    rng = np.random.default_rng(1)
    a = dict(
        id_var=rng.random((30, 2)),
        ood_x_var=rng.random((20, 2)) + 1,
        extra_confidence=rng.random(30),
        **{"pq_mAP@1": (rng.random(30) < 0.5).astype(float)},
    )
    p = paired_differences({("a", 3): a, ("b", 3): a}, reference="b", n_resamples=100)
    assert len(p) == 1 + 2 + 4 and (p["seed"] == 3).all()
    assert np.allclose(p[["diff", "ci_low", "ci_high"]].to_numpy(), 0.0)
