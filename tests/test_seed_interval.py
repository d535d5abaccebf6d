"""Intervals across seeds (bench/metrics/seed_interval.py): inside the metric's range, equal to an
independent computation with scipy on the transformed scale, and absent below three seeds."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from bench.metrics.seed_interval import MIN_SEEDS, metric_range, seed_interval


def _scipy_interval(v, forward, inverse, level=0.95):
    """The reference: scipy's t.interval of the transformed values' mean, mapped back."""
    z = forward(np.asarray(v, float))
    lo, hi = stats.t.interval(level, len(z) - 1, loc=z.mean(), scale=stats.sem(z))
    return inverse(lo), inverse(hi)


def test_the_issue_case_stays_in_range_where_the_t_interval_does_not():
    """Seeds that disagree: the raw t-interval leaves [0, 1] (as the issue's AUROC [0.362, 1.177])."""
    v = [0.55, 0.97, 0.99]
    half = stats.t.ppf(0.975, 2) * np.std(v, ddof=1) / math.sqrt(3)
    assert np.mean(v) + half > 1  # the old interval
    mean, lo, hi = seed_interval(v, "AUROC[mnist]")
    assert mean == pytest.approx(np.mean(v)) and 0 < lo < mean < hi < 1


@pytest.mark.parametrize(
    "metric, forward, inverse",
    [
        ("AUROC[mnist]:trace", special.logit, special.expit),
        ("mAP@1", special.logit, special.expit),
        ("FPR95[heldout]", special.logit, special.expit),
        ("Spearman", lambda v: special.logit((v + 1) / 2), lambda z: 2 * special.expit(z) - 1),
        ("var_ratio[mnist]", np.log, np.exp),
        ("some_new_metric", lambda v: v, lambda z: z),
    ],
)
def test_against_scipy_on_the_transformed_scale(metric, forward, inverse):
    v = [0.41, 0.52, 0.47, 0.60]
    _, lo, hi = seed_interval(v, metric, 0.9)
    ref = _scipy_interval(v, forward, inverse, 0.9)
    assert (lo, hi) == pytest.approx(ref, rel=1e-9)


def test_too_few_seeds_give_no_interval():
    for v in ([0.7], [0.7, 0.8], [0.7, np.nan, 0.9]):
        mean, lo, hi = seed_interval(v, "AUROC[mnist]")
        assert np.isfinite(mean) and np.isnan(lo) and np.isnan(hi)
    assert MIN_SEEDS == 3 and np.isnan(seed_interval([], "mAP@1")[0])


def test_ranges_by_metric_name():
    assert metric_range("AUPR[heldout]:dist_var") == (0.0, 1.0)
    assert metric_range("AURG") == (-1.0, 1.0)
    assert metric_range("var_ratio[mnist]")[0] == 0 and math.isinf(metric_range("seconds")[1])
    assert metric_range("unknown") is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=3, max_size=6),
    st.sampled_from(["AUROC[x]", "ECE", "Recall@5", "FPR95[x]"]),
)
def test_bounded_intervals_never_leave_the_unit_range(v, metric):
    mean, lo, hi = seed_interval(v, metric)
    assert 0.0 <= lo <= hi <= 1.0 and 0.0 <= mean <= 1.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0), min_size=3, max_size=6))
def test_signed_intervals_stay_in_minus_one_one(v):
    _, lo, hi = seed_interval(v, "Spearman")
    assert -1.0 <= lo <= hi <= 1.0
