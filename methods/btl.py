"""Bayesian triplet loss (BTL; Warburg, Jorgensen, Civera, Hauberg, ICCV 2021).

Each input is a Gaussian N(mu(x), diag(sigma^2(x))) in embedding space (methods/_gaussian.py; one
variance per embedding by default, as the paper's reference code), trained from scratch with the
likelihood that the anchor is closer to the positive than to the negative, so the variance grows
where triplets are hard to satisfy.

Distance difference of a triplet (a, p, n independent Gaussians, diagonal covariances):

    tau = ||a - p||^2 - ||a - n||^2 = sum_l [ (a_l - p_l)^2 - (a_l - n_l)^2 ]

Per dimension, with a_l ~ N(alpha, A), p_l ~ N(pi, P), n_l ~ N(nu, N), u = a_l - p_l, v = a_l - n_l
jointly Gaussian (Var u = A + P, Var v = A + N, Cov(u, v) = A), the exact first two moments are

    E[tau_l]   = pi^2 + P - nu^2 - N - 2 alpha (pi - nu)
    Var[tau_l] = 2 T1 + 2 T2 - 2 T3,
        T1 = P^2 + 2 pi^2 P + 2 (A + alpha^2)(P + pi^2) - 2 alpha^2 pi^2 - 4 alpha pi P
        T2 = N^2 + 2 nu^2 N + 2 (A + alpha^2)(N + nu^2) - 2 alpha^2 nu^2 - 4 alpha nu N
        T3 = 4 pi nu A

(the paper's moments, in the expanded form of its reference code; equal to
Var(u^2) + Var(v^2) - 2 Cov(u^2, v^2) with Var(u^2) = 2 s_u^2 + 4 m_u^2 s_u and
Cov(u^2, v^2) = 2 c^2 + 4 m_u m_v c, which tests/test_prob_embeddings.py checks), summed over l.
The paper approximates tau by the normal with these moments (moment matching), so

    P(tau < -m) ~= Phi( (-m - E[tau]) / sqrt(Var[tau]) )
    L = -log P(tau < -m)  +  lambda [ KL(a || N(0, v0 I)) + KL(p || prior) + KL(n || prior) ]

averaged over the triplets of the batch; log Phi is torch.special.log_ndtr (finite where Phi
underflows). Defaults from the paper's reference code: margin m = 0 (option btl_margin),
lambda = 1e-6 (btl_kl_weight), prior variance v0 = 1/d (its `varPrior = 1/D` for D mean dimensions).
Triplets come from the harness's TripletMarginMiner on the means (same margin and type as the
shared contrastive loss), so BTL sees the triplets the base model is trained on.
"""

from __future__ import annotations

import torch

from bench.loss import BatchLoss, make_loss_and_miner
from bench.method import Option
from bench.recipes import Knob, Recipe
from bench.registry import register_method
from methods._gaussian import (
    VARIANCE_KINDS,
    GaussianEmbeddingNet,
    OwnGaussianNetMethod,
    kl_to_isotropic_prior,
)


def distance_difference_moments(
    mu_a: torch.Tensor,
    var_a: torch.Tensor,
    mu_p: torch.Tensor,
    var_p: torch.Tensor,
    mu_n: torch.Tensor,
    var_n: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[tau], Var[tau]) [T] of tau = ||a - p||^2 - ||a - n||^2 for independent Gaussian a, p, n
    with means and per-dimension variances [T, d] (module docstring)."""
    a2, p2, n2 = mu_a**2, mu_p**2, mu_n**2
    mean = (p2 + var_p - n2 - var_n - 2 * mu_a * (mu_p - mu_n)).sum(-1)
    t1 = var_p**2 + 2 * p2 * var_p + 2 * (var_a + a2) * (var_p + p2) - 2 * a2 * p2 - 4 * mu_a * mu_p * var_p
    t2 = var_n**2 + 2 * n2 * var_n + 2 * (var_a + a2) * (var_n + n2) - 2 * a2 * n2 - 4 * mu_a * mu_n * var_n
    t3 = 4 * mu_p * mu_n * var_a
    return mean, (2 * t1 + 2 * t2 - 2 * t3).sum(-1)


def triplet_log_probability(mean: torch.Tensor, var: torch.Tensor, margin: float) -> torch.Tensor:
    """log P(tau < -margin) under the moment-matched normal N(mean, var) of tau."""
    return torch.special.log_ndtr((-margin - mean) / var.clamp_min(1e-12).sqrt())


def bayesian_triplet_loss(cfg, margin: float, kl_weight: float) -> BatchLoss:
    """BTL's batch loss on the triplets the TripletMarginMiner finds among the means (module docstring)."""
    _, miner = make_loss_and_miner(cfg)
    prior_var = 1.0 / cfg.embed_dim

    def batch_loss(model: GaussianEmbeddingNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, var = model(x)
        a, p, n = miner(mu, y)
        if len(a) == 0:
            return 0.0 * (mu.sum() + var.sum())  # no triplet in this batch: zero loss, graph kept
        mean, tvar = distance_difference_moments(mu[a], var[a], mu[p], var[p], mu[n], var[n])
        kl = kl_to_isotropic_prior(mu, var, prior_var)
        return (
            -triplet_log_probability(mean, tvar, margin).mean() + kl_weight * (kl[a] + kl[p] + kl[n]).mean()
        )

    return batch_loss


@register_method("btl")
class BayesianTripletLoss(OwnGaussianNetMethod):
    """Bayesian triplet loss: Gaussian embeddings, moment-matched P(anchor closer to positive) + KL prior."""

    PREFIX = "btl"
    options = {
        "btl_variance": Option(
            str,
            "isotropic",
            "isotropic | diag; the reference code predicts one variance",
            choices=VARIANCE_KINDS,
        ),
        "btl_margin": Option(float, 0.0, "m in P(tau < -m) (reference code default)", minimum=0.0),
        "btl_kl_weight": Option(
            float, 1e-6, "lambda, the KL scale factor (reference code default)", minimum=0.0
        ),
    }

    recipes = {
        "paper": Recipe(
            settings={"btl_variance": "isotropic", "btl_margin": 0.0, "btl_kl_weight": 1e-6},
            source="Warburg et al. 2021 (ICCV) + reference code; "
            "github.com/FrederikWarburg/bayesian-triplet-loss: margin 0, kl_scale_factor 1e-6, varPrior "
            "1/D, one variance per embedding",
            note="triplets from the harness's TripletMarginMiner on the means (the shared miner)",
        )
    }
    tunable = {"btl_kl_weight": Knob(1e-8, 1e-2, log=True)}

    def batch_loss(self, cfg) -> BatchLoss:
        opts = self.option_values(cfg)
        return bayesian_triplet_loss(cfg, opts["margin"], opts["kl_weight"])
