"""Sparsification curves and AUSE: a perfect uncertainty is the oracle, hand-computed areas."""

import numpy as np
import pytest

from bench.metrics.sparsification import FRACTIONS, aurg, ause, sparsification_curves, sparsification_metrics


def test_fractions():
    assert FRACTIONS.shape == (20,) and FRACTIONS[0] == 0 and FRACTIONS[-1] == pytest.approx(0.95)


def test_perfect_uncertainty_is_the_oracle():
    rng = np.random.default_rng(0)
    m = (rng.random(500) < 0.6).astype(float)
    u = -m + 0.01 * rng.random(500)  # wrong queries are the most uncertain
    curve, oracle = sparsification_curves(u, m)
    assert curve == pytest.approx(oracle)
    assert ause(u, m) == pytest.approx(0.0, abs=1e-12)
    (v, lo, hi), _ = sparsification_metrics(u, m, n_resamples=100)
    assert v == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_area():
    m = np.array([1.0, 0.0])
    u = np.array([1.0, 0.0])  # the correct query is the more uncertain one
    fr = np.array([0.0, 0.5])
    curve, oracle = sparsification_curves(u, m, fr)
    assert list(curve) == [0.5, 0.0] and list(oracle) == [0.5, 1.0]
    assert ause(u, m, fr) == pytest.approx(0.25)


def test_informative_beats_random_beats_inverted():
    rng = np.random.default_rng(1)
    p = rng.random(2000)
    m = (rng.random(2000) < p).astype(float)
    good, rand, bad = ause(-p, m), ause(rng.random(2000), m), ause(p, m)
    assert good < rand < bad
    curve, _ = sparsification_curves(-p, m)
    assert curve[-1] > curve[0]  # removing uncertain queries raises the score


def test_extras_and_ci():
    rng = np.random.default_rng(2)
    p = rng.random(300)
    m = (rng.random(300) < p).astype(float)
    (v, lo, hi), ex = sparsification_metrics(-p, m, n_resamples=200, seed=3)
    assert lo <= v <= hi
    assert set(ex) == {
        "sparsification_frac",
        "sparsification_curve",
        "sparsification_oracle",
        "sparsification_random",
    }
    assert all(a.shape == (20,) for a in ex.values())
    assert ex["sparsification_random"] == pytest.approx(np.full(20, m.mean()))
    assert np.all(ex["sparsification_oracle"] >= ex["sparsification_curve"] - 1e-12)


def test_vectorised_rows_equal_one_by_one():
    rng = np.random.default_rng(4)
    u, m = rng.random((6, 40)), rng.random((6, 40))
    assert ause(u, m) == pytest.approx([ause(u[i], m[i]) for i in range(6)])


def test_aurg_is_the_gain_over_random_removal():
    rng = np.random.default_rng(8)
    m = (rng.random(400) < 0.6).astype(float)
    oracle_u = -m + rng.random(400) * 0.01  # the oracle order
    curve, oracle = sparsification_curves(oracle_u, m)
    f = FRACTIONS
    assert aurg(oracle_u, m) == pytest.approx(np.trapezoid(oracle - m.mean(), f))
    assert aurg(oracle_u, m) + ause(oracle_u, m) == pytest.approx(np.trapezoid(oracle - m.mean(), f))
    rand = [aurg(rng.random(400), m) for _ in range(200)]
    assert abs(np.mean(rand)) < 3 * np.std(rand) / np.sqrt(200)  # 0 in expectation
    assert aurg(m, m) < 0  # the worst order loses to random
