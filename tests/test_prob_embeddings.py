"""Probabilistic-embedding baselines (methods/pfe.py, hib.py, btl.py): each closed form or sampled
quantity against an independent reference (scipy's Gaussian density, brute-force Monte Carlo, an
independent derivation of the moments), and each method fitted on the smoke preset: deterministic
under a seed, seconds to train, options honoured."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from bench.config import apply_overrides, preset_config
from bench.data import load_benchmark
from bench.errors import BenchError
from methods import pfe
from methods._gaussian import kl_to_isotropic_prior
from methods.btl import BayesianTripletLoss, distance_difference_moments, triplet_log_probability
from methods.hib import HedgedInstanceEmbedding, match_log_probs, match_probability
from tests.fit_helpers import fit_method, predict_on

F64 = torch.float64
Z = 4.0  # tolerance in standard errors for the Monte-Carlo comparisons


def _gaussians(seed: int, n: int, d: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Means [n, d] and variances [n, d] (float64) of n random Gaussians."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64) * scale, 0.1 + torch.rand(
        n, d, generator=g, dtype=F64
    ) * scale


# ---------------------------------------------------------------- PFE: mutual likelihood score


def test_mls_equals_gaussian_convolution_closed_form():
    """MLS = log N(mu1 - mu2; 0, diag(s1 + s2)), the closed form of log int N(z; mu1, s1) N(z; mu2, s2) dz."""
    mu, var = _gaussians(0, 2, 3)
    mls = pfe.mutual_likelihood_score(mu[0], var[0], mu[1], var[1])
    ref = stats.multivariate_normal(mean=np.zeros(3), cov=np.diag((var[0] + var[1]).numpy())).logpdf(
        (mu[0] - mu[1]).numpy()
    )
    assert float(mls) == pytest.approx(ref, abs=1e-12)
    rep = [t.expand(4, 3) for t in (mu[:1], var[:1], mu[1:], var[1:])]
    batched = pfe.mutual_likelihood_score(*rep)
    assert torch.allclose(batched, mls.expand(4))


def test_mls_matches_monte_carlo_overlap():
    """Monte Carlo of the same integral: z ~ N(mu1, s1), MLS ~= log mean_z N(z; mu2, s2); the standard
    error of the log of a mean is std(w) / (sqrt(n) mean(w)) (delta method)."""
    mu, var = _gaussians(1, 2, 2, scale=0.7)
    rng = np.random.default_rng(0)
    n = 400_000
    z = mu[0].numpy() + np.sqrt(var[0].numpy()) * rng.standard_normal((n, 2))
    w = stats.multivariate_normal(mean=mu[1].numpy(), cov=np.diag(var[1].numpy())).pdf(z)
    se = w.std() / (math.sqrt(n) * w.mean())
    mls = float(pfe.mutual_likelihood_score(mu[0], var[0], mu[1], var[1]))
    assert abs(math.log(w.mean()) - mls) < Z * se


def test_variance_head_starts_at_constant_and_pairs_are_genuine():
    head = pfe.VarianceHead(5, 3, "isotropic")
    head.init_constant(torch.tensor([0.25]))
    v = head(torch.randn(7, 5))
    assert v.shape == (7, 3) and torch.allclose(v, torch.full((7, 3), 0.25 + pfe.VAR_FLOOR))
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3])  # class 2 has one item: never drawn
    b = pfe.class_balanced_batches(
        y, steps=5, batch=8, classes_per_batch=64, generator=torch.Generator().manual_seed(0)
    )
    assert b.shape == (5, 3, 2)
    assert (y[b] == y[b][..., :1]).all() and not (y[b] == 2).any()
    again = pfe.class_balanced_batches(
        y, steps=5, batch=8, classes_per_batch=64, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(b, again)


def test_penultimate_features_are_the_last_linear_input():
    from backbones.mlp import EmbeddingNet

    net = EmbeddingNet(6, (5, 4), 2)
    x = torch.randn(11, 6)
    emb, feats = pfe.embed_with_features(net, x, chunk=4)
    assert torch.allclose(emb, net(x)) and torch.allclose(feats, net.net[:-1](x))


# ---------------------------------------------------------------- HIB: sampled match probability


@pytest.mark.parametrize("a, b", [(2.0, 1.0), (0.5, -1.0)])
def test_hib_match_probability_agrees_with_brute_force_monte_carlo(a, b):
    """The K = 8 estimator p = 1/K^2 sum sigmoid(-a ||z1 - z2|| + b) is unbiased for
    E[sigmoid(-a ||z1 - z2|| + b)], z1 ~ N(mu1, s1), z2 ~ N(mu2, s2) independent: its mean over R
    independent runs agrees with a brute-force estimate from n independent (z1, z2) draws."""
    mu, var = _gaussians(2, 6, 2, scale=0.8)  # 3 pairs: (0, 1), (2, 3), (4, 5)
    mu1, var1, mu2, var2 = mu[0::2], var[0::2], mu[1::2], var[1::2]
    r = 20_000
    est = match_probability(
        mu1.repeat(r, 1),
        var1.repeat(r, 1),
        mu2.repeat(r, 1),
        var2.repeat(r, 1),
        torch.tensor(a, dtype=F64),
        torch.tensor(b, dtype=F64),
        samples=8,
        generator=torch.Generator().manual_seed(3),
    ).reshape(r, 3)
    rng = np.random.default_rng(4)
    n = 400_000
    for k in range(3):
        z1 = mu1[k].numpy() + np.sqrt(var1[k].numpy()) * rng.standard_normal((n, 2))
        z2 = mu2[k].numpy() + np.sqrt(var2[k].numpy()) * rng.standard_normal((n, 2))
        s = 1.0 / (1.0 + np.exp(a * np.linalg.norm(z1 - z2, axis=1) - b))
        se = math.sqrt(s.var() / n + float(est[:, k].var()) / r)
        assert abs(float(est[:, k].mean()) - s.mean()) < Z * se, k


def test_hib_log_probabilities_are_complementary_and_finite():
    mu, var = _gaussians(5, 4, 3)
    g = torch.Generator().manual_seed(0)
    log_p, log_q = match_log_probs(
        mu[:2],
        var[:2],
        mu[2:] + 50.0,
        var[2:],
        torch.tensor(10.0, dtype=F64),
        torch.tensor(0.0, dtype=F64),
        samples=8,
        generator=g,
    )
    assert torch.isfinite(log_p).all() and (log_p < -100).all()  # p underflows in float64, log p does not
    assert torch.allclose(log_p.exp() + log_q.exp(), torch.ones(2, dtype=F64))


def test_kl_to_isotropic_prior_matches_torch_distributions():
    mu, var = _gaussians(6, 3, 4)
    q = torch.distributions.Normal(mu, var.sqrt())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.full_like(var, 0.5).sqrt())
    assert torch.allclose(
        kl_to_isotropic_prior(mu, var, 0.5), torch.distributions.kl_divergence(q, p).sum(-1)
    )


# ---------------------------------------------------------------- BTL: moment-matched triplet probability


def _compact_moments(mu_a, var_a, mu_p, var_p, mu_n, var_n):
    """Independent derivation: per dimension u = a - p, v = a - n are jointly Gaussian with
    Var u = A + P, Var v = A + N, Cov(u, v) = A; tau = sum (u^2 - v^2), and for jointly Gaussian
    (u, v): E u^2 = m_u^2 + s_u, Var u^2 = 2 s_u^2 + 4 m_u^2 s_u, Cov(u^2, v^2) = 2 c^2 + 4 m_u m_v c."""
    mu_u, mu_v, s_u, s_v, c = mu_a - mu_p, mu_a - mu_n, var_a + var_p, var_a + var_n, var_a
    mean = (mu_u**2 + s_u - mu_v**2 - s_v).sum(-1)
    var_u2, var_v2 = 2 * s_u**2 + 4 * mu_u**2 * s_u, 2 * s_v**2 + 4 * mu_v**2 * s_v
    cov_u2_v2 = 2 * c**2 + 4 * mu_u * mu_v * c
    var = (var_u2 + var_v2 - 2 * cov_u2_v2).sum(-1)
    return mean, var


def _tau_samples(mu, var, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = mu[:, None] + var[:, None].sqrt() * torch.randn(3, n, mu.shape[1], generator=g, dtype=F64)
    return ((z[0] - z[1]) ** 2).sum(-1) - ((z[0] - z[2]) ** 2).sum(-1)


def test_btl_moments_equal_independent_derivation_exactly():
    mu, var = _gaussians(7, 3 * 5, 4)
    args = (mu[0::3], var[0::3], mu[1::3], var[1::3], mu[2::3], var[2::3])
    for got, ref in zip(distance_difference_moments(*args), _compact_moments(*args)):
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_btl_moments_match_monte_carlo_moments():
    """Sample mean and variance of tau within sampling error of E[tau], Var[tau] (the standard error
    of a sample variance is sqrt((m4 - s^4) / n), m4 the fourth central moment)."""
    mu, var = _gaussians(8, 3, 3, scale=0.6)
    mean, v = (
        t.item() for t in distance_difference_moments(mu[:1], var[:1], mu[1:2], var[1:2], mu[2:], var[2:])
    )
    n = 400_000
    tau = _tau_samples(mu, var, n, seed=9)
    assert abs(tau.mean().item() - mean) < Z * math.sqrt(v / n)
    m4 = ((tau - tau.mean()) ** 4).mean().item()
    assert abs(tau.var().item() - v) < Z * math.sqrt((m4 - v**2) / n)


def _prob_vs_mc(mu, var, margin: float, n: int, seed: int) -> tuple[float, float, float]:
    m, v = distance_difference_moments(mu[:1], var[:1], mu[1:2], var[1:2], mu[2:], var[2:])
    p = triplet_log_probability(m, v, margin).exp().item()
    p_mc = (_tau_samples(mu, var, n, seed) < -margin).double().mean().item()
    return p, p_mc, math.sqrt(p_mc * (1 - p_mc) / n)


def test_btl_probability_exact_when_tau_is_gaussian():
    """With zero variance for positive and negative, tau = -2 a.(pi - nu) + |pi|^2 - |nu|^2 is linear
    in the Gaussian anchor, so the moment-matched normal is exact: P agrees with Monte Carlo."""
    mu, var = _gaussians(10, 3, 4, scale=0.5)
    var[1:] = 0.0
    p, p_mc, se = _prob_vs_mc(mu, var, margin=0.1, n=400_000, seed=11)
    assert 0.05 < p < 0.95 and abs(p - p_mc) < Z * se


@pytest.mark.slow  # 50k Monte Carlo draws at d = 256
def test_btl_probability_close_to_monte_carlo_in_high_dimension():
    """In general tau is a sum of d independent non-Gaussian terms; the normal approximation's error
    shrinks like 1/sqrt(d) (Berry-Esseen). At d = 256 it is below 0.005 (measured: about 1e-3; at
    d = 2, the harness's embedding size, it is up to about 0.015)."""
    d = 256
    mu, var = _gaussians(12, 3, d, scale=1.0)
    mu, var = mu / math.sqrt(d), var * (0.5 / d)
    p, p_mc, se = _prob_vs_mc(mu, var, margin=0.0, n=50_000, seed=13)
    assert 0.05 < p < 0.95 and abs(p - p_mc) < Z * se + 0.005


def test_btl_log_probability_finite_far_in_the_tail():
    lp = triplet_log_probability(torch.tensor([1e3, -1e3]), torch.tensor([1.0, 1.0]), margin=0.0)
    assert torch.isfinite(lp).all() and lp[0] < -1e5 and lp[1] == 0.0


# ---------------------------------------------------------------- the three methods on the smoke preset


@pytest.fixture(scope="module")
def smoke():
    cfg = preset_config("smoke").replace(dataset="synthetic", quiet=True)
    return cfg, load_benchmark(cfg)


def _predict(method, data):
    with torch.no_grad():
        return predict_on(method, data.test_id.x), predict_on(method, data.test_ood["noise"].x)


@pytest.mark.parametrize("name", ["pfe", "hib", "btl"])
def test_method_trains_and_is_deterministic(name, smoke, tmp_path):
    """Fitted twice from scratch (separate model caches) with the same seed: identical predictions.
    (How long training takes is measured by benchmarks, not asserted here.)"""
    cfg, data = smoke
    first, _, timer = fit_method(name, cfg, data, tmp_path / "a")
    assert timer.records[(name, "train")] > 0
    second, _, _ = fit_method(name, cfg, data, tmp_path / "b")
    for p, q in zip(_predict(first, data), _predict(second, data)):
        assert torch.equal(p.mean, q.mean) and torch.equal(p.var, q.var)
        assert (p.var > 0).all() and p.var.std() > 0  # input-dependent variance
    other, _, _ = fit_method(name, cfg, data, tmp_path / "c", seed=1)
    assert not torch.equal(_predict(other, data)[0].var, _predict(first, data)[0].var)


def test_pfe_keeps_the_base_embedding(smoke, tmp_path):
    cfg, data = smoke
    plain, _, _ = fit_method("plain", cfg, data, tmp_path)
    method, _, _ = fit_method("pfe", cfg, data, tmp_path)
    assert torch.equal(_predict(method, data)[0].mean, _predict(plain, data)[0].mean)
    assert method.diagnostics["steps"] == 2  # capped at cfg.epochs passes: 1 x ceil(400 / 256)


def test_variance_structure_options(smoke, tmp_path):
    cfg, data = smoke
    cfg = apply_overrides(
        cfg, {"pfe_variance": "isotropic", "btl_variance": "diag", "hib_variance": "isotropic"}
    )
    for name, iso in (("pfe", True), ("btl", False), ("hib", True)):
        var = _predict(fit_method(name, cfg, data, tmp_path)[0], data)[0].var
        assert torch.equal(var[:, 0], var[:, 1]) == iso, name


@pytest.mark.parametrize(
    "cls, field, bad",
    [
        (pfe.ProbabilisticFaceEmbedding, "pfe_variance", "full"),
        (pfe.ProbabilisticFaceEmbedding, "pfe_steps", 0),
        (HedgedInstanceEmbedding, "hib_samples", 0),
        (HedgedInstanceEmbedding, "hib_kl_weight", -1.0),
        (BayesianTripletLoss, "btl_margin", -0.1),
        (BayesianTripletLoss, "btl_variance", "full"),
    ],
)
def test_bad_options_fail_with_one_line(cls, field, bad):
    cfg = apply_overrides(preset_config("smoke"), {field: bad})
    with pytest.raises(BenchError, match=field):
        cls.validate(cfg)
    cls.validate(preset_config("smoke"))
