"""The joint triplet-ordering score (Monte Carlo over joint draws of each validation group) against an
independent Monte Carlo of the explicit joint Gaussian; why the cross-covariances matter; where it peaks."""

from __future__ import annotations

import math

import torch

from bench.la.prior import item_groups, standard_draws, triplet_log_score, triplet_mask


def _joint(nb=2, m=6, d=2, k=30, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(nb, m, d, generator=g, dtype=torch.float64)
    A = torch.randn(nb, m * d, k, generator=g, dtype=torch.float64) * scale
    return f, A @ A.mT


def _reference(f, C, mask, S=100_000, seed=11, cosine=False):
    """Mean log P over the triplets, P by S draws from the explicit joint Gaussian of each group (Cholesky);
    cosine: distances between the normalised draws."""
    g = torch.Generator().manual_seed(seed)
    nb, m, d = f.shape
    logs = []
    for b in range(nb):
        L = torch.linalg.cholesky(C[b] + 1e-12 * torch.eye(m * d, dtype=torch.float64))
        e = (f[b].reshape(-1) + torch.randn(S, m * d, generator=g, dtype=torch.float64) @ L.T).reshape(
            S, m, d
        )
        e = e / e.norm(dim=-1, keepdim=True) if cosine else e
        for a, p, n in torch.nonzero(mask[b]).tolist():
            P = float(((e[:, a] - e[:, p]).norm(dim=-1) < (e[:, a] - e[:, n]).norm(dim=-1)).double().mean())
            logs.append(math.log(max(P, 1 / S)))
    return sum(logs) / len(logs)


def test_draws_are_antithetic_and_standard():
    z = standard_draws(7, 3, 4, torch.Generator().manual_seed(0))
    assert z.shape == (8, 3, 4) and torch.equal(z[:4], -z[4:])


def test_score_matches_an_independent_monte_carlo_of_the_joint_gaussian():
    f, C = _joint(nb=2, m=6, d=2, seed=2, scale=0.25)
    mask = triplet_mask(torch.tensor([[0, 0, 1, 1, 2, 0], [1, 2, 1, 2, 0, 0]]))
    z = standard_draws(10_000, 2, 12, torch.Generator().manual_seed(3))
    got = triplet_log_score(f, C, mask, z)
    assert abs(got - _reference(f, C, mask)) < 0.015
    # the same draws give the same value (common random numbers across a search)
    assert triplet_log_score(f, C, mask, z) == got
    # cosine: the orderings of the normalised draws (a shifted origin changes them, not the Euclidean ones)
    cos = triplet_log_score(f + 2.0, C, mask, z, distance="cosine")
    assert abs(cos - _reference(f + 2.0, C, mask, cosine=True)) < 0.015 and abs(cos - got) > 0.05


def test_the_score_uses_the_cross_covariances():
    """Anchor and positive that move together: the joint predictive keeps their distance (and the
    ordering) certain; items treated independently would make it nearly a coin flip."""
    d = 2
    f = torch.tensor([[[0.0, 0.0], [0.3, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    shared = torch.zeros(1, 3 * d, 1, dtype=torch.float64)
    shared[0, 0:2, 0] = shared[0, 2:4, 0] = torch.tensor([0.0, 2.0])  # a and p share a large sideways shift
    C = shared @ shared.mT + 0.01 * torch.eye(3 * d, dtype=torch.float64)[None]
    mask = triplet_mask(torch.tensor([[0, 0, 1]]))
    mask[0, 1] = False  # anchor 0 only
    z = standard_draws(4000, 1, 3 * d, torch.Generator().manual_seed(0))
    joint = triplet_log_score(f, C, mask, z)
    independent_C = C * torch.block_diag(*[torch.ones(d, d)] * 3)[None].double()
    independent = triplet_log_score(f, independent_C, mask, z)
    assert abs(joint - _reference(f, C, mask)) < 0.01 and joint > math.log(0.99)
    assert abs(independent - _reference(f, independent_C, mask)) < 0.03 and independent < math.log(0.75)


def test_score_peaks_at_a_calibrated_spread():
    g = torch.Generator().manual_seed(0)
    n, d, m = 96, 2, 16
    y = torch.arange(n) % 3
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    truth = centres[y] + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    noisy = truth + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)  # the "MAP" is off by 0.8
    groups = item_groups(n, m, torch.Generator().manual_seed(1))
    f, mask = noisy[groups], triplet_mask(y[groups])
    z = standard_draws(256, len(groups), m * d, torch.Generator().manual_seed(2))
    eye = torch.eye(m * d, dtype=torch.float64)
    score = {
        s: triplet_log_score(f, (s * eye).expand(len(groups), -1, -1), mask, z)
        for s in (1e-4, 0.1, 0.64, 4.0, 100.0)
    }
    best = max(score, key=score.get)
    assert best in (0.1, 0.64, 4.0) and score[1e-4] < score[best] and score[100.0] < score[best]
    assert abs(score[100.0] - math.log(0.5)) < 0.1  # very wide: every ordering a coin flip
