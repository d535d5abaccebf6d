"""OOD separation metrics: hand-built cases with known answers and cross-checks against sklearn."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from bench.metrics.ood import OOD_METRICS, aupr, auroc, fpr_at_tpr, ood_metrics_ci, ood_statistics, var_ratio


def _sk(a, b):
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    s = np.r_[a, b]
    fpr, tpr, _ = roc_curve(y, s)
    return roc_auc_score(y, s), average_precision_score(y, s), fpr[np.argmax(tpr >= 0.95)]


def test_perfect_separation():
    a, b = np.arange(10.0), np.arange(10.0) + 100
    assert auroc(a, b) == 1.0 and aupr(a, b) == 1.0 and fpr_at_tpr(a, b) == 0.0
    # reversed: every OOD item is the most certain
    assert auroc(b, a) == 0.0 and fpr_at_tpr(b, a) == 1.0


def test_all_tied_scores_are_chance():
    a, b = np.ones(30), np.ones(10)
    assert auroc(a, b) == 0.5
    assert aupr(a, b) == pytest.approx(10 / 40)  # one threshold: precision = base rate
    assert fpr_at_tpr(a, b) == 1.0


def test_random_score_gives_chance_auroc():
    rng = np.random.default_rng(0)
    a, b = rng.random(5000), rng.random(4000)
    assert auroc(a, b) == pytest.approx(0.5, abs=0.02)
    assert aupr(a, b) == pytest.approx(4000 / 9000, abs=0.02)
    assert fpr_at_tpr(a, b) == pytest.approx(0.95, abs=0.02)


def test_fpr95_hand_case():
    # 19 of 20 OOD scores above every ID score: TPR reaches exactly 0.95 before any ID item
    a = np.arange(10.0)
    b = np.r_[np.full(19, 100.0), 5.0]
    assert fpr_at_tpr(a, b) == 0.0
    # only 18 of 20 on top: the 19th OOD item sits at 5, above ID scores 0..4 -> FPR = 5/10
    b2 = np.r_[np.full(18, 100.0), 5.5, 5.5]
    assert fpr_at_tpr(a, b2) == pytest.approx(4 / 10)


def test_var_ratio_hand_case():
    assert var_ratio(np.array([1.0, 1.0, 2.0]), np.array([4.0, 4.0])) == pytest.approx(3.0)
    assert np.isnan(var_ratio(np.zeros(3), np.ones(2)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = np.round(rng.normal(0, 1, 300), 1)  # rounding creates many ties within and across groups
    b = np.round(rng.normal(0.7, 1.2, 170), 1)
    ref = _sk(a, b)
    got = ood_statistics(a, b)
    assert got[:3] == pytest.approx(np.array(ref), abs=1e-12)
    assert got[3] == pytest.approx(b.mean() / a.mean())


def test_vectorised_rows_equal_one_by_one():
    rng = np.random.default_rng(5)
    a, b = np.round(rng.random((7, 50)), 2), np.round(rng.random((7, 30)) + 0.2, 2)
    batch = ood_statistics(a, b)
    assert batch.shape == (4, 7)
    for i in range(7):
        assert batch[:, i] == pytest.approx(ood_statistics(a[i], b[i]))


def test_ci_keys_contain_value_and_are_reproducible():
    rng = np.random.default_rng(1)
    a, b = rng.gamma(2.0, size=400), rng.gamma(3.0, size=300)
    r1 = ood_metrics_ci(a, b, n_resamples=300, seed=7)
    r2 = ood_metrics_ci(a, b, n_resamples=300, seed=7)
    assert list(r1) == list(OOD_METRICS) and r1 == r2
    for v, lo, hi in r1.values():
        assert lo <= v <= hi and hi - lo > 0


def test_perfect_separation_ci_is_degenerate():
    v, lo, hi = ood_metrics_ci(np.arange(50.0), np.arange(50.0) + 100, n_resamples=200)["AUROC"]
    assert (v, lo, hi) == (1.0, 1.0, 1.0)  # stratified: every resample keeps both groups
