"""The sort-once bootstrap statistics equal the statistics of the expanded resample (items repeated by
their multiplicities), ties included, and the count bootstrap draws Multinomial(n, 1/n) resamples."""

import numpy as np
import pytest

from bench.metrics.bootstrap import bootstrap_ci, count_bootstrap_ci, resample_counts
from bench.metrics.calibration import ece
from bench.metrics.ood import ood_metrics_ci, ood_statistics
from bench.metrics.ranking import ranking_metrics, ranking_statistics
from bench.metrics.weighted import CalibrationSort, OODSort, RankingSort


def _counts(rng, rows, n):
    return resample_counts(n, rows, rng)


def _expand(w, *arrays):
    """Each row of multiplicities w [R, n] as the resample it stands for (items repeated)."""
    return [[np.repeat(a, w[r].astype(int)) for a in arrays] for r in range(w.shape[0])]


@pytest.mark.parametrize("ties", [False, True])
def test_ood_weighted_equals_the_statistics_of_the_expanded_resample(ties):
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 60), rng.normal(0.7, 1, 40)
    if ties:
        a, b = np.round(a * 2) / 2, np.round(b * 2) / 2
    ca, cb = _counts(rng, 7, 60), _counts(rng, 7, 40)
    got = OODSort(a, b).weighted(ca, cb)
    for r in range(7):
        ea, eb = _expand(ca[r : r + 1], a)[0][0], _expand(cb[r : r + 1], b)[0][0]
        np.testing.assert_allclose(got[:, r], ood_statistics(ea, eb), rtol=1e-12)
    np.testing.assert_allclose(
        OODSort(a, b).weighted(np.ones((1, 60)), np.ones((1, 40)))[:, 0], ood_statistics(a, b)
    )


@pytest.mark.parametrize("ties", [False, True])
def test_ece_weighted_equals_ece_of_the_expanded_resample(ties):
    rng = np.random.default_rng(1)
    p, c = rng.random(80), (rng.random(80) < 0.6).astype(float)
    if ties:
        p = np.round(p * 4) / 4  # a step-function confidence map: long tie runs fill several bins
    w = _counts(rng, 6, 80)
    top = np.argsort(p)[-5:]  # the most confident items absent from resample 0: a zero-weight run at the end
    w[0, np.argsort(p)[0]] += w[0, top].sum()
    w[0, top] = 0
    got = CalibrationSort(p, c, 10).weighted(w)[0]
    want = [ece(ep, ec, 10) for ep, ec in _expand(w, p, c)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_ranking_weighted_equals_the_statistics_of_the_expanded_resample():
    """Distinct scores: every statistic exactly; with tied scores, all but the sparsification pair, whose
    tie order differs (the resample takes tied queries in resample order, the sort-once path in the
    original order: RankingSort's docstring)."""
    rng = np.random.default_rng(2)
    n = 90
    y = rng.integers(0, 4, n)
    m = (rng.random(n) < 0.4 + 0.1 * y).astype(float)
    u = rng.normal(0, 1, n) - 0.5 * m
    w = _counts(rng, 6, n)
    for scores, check in ((u, slice(0, 5)), (np.round(u), slice(2, 5))):
        got = RankingSort(scores, m, y).weighted(w)
        for r, (eu, em, ey) in enumerate(_expand(w, scores, m, y)):
            np.testing.assert_allclose(
                got[check, r], ranking_statistics(eu, em, ey)[check], rtol=1e-10, atol=1e-12
            )
    point = RankingSort(np.round(u), m, y).weighted(np.ones((1, n)))[:, 0]
    np.testing.assert_allclose(point, ranking_statistics(np.round(u), m, y), rtol=1e-12)


def test_resample_counts_are_multinomial_resamples():
    w = resample_counts(50, 4000, np.random.default_rng(3))
    assert w.shape == (4000, 50) and (w.sum(1) == 50).all()
    assert w.mean() == pytest.approx(1.0) and w.var() == pytest.approx(
        1 - 1 / 50, rel=0.05
    )  # Binomial(50, 1/50)


def test_count_bootstrap_intervals_agree_with_the_resampling_bootstrap():
    """Same percentile bootstrap, other random draws: the interval ends agree to Monte Carlo error."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, 300), rng.normal(0.5, 1, 200)
    new = ood_metrics_ci(a, b, n_resamples=2000, seed=0)
    old = bootstrap_ci((a, b), ood_statistics, n_resamples=2000, seed=0, paired=False)
    for i, k in enumerate(("AUROC", "AUPR", "FPR95", "var_ratio")):
        v, lo, hi = new[k]
        assert v == pytest.approx(old.value[i])
        width = old.high[i] - old.low[i]
        assert abs(lo - old.low[i]) < 0.1 * width and abs(hi - old.high[i]) < 0.1 * width
    y = rng.integers(0, 3, 300)
    m = (rng.random(300) < 0.6).astype(float)
    u = rng.normal(0, 1, 300) - m
    got = ranking_metrics(u, m, y, n_resamples=2000, seed=0)

    def stat(uu, mm, cc, axis=-1):
        return ranking_statistics(uu, mm, cc.astype(np.int64), axis)

    ref = bootstrap_ci((u, m, y.astype(float)), stat, n_resamples=2000, seed=0, paired=True)
    for i, k in enumerate(("AUSE", "AURG", "R-AUROC", "Spearman", "Spearman_within")):
        width = ref.high[i] - ref.low[i]
        assert got[k][0] == pytest.approx(ref.value[i])
        assert abs(got[k][1] - ref.low[i]) < 0.1 * width and abs(got[k][2] - ref.high[i]) < 0.1 * width


def test_count_bootstrap_is_reproducible_and_keeps_strata():
    sizes = lambda ca, cb: np.stack([ca.sum(-1), cb.sum(-1)])  # noqa: E731
    r = count_bootstrap_ci((30, 12), sizes, n_resamples=50, seed=1)
    assert list(r.low) == [30, 12] and list(r.high) == [30, 12]
    mean = lambda c: (c * np.arange(20.0)).sum(-1)[None] / 20  # noqa: E731
    r1, r2 = count_bootstrap_ci((20,), mean, 300, seed=5), count_bootstrap_ci((20,), mean, 300, seed=5)
    assert r1.triple() == r2.triple() and r1.low[0] < 9.5 < r1.high[0]
    assert np.isnan(count_bootstrap_ci((1,), mean, 100).low[0]) and np.isnan(
        count_bootstrap_ci((20,), mean, 0).high[0]
    )


def test_cumsum_rows_is_numpys_cumsum_bit_for_bit():
    """The bootstraps' cumulative sums through torch's kernel: the same float64 numbers as np.cumsum
    (reals of mixed scale, counts, a transposed layout, one row, 3-d)."""
    from bench.metrics.weighted import cumsum_rows

    rng = np.random.default_rng(3)
    cases = [
        rng.standard_normal((50, 3001)) * rng.random((50, 3001)) * 1e4,
        rng.integers(0, 5, (40, 2000)).astype(np.float64),
        (rng.standard_normal((300, 20)) ** 3).T,
        rng.random((1, 7)),
        rng.standard_normal((2, 3, 500)),
    ]
    for x in cases:
        assert np.array_equal(cumsum_rows(x), np.cumsum(x, axis=-1))
