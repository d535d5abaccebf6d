"""The confound diagnostics against scipy.stats.spearmanr: overall, averaged within class, vectorised
rows, undefined classes skipped; the fused ranking statistics against the separate functions; CIs."""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from bench.metrics.correlation import spearman, within_class_spearman
from bench.metrics.ranking import ranking_metrics, ranking_statistics
from bench.metrics.sparsification import aurg, ause


def _data(seed=0, n=240, classes=4):
    rng = np.random.default_rng(seed)
    u = np.round(rng.random(n), 2)  # ties in the score
    y = rng.integers(0, classes, n)
    c = (rng.random(n) < 0.3 + 0.5 * (u < 0.5) + 0.1 * (y == 0)).astype(float)
    return u, c, y


def test_spearman_equals_scipy():
    u, c, y = _data()
    assert spearman(u, c) == pytest.approx(stats.spearmanr(u, c).statistic, abs=1e-12)


def test_within_class_is_the_mean_of_scipy_per_class():
    u, c, y = _data(1)
    want = np.mean([stats.spearmanr(u[y == k], c[y == k]).statistic for k in np.unique(y)])
    assert within_class_spearman(u, c, y) == pytest.approx(want, abs=1e-12)


def test_undefined_classes_are_skipped_and_all_undefined_is_nan():
    u, c, y = _data(2)
    c[y == 1] = 1.0  # constant correctness in class 1: no rho there
    y[:1] = 7  # a class of one query
    ks = [k for k in np.unique(y) if k not in (1, 7)]
    want = np.mean([stats.spearmanr(u[y == k], c[y == k]).statistic for k in ks])
    assert within_class_spearman(u, c, y) == pytest.approx(want, abs=1e-12)
    assert np.isnan(within_class_spearman(u, np.ones_like(c), y))
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_vectorised_rows_equal_one_by_one():
    rows = [_data(s, n=90) for s in range(4)]
    U, C, Y = (np.stack([r[i] for r in rows]) for i in range(3))
    assert spearman(U, C) == pytest.approx([float(spearman(*r[:2])) for r in rows], abs=1e-12)
    assert within_class_spearman(U, C, Y) == pytest.approx(
        [float(within_class_spearman(*r)) for r in rows], abs=1e-12
    )


def test_confound_between_classes_shows_overall_not_within():
    """A score that only ranks classes (constant within each) correlates overall and not within."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 600)
    c = (rng.random(600) < np.array([0.9, 0.5, 0.2])[y]).astype(float)
    u = y + 0.0
    got = ranking_metrics(u, c, y, n_resamples=200, seed=0)
    rho, lo, hi = got["Spearman"]
    assert rho < -0.4 and lo <= rho <= hi < 0
    assert np.isnan(got["Spearman_within"][0])  # u is constant within every class
    u2 = u + rng.random(600) * 0.1  # noise within class: no within-class signal
    v, lo, hi = ranking_metrics(u2, c, y, n_resamples=200, seed=0)["Spearman_within"]
    assert lo < 0 < hi and abs(v) < 0.1


@pytest.mark.parametrize("binary", [True, False])
def test_fused_ranking_statistics_equal_the_separate_functions(binary):
    rows = [_data(s, n=120) for s in range(3)]
    U, C, Y = (np.stack([r[i] for r in rows]) for i in range(3))
    if not binary:
        C = C + np.round(np.random.default_rng(9).random(C.shape), 1)  # ties in a graded metric
    got = ranking_statistics(U, C, Y)
    assert got.shape == (5, 3)
    assert got[0] == pytest.approx(ause(U, C)) and got[1] == pytest.approx(aurg(U, C))
    assert got[3] == pytest.approx(spearman(U, C), abs=1e-12)
    assert got[4] == pytest.approx(within_class_spearman(U, C, Y), abs=1e-12)
    for i in range(3):
        assert got[3, i] == pytest.approx(stats.spearmanr(U[i], C[i]).statistic, abs=1e-12)
        if binary:
            assert got[2, i] == pytest.approx(roc_auc_score(1 - C[i], U[i]), abs=1e-12)
    assert np.isnan(got[2]).all() != binary  # error_AUROC needs a 0/1 correctness
