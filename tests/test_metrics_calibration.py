"""Retrieval calibration (ECE): hand-built bins, a perfectly calibrated toy and the cross-fitted
confidence map."""

import numpy as np
import pytest

from bench.metrics.calibration import calibration_metrics, confidence_map, ece, reliability_bins


def test_constant_overconfidence():
    correct = np.r_[np.ones(60), np.zeros(40)]
    assert ece(np.full(100, 0.9), correct) == pytest.approx(0.3)


def test_hand_two_bins():
    conf = np.array([0.8, 0.2, 0.8, 0.2])
    correct = np.array([1.0, 0.0, 1.0, 1.0])
    # bin 1: conf .2, acc .5 -> .3; bin 2: conf .8, acc 1 -> .2; equal mass -> .25
    assert ece(conf, correct, n_bins=2) == pytest.approx(0.25)
    c, a, n = reliability_bins(conf, correct, n_bins=2)
    assert c == pytest.approx([0.2, 0.8]) and a == pytest.approx([0.5, 1.0]) and list(n) == [2, 2]


def test_equal_mass_bins_cover_every_query():
    rng = np.random.default_rng(0)
    c, a, n = reliability_bins(rng.random(103), rng.random(103) < 0.5, n_bins=10)
    assert n.sum() == 103 and n.max() - n.min() <= 1
    assert np.all(np.diff(c) >= 0)  # bins ordered by confidence
    _, _, n_small = reliability_bins(np.arange(4.0), np.ones(4), n_bins=10)
    assert list(n_small) == [1, 1, 1, 1] + [0] * 6


def test_tied_confidences_share_a_bin():
    # all confidences tied: one bin, so the ECE is |mean correctness - confidence|
    c, a, n = reliability_bins(np.full(10, 0.5), np.r_[np.ones(7), np.zeros(3)], n_bins=5)
    assert list(n) == [10, 0, 0, 0, 0] and a[0] == pytest.approx(0.7) and np.isnan(a[1:]).all()
    # a step-function confidence (as an isotonic map gives): two tie runs, never split
    conf = np.r_[np.full(6, 0.2), np.full(4, 0.9)]
    correct = np.r_[1, 0, 0, 0, 0, 0, 1, 1, 1, 0.0]
    _, acc, n = reliability_bins(conf, correct, n_bins=5)
    assert list(n) == [6, 0, 0, 4, 0] and acc[0] == pytest.approx(1 / 6) and acc[3] == pytest.approx(0.75)
    assert ece(conf, correct, n_bins=5) == pytest.approx(0.6 * abs(1 / 6 - 0.2) + 0.4 * 0.15)


def test_perfectly_calibrated_toy():
    rng = np.random.default_rng(1)
    conf = rng.random(200_000)
    correct = (rng.random(conf.size) < conf).astype(float)
    assert ece(conf, correct) < 0.01
    c, a, _ = reliability_bins(conf, correct)
    assert np.abs(c - a).max() < 0.015


def test_vectorised_rows_equal_one_by_one():
    rng = np.random.default_rng(2)
    conf, correct = rng.random((5, 80)), (rng.random((5, 80)) < 0.6).astype(float)
    batch = ece(conf, correct)
    assert batch == pytest.approx([ece(conf[i], correct[i]) for i in range(5)])


def test_isotonic_cv_recovers_calibrated_uncertainty():
    rng = np.random.default_rng(3)
    u = rng.exponential(1.0, 20_000)
    p_true = np.exp(-u)
    correct = (rng.random(u.size) < p_true).astype(float)
    p = confidence_map(u, correct, seed=0)
    assert p.min() >= 0 and p.max() <= 1
    assert np.abs(p - p_true).mean() < 0.03
    (v, lo, hi), ex = calibration_metrics(u, correct, n_resamples=200, seed=0)
    assert v < 0.02 and lo <= hi
    assert set(ex) == {"reliability_conf", "reliability_acc", "reliability_count", "confidence"}
    assert ex["reliability_conf"].shape == (10,) and ex["confidence"].shape == u.shape


def test_isotonic_cv_is_out_of_fold():
    # an uninformative score: an in-sample isotonic fit would chase noise; out of fold it stays near
    # the base rate, so the ECE is small but the confidence carries no ranking (AUSE's job)
    rng = np.random.default_rng(4)
    u = rng.random(4000)
    correct = (rng.random(u.size) < 0.7).astype(float)
    p = confidence_map(u, correct, seed=1)
    assert abs(p.mean() - 0.7) < 0.03
    assert ece(p, correct) < 0.05
