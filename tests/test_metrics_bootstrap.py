"""Bootstrap CIs: coverage at about the nominal rate in simulation, multi-output statistics, paired groups."""

import numpy as np
import pytest
from scipy import stats

from bench.metrics.bootstrap import bootstrap_ci, bootstrap_mean_ci, grouped_bootstrap_ci
from bench.metrics.ood import ood_metrics_ci

TRIALS = 200


def test_mean_ci_covers_true_mean_at_nominal_rate():
    rng = np.random.default_rng(0)
    data = rng.normal(0.3, 1.0, size=(TRIALS, 80))
    hits = 0
    for t in range(TRIALS):
        _, lo, hi = bootstrap_mean_ci(data[t], n_resamples=400, seed=t)
        hits += lo <= 0.3 <= hi
    assert 0.89 <= hits / TRIALS <= 0.99  # nominal 0.95; binomial sd over 200 trials ~ 0.015


def test_stratified_auroc_ci_covers_true_auroc_at_nominal_rate():
    true = stats.norm.cdf(1.0 / np.sqrt(2.0))  # AUROC of N(1, 1) vs N(0, 1)
    rng = np.random.default_rng(1)
    hits = 0
    for t in range(TRIALS):
        a, b = rng.normal(0, 1, 120), rng.normal(1, 1, 80)
        _, lo, hi = ood_metrics_ci(a, b, n_resamples=300, seed=t)["AUROC"]
        hits += lo <= true <= hi
    assert 0.88 <= hits / TRIALS <= 0.99


def test_mean_ci_edge_cases():
    assert np.isnan(bootstrap_mean_ci(np.array([1.0]))[1])
    assert bootstrap_mean_ci(np.full(5, 2.0)) == (2.0, 2.0, 2.0)
    v, lo, hi = bootstrap_mean_ci(np.array([0.0, 1.0, np.nan, 1.0]), n_resamples=0)
    assert v == pytest.approx(2 / 3) and np.isnan(lo) and np.isnan(hi)


def _mean_and_sd(x, axis=-1):
    return np.stack([x.mean(axis=axis), x.std(axis=axis)])


def test_multi_output_percentile_is_reproducible_and_brackets_estimate():
    x = np.random.default_rng(2).exponential(1.0, 300)
    r1 = bootstrap_ci((x,), _mean_and_sd, n_resamples=500, seed=3)
    r2 = bootstrap_ci((x,), _mean_and_sd, n_resamples=500, seed=3)
    assert r1.value == pytest.approx([x.mean(), x.std()])
    assert np.array_equal(r1.low, r2.low) and np.array_equal(r1.high, r2.high)
    assert np.all(r1.low <= r1.value) and np.all(r1.value <= r1.high)
    assert r1.distribution.shape == (2, 500)


def test_no_resamples_or_tiny_samples_give_nan_interval():
    def stat(a, axis=-1):
        return a.mean(axis=axis)[None]

    assert np.isnan(bootstrap_ci((np.arange(5.0),), stat, n_resamples=0).low[0])
    assert np.isnan(bootstrap_ci((np.array([1.0]),), stat).high[0])


def test_grouped_keeps_pairs_and_strata():
    rng = np.random.default_rng(5)
    a = rng.random(100)

    def diff(x, y, axis=-1):
        return (x - y).mean(axis=axis)[None]

    # paired: a constant per-query difference survives every resample exactly
    assert grouped_bootstrap_ci([(a + 0.1, a)], diff, n_resamples=200).triple() == pytest.approx(
        (0.1, 0.1, 0.1)
    )

    # strata: each group keeps its own size (a statistic returning the sizes never varies)
    def sizes(x, y, axis=-1):
        return np.stack([np.full(x.shape[:-1], x.shape[-1]), np.full(y.shape[:-1], y.shape[-1])])

    r = grouped_bootstrap_ci([(a,), (a[:30],)], sizes, n_resamples=50)
    assert list(r.low) == [100, 30] and list(r.high) == [100, 30]
    with pytest.raises(ValueError):
        grouped_bootstrap_ci([(a, a[:5])], diff)
