"""Selective-retrieval metrics (bench.metrics.selective) against brute-force references written here:
an explicit loop over coverages for distinct scores, every order of tied queries enumerated for ties,
the expanded resample for the sort-once bootstrap, and TorchUncertainty's implementation when it is
importable."""

import importlib.util
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from bench.metrics.bootstrap import resample_counts
from bench.metrics.selective import (
    COVERAGES,
    SELECTIVE_METRICS,
    SelectiveSort,
    coverage_count,
    risk_coverage_curve,
    selective_metric_names,
    selective_metrics,
    selective_statistics,
)


def brute_in_order(loss_in_order: np.ndarray, oracle_aurc: float | None = None) -> np.ndarray:
    """AURC, AUGRC and the risk at each coverage for queries accepted in the given order (loops only)."""
    n = len(loss_in_order)
    risks, general = [], []
    for k in range(1, n + 1):
        accepted = loss_in_order[:k]
        risks.append(sum(accepted) / k)
        general.append(sum(accepted) / n)
    at = [risks[math.ceil(round(c * n, 9)) - 1] for c in COVERAGES]
    return np.array([sum(risks) / n, sum(general) / n, *at])


def brute(u: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """[6]: AURC, E-AURC, AUGRC, Risk@c of every coverage: the mean over every order of the queries that
    is sorted by u (all orders of tied queries, enumerated), E-AURC against the best order of all."""
    n = len(u)
    perms = [p for p in itertools.permutations(range(n)) if all(u[p[i]] <= u[p[i + 1]] for i in range(n - 1))]
    vals = np.mean([brute_in_order(loss[list(p)]) for p in perms], axis=0)
    best = min(brute_in_order(loss[list(p)])[0] for p in itertools.permutations(range(n)))
    return np.array([vals[0], vals[0] - best, vals[1], *vals[2:]])


def brute_untied(u: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """The same for distinct u (one order) and a large n: the oracle accepts the smallest losses first."""
    a = brute_in_order(loss[np.argsort(u)])
    best = brute_in_order(np.sort(loss))[0]
    return np.array([a[0], a[0] - best, a[1], *a[2:]])


def test_names():
    assert SELECTIVE_METRICS == ("AURC", "E-AURC", "AUGRC", "Risk@80Cov", "Risk@90Cov", "Risk@95Cov")
    assert selective_metric_names(["mAP@1", "mAP@7"])[6:8] == ["AURC(mAP@7)", "E-AURC(mAP@7)"]
    assert coverage_count(150, 0.9) == 135 and coverage_count(151, 0.9) == 136 and coverage_count(3, 0.8) == 3


@pytest.mark.parametrize("continuous", [False, True])
def test_distinct_scores_equal_the_loop(continuous):
    rng = np.random.default_rng(0)
    n = 73
    loss = rng.random(n) if continuous else (rng.random(n) < 0.3).astype(float)
    u = rng.normal(size=n) + loss  # informative but imperfect
    np.testing.assert_allclose(selective_statistics(u, loss), brute_untied(u, loss), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", range(6))
def test_ties_are_the_mean_over_every_order_of_tied_queries(seed):
    rng = np.random.default_rng(seed)
    n = 7
    u = rng.integers(0, 3, n).astype(float)  # long tie runs
    loss = (rng.random(n) < 0.5).astype(float) if seed % 2 else rng.random(n).round(1)
    np.testing.assert_allclose(selective_statistics(u, loss), brute(u, loss), rtol=1e-12, atol=1e-14)
    # the input order does not matter
    p = rng.permutation(n)
    np.testing.assert_allclose(selective_statistics(u[p], loss[p]), selective_statistics(u, loss), atol=1e-14)


def test_weighted_equals_the_statistic_of_the_expanded_resample():
    """A resample repeats queries (ties): the sort-once path scores it exactly as the expanded data."""
    rng = np.random.default_rng(3)
    n = 7
    u = rng.normal(size=n).round(1)
    losses = np.stack([(rng.random(n) < 0.4).astype(float), rng.random(n).round(2)])
    w = resample_counts(n, 5, rng)
    got = SelectiveSort(u, losses).weighted(w)
    for r in range(5):
        eu = np.repeat(u, w[r].astype(int))
        want = np.concatenate([brute(eu, np.repeat(loss, w[r].astype(int))) for loss in losses])
        np.testing.assert_allclose(got[:, r], want, rtol=1e-11, atol=1e-13)


def test_curve_and_oracle_facts():
    rng = np.random.default_rng(4)
    loss = (rng.random(200) < 0.25).astype(float)
    cov, risk, gen = risk_coverage_curve(-loss, loss)  # the worst order: wrong queries accepted first
    assert cov[-1] == 1 and risk[-1] == pytest.approx(loss.mean()) and gen[-1] == pytest.approx(loss.mean())
    np.testing.assert_allclose(gen, risk * cov)
    perfect = selective_statistics(loss, loss)  # the oracle's own order: E-AURC 0, the right queries first
    k80, right = coverage_count(200, 0.8), int((loss == 0).sum())
    assert perfect[1] == pytest.approx(0, abs=1e-15) and perfect[3] == max(0, k80 - right) / k80
    assert selective_statistics(-loss, loss)[1] > 0.1  # the worst order pays for it
    constant = selective_statistics(np.zeros(200), loss)  # a useless score: every coverage at the error rate
    np.testing.assert_allclose(constant[[0, 3, 4, 5]], loss.mean(), rtol=1e-12)
    assert constant[2] == pytest.approx(loss.mean() * (201 / 400), rel=1e-12)  # AUGRC = r (N + 1) / (2 N)


def brute_expected(u: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """[6] for any n with ties, by loops: at k accepted queries, every query of smaller u is in and the
    tie run holding position k contributes (positions of it taken) x (its mean loss), the expected loss
    of a uniformly random subset of the run (what every order of it averages to)."""
    n = len(u)

    def curve(key):
        cl = []
        for k in range(1, n + 1):
            s = np.sort(key)[k - 1]
            below = key < s
            run = key == s
            cl.append(loss[below].sum() + (k - below.sum()) * loss[run].mean())
        return np.array(cl)

    cl = curve(u)
    best = sum(np.sort(loss).cumsum() / np.arange(1, n + 1)) / n
    risk = cl / np.arange(1, n + 1)
    aurc = risk.mean()
    return np.array(
        [aurc, aurc - best, cl.sum() / n**2, *[risk[coverage_count(n, c) - 1] for c in COVERAGES]]
    )


def test_ci_is_the_percentile_of_brute_force_resamples():
    rng = np.random.default_rng(5)
    n = 40
    loss = (rng.random(n) < 0.3).astype(float)
    u = rng.normal(size=n).round(1) + loss
    got = selective_metrics(u, {"mAP@1": loss}, n_resamples=200, level=0.9, seed=11)
    counts = resample_counts(n, 200, np.random.default_rng(11))  # one batch of n = 40: the same draws
    reps = np.array(
        [brute_expected(np.repeat(u, c.astype(int)), np.repeat(loss, c.astype(int))) for c in counts]
    )
    for i, m in enumerate(SELECTIVE_METRICS):
        v, lo, hi = got[m]
        assert v == pytest.approx(brute_expected(u, loss)[i], abs=1e-12)
        want_lo, want_hi = np.quantile(reps[:, i], [0.05, 0.95])
        assert lo == pytest.approx(want_lo, abs=1e-12) and hi == pytest.approx(want_hi, abs=1e-12)


def test_empty_and_nan():
    out = selective_metrics(np.zeros(0), {"mAP@1": np.zeros(0)})
    assert set(out) == set(SELECTIVE_METRICS) and all(np.isnan(v).all() for v in out.values())
    out = selective_metrics(np.zeros(1), {"mAP@1": np.ones(1)}, n_resamples=10)
    assert out["AURC"][0] == 1 and np.isnan(out["AURC"][1])


def _torch_uncertainty_risk_coverage():
    """TorchUncertainty's risk_coverage module, loaded from its file (its package __init__ imports
    lightning); skipped when it is not installed (it is not a dependency: its `others` extra pins
    curvlinops < 3, laplace-torch 0.3 needs >= 3)."""
    spec = importlib.util.find_spec("torch_uncertainty")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch-uncertainty not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "metrics" / "classification" / "risk_coverage.py"
    mod_spec = importlib.util.spec_from_file_location("_tu_risk_coverage", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_against_torch_uncertainty():
    """Same curve and risks at coverage; TorchUncertainty's AURC/AUGRC integrate the curve by the
    trapezoid rule over coverages 1/N..1 and divide by (1 - 1/N), ours take the mean of the curve
    (Geifman & El-Yaniv): tu = (N * ours - (r_1 + r_N) / 2) / (N - 1), checked as such."""
    torch = pytest.importorskip("torch")
    tu = _torch_uncertainty_risk_coverage()
    rng = np.random.default_rng(6)
    n = 100
    wrong = (rng.random(n) < 0.3).astype(float)
    u = rng.random(n) + 0.5 * wrong
    probs = torch.tensor(np.stack([1 - u / 3, u / 3], -1))  # confidence 1 - u/3 > 0.5: class 0 predicted
    target = torch.tensor((wrong == 1).astype(np.int64))  # wrong queries have target 1
    ours = selective_statistics(u, wrong)
    _, risk, gen = risk_coverage_curve(u, wrong)
    a = tu.AURC()
    a.update(probs, target)
    np.testing.assert_allclose(a.partial_compute().numpy(), risk, rtol=1e-12)
    assert float(a.compute()) == pytest.approx((n * ours[0] - (risk[0] + risk[-1]) / 2) / (n - 1), rel=1e-6)
    g = tu.AUGRC()
    g.update(probs, target)
    assert float(g.compute()) == pytest.approx((n * ours[2] - (gen[0] + gen[-1]) / 2) / (n - 1), rel=1e-6)
    for i, c in enumerate(COVERAGES):
        r = tu.RiskAtxCov(c)
        r.update(probs, target)
        assert float(r.compute()) == pytest.approx(ours[3 + i], rel=1e-9)
