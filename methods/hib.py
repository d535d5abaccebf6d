"""Hedged instance embedding (HIB; Oh, Murphy, Pan, Roth, Schroff, Gallagher, ICLR 2019).

Each input is a Gaussian N(mu(x), diag(sigma^2(x))) in embedding space (methods/_gaussian.py: the
registered backbone with d mean and d variance outputs), trained from scratch with the paper's soft
contrastive loss and a variational-information-bottleneck KL term, so the variance is learned where
matching is ambiguous.

Match probability of a pair (the paper's soft contrastive formulation), a > 0 and b learnable scalars:

    p(m | z1, z2) = sigmoid(-a ||z1 - z2|| + b)
    p(m | x1, x2) ~= 1/K^2 sum_{k,k'} p(m | z1^(k), z2^(k')),   z_i^(k) = mu_i + sigma_i * eps,  eps ~ N(0, I)

with K = 8 (option hib_samples) reparameterised samples per item (paper). log p and log(1 - p) are computed
as a log-mean-exp of log-sigmoids (exact, and finite where p underflows).

Loss of a pair with match label m in {0, 1} (the paper's VIB objective):

    L = -[ m log p(m|x1,x2) + (1 - m) log(1 - p(m|x1,x2)) ] + beta [ KL(N(mu1, s1^2) || N(0, I)) + KL(2 ||
    N(0, I)) ]

beta = 1e-4 (hib_kl_weight; the paper's value for its N-digit MNIST experiments). Pairs: every
unordered pair in the batch; the paper samples pairs rather than mining them. Because a batch with
C classes holds about C times more negative than positive pairs, positives and negatives are each
averaged and the two means added (the reduction pytorch-metric-learning's pair losses use, and the
LAM reference implementation of this baseline), so both kinds of pairs weigh the same.
a = exp(log_a) keeps the scale positive; initialised at a = 1, b = 0.

Uncertainty for the harness: the predicted variance sigma^2(x) (its trace is the shared score).
The paper's own score, the self-mismatch probability 1 - p(m | x, x), is a monotone function of the
spread of N(mu, sigma^2) as well; it is not used here so every method is scored the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.loss import BatchLoss
from bench.method import Option
from bench.recipes import Knob, Recipe
from bench.registry import register_method
from methods._gaussian import (
    VARIANCE_KINDS,
    GaussianEmbeddingNet,
    OwnGaussianNetMethod,
    all_pairs,
    kl_to_isotropic_prior,
)


class SoftMatchNet(GaussianEmbeddingNet):
    """Gaussian embedding net plus the soft-contrastive scalars a = exp(log_a) > 0 and b."""

    def __init__(self, backbone: nn.Module, embed_dim: int) -> None:
        super().__init__(backbone, embed_dim)
        self.log_a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))


def sample_gaussian(
    mean: torch.Tensor, var: torch.Tensor, samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Reparameterised samples [K, N, d] of N(mean, diag var) (global RNG when generator is None)."""
    eps = torch.randn((samples, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + var.sqrt() * eps


def match_log_probs(
    mu1: torch.Tensor,
    var1: torch.Tensor,
    mu2: torch.Tensor,
    var2: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    samples: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log(1 - p)) [P] for the P pairs (mu1[i], var1[i]) ~ (mu2[i], var2[i]) [P, d], where
    p = 1/K^2 sum_{k,k'} sigmoid(-a ||z1^(k) - z2^(k')|| + b) with K = `samples` draws per item."""
    z1 = sample_gaussian(mu1, var1, samples, generator)
    z2 = sample_gaussian(mu2, var2, samples, generator)
    sq = ((z1[:, None] - z2[None]) ** 2).sum(-1)  # [K, K, P]
    t = (-a * sq.clamp_min(1e-12).sqrt() + b).flatten(0, 1)  # [K^2, P]; the clamp keeps d/dz finite at 0
    log_k2 = math.log(t.shape[0])
    return (torch.logsumexp(F.logsigmoid(t), 0) - log_k2, torch.logsumexp(F.logsigmoid(-t), 0) - log_k2)


def match_probability(
    mu1, var1, mu2, var2, a, b, samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """p(m | x1, x2) [P], the sampled match probability of HIB (see match_log_probs)."""
    return match_log_probs(mu1, var1, mu2, var2, a, b, samples, generator)[0].exp()


def soft_contrastive_loss(samples: int, kl_weight: float) -> BatchLoss:
    """HIB's batch loss over every pair of the batch: class-balanced BCE on the sampled match
    probability plus kl_weight * (KL_i + KL_j) to N(0, I) (module docstring)."""

    def batch_loss(model: SoftMatchNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, var = model(x)
        i, j = all_pairs(len(y), mu.device)
        log_p, log_q = match_log_probs(mu[i], var[i], mu[j], var[j], model.log_a.exp(), model.b, samples)
        match = y[i] == y[j]
        kl = kl_to_isotropic_prior(mu, var)
        per_pair = torch.where(match, -log_p, -log_q) + kl_weight * (kl[i] + kl[j])
        n_pos = match.sum()
        weight = torch.where(match, 1.0 / n_pos.clamp_min(1), 1.0 / (len(match) - n_pos).clamp_min(1))
        return (weight * per_pair).sum()

    return batch_loss


@register_method("hib")
class HedgedInstanceEmbedding(OwnGaussianNetMethod):
    """HIB: Gaussian embeddings trained with the sampled soft contrastive loss + beta KL to N(0, I)."""

    PREFIX = "hib"
    options = {
        "hib_variance": Option(
            str,
            "diag",
            "diag | isotropic; the paper's Gaussian embeddings are diagonal",
            choices=VARIANCE_KINDS,
        ),
        "hib_samples": Option(
            int, 8, "K samples per item for the match probability (Oh et al. 2019)", minimum=1
        ),
        "hib_kl_weight": Option(
            float, 1e-4, "beta, weight of the KL term to N(0, I) (Oh et al. 2019)", minimum=0.0
        ),
    }
    NET = SoftMatchNet
    recipes = {
        "paper": Recipe(
            settings={"hib_variance": "diag", "hib_samples": 8, "hib_kl_weight": 1e-4},
            source="Oh et al. 2019 (ICLR); diagonal Gaussian embeddings, K = 8 samples, "
            "beta = 1e-4 (its N-digit MNIST set-up); the same beta in LAM's reference HIB baseline "
            "(FrederikWarburg/bayesian-metric-learning, configs/fashionmnist/hib.yaml: kl_weight 1e-4)",
            note="trains its own net with the soft contrastive loss on every pair of the batch (its "
            "sampling of pairs), on the shared optimiser, epochs and learning rate",
        )
    }
    tunable = {"hib_kl_weight": Knob(1e-6, 1e-1, log=True)}

    def batch_loss(self, cfg) -> BatchLoss:
        opts = self.option_values(cfg)
        return soft_contrastive_loss(opts["samples"], opts["kl_weight"])

    def fitted_facts(self) -> dict:
        return {"a": float(self.net.log_a.detach().exp()), "b": float(self.net.b.detach())}
