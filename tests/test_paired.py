"""Paired differences from sort-once statistics (bench.metrics.paired) against resampling the arrays and
recomputing each statistic (grouped_bootstrap_ci with the plain metric functions): same seed, same
resamples, so the same point estimate and interval up to rounding."""

from __future__ import annotations

import numpy as np
import pytest

from bench.metrics.bootstrap import grouped_bootstrap_ci
from bench.metrics.calibration import DEFAULT_BINS, ece
from bench.metrics.ood import ood_statistics
from bench.metrics.paired import difference_ci, ece_of, mean_of, ood_of, ranking_of
from bench.metrics.ranking import RANKING_METRICS, ranking_statistics


def _data(seed: int, n: int = 60, n_ood: int = 35):
    r = np.random.default_rng(seed)
    tied = lambda k: np.round(np.exp(r.normal(size=k)), 1)  # noqa: E731  (positive, tied, as variances)
    return dict(
        ua=tied(n),
        ub=tied(n),
        ca=(r.random(n) < 0.6).astype(float),
        cb=(r.random(n) < 0.7).astype(float),
        pa=r.random(n),
        pb=r.random(n),
        oa=tied(n_ood) + 0.5,
        ob=tied(n_ood) + 0.2,
    )


def _zeros(u):
    return np.zeros(np.shape(u), np.int64)


@pytest.mark.parametrize("row", ["R-AUROC", "Spearman"])
def test_ranking_difference_equals_resampling(row):
    d, k = _data(0), RANKING_METRICS.index(row)
    fast = difference_ci(
        [(ranking_of(d["ua"], d["ca"], [k]), ranking_of(d["ub"], d["cb"], [k]))], 400, seed=3
    )

    def slow(ua, ca, ub, cb, axis=-1):
        return (
            ranking_statistics(ua, ca, _zeros(ua), axis)[k] - ranking_statistics(ub, cb, _zeros(ub), axis)[k]
        )[None]

    ref = grouped_bootstrap_ci([(d["ua"], d["ca"], d["ub"], d["cb"])], slow, 400, seed=3)
    np.testing.assert_allclose(fast.triple(), ref.triple(), rtol=1e-10, atol=1e-12)
    assert fast.low[0] < fast.high[0]


def test_ood_ece_and_mean_differences_equal_resampling_over_two_seeds():
    d0, d1 = _data(1), _data(2, n=50, n_ood=40)
    fast = difference_ci(
        [(ood_of(d["ua"], d["oa"]), ood_of(d["ub"], d["ob"])) for d in (d0, d1)], 300, seed=5
    )

    def slow(*a, axis=-1):
        return np.mean(
            [
                ood_statistics(a[i], a[i + 2], axis=axis) - ood_statistics(a[i + 1], a[i + 3], axis=axis)
                for i in (0, 4)
            ],
            axis=0,
        )

    groups = [g for d in (d0, d1) for g in ((d["ua"], d["ub"]), (d["oa"], d["ob"]))]
    ref = grouped_bootstrap_ci(groups, slow, 300, seed=5)
    for i in range(4):
        np.testing.assert_allclose(fast.triple(i), ref.triple(i), rtol=1e-10, atol=1e-12)

    fast = difference_ci([(ece_of(d0["pa"], d0["ca"]), ece_of(d0["pb"], d0["cb"]))], 300, seed=1)
    ref = grouped_bootstrap_ci(
        [(d0["pa"], d0["ca"], d0["pb"], d0["cb"])],
        lambda pa, ca, pb, cb, axis=-1: (ece(pa, ca, DEFAULT_BINS, axis) - ece(pb, cb, DEFAULT_BINS, axis))[
            None
        ],
        300,
        seed=1,
    )
    np.testing.assert_allclose(fast.triple(), ref.triple(), rtol=1e-10, atol=1e-12)

    va, vb = d0["pa"].copy(), d0["pb"]
    va[3] = np.nan  # a query without a value on one side: nanmean, as the criterion's mean
    fast = difference_ci([(mean_of(va), mean_of(vb))], 300, seed=2)
    ref = grouped_bootstrap_ci(
        [(va, vb)], lambda a, b, axis=-1: (np.nanmean(a, axis) - np.nanmean(b, axis))[None], 300, seed=2
    )
    np.testing.assert_allclose(fast.triple(), ref.triple(), rtol=1e-10, atol=1e-12)


def test_sides_over_different_query_sets_are_refused():
    d = _data(0)
    with pytest.raises(ValueError, match="different query sets"):
        difference_ci([(mean_of(d["ua"]), mean_of(d["oa"]))])
