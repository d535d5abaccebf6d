"""Prior precision: Laplace marginal likelihood (default) or a grid scored on a validation split by the
log-likelihood of its triplet orderings under the joint predictive (`triplet_log_score`, Monte Carlo)."""

from __future__ import annotations

import math

import torch
from scipy.optimize import minimize_scalar

from bench.environment import cpu_threads
from bench.la.pairs import small_eigh
from bench.la.spectrum import Spectrum
from bench.loss import retrieval_space

DEFAULT_GRID = tuple(10.0**k for k in range(-3, 6))  # prior_precision=grid: scored by triplet_log_score


def log_marglik(delta: float, spectrum: Spectrum, theta_sq: float) -> float:
    """The delta-dependent part of the Laplace log evidence.

    We read the training objective as a Gibbs likelihood, p(D | theta) = exp(-sum_batches loss_b(theta))
    (temperature 1; a Gaussian on the pair distances would give the same curvature up to that scale),
    with prior N(0, delta^-1 I). Laplace's approximation at theta_MAP with the GGN H of sum_b loss_b
    gives, up to terms that do not depend on delta,

        log p(D | delta) ~= -sum_b loss_b(theta_MAP) - delta/2 ||theta_MAP||^2 + D/2 log delta
                            - 1/2 log det(H + delta I).
    """
    return -0.5 * delta * theta_sq + 0.5 * spectrum.D * math.log(delta) - 0.5 * spectrum.logdet(delta)


def optimize_marglik(
    spectrum: Spectrum, theta_sq: float, lo: float = 1e-6, hi: float = 1e8
) -> tuple[float, dict]:
    """(delta*, info): the maximiser of `log_marglik` over [lo, hi].

    It solves delta = gamma / ||theta_MAP||^2 with gamma = sum_i lam_i / (lam_i + delta) (MacKay's
    effective number of parameters); bounded Brent search on log delta, O(D) per evaluation on the
    spectrum of H.
    """

    def f(t: float) -> float:
        return -log_marglik(math.exp(t), spectrum, theta_sq)

    res = minimize_scalar(
        f, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-6, "maxiter": 500}
    )
    delta = float(math.exp(res.x))
    info = {
        "log_marglik": float(-res.fun),
        "effective_params": spectrum.effective_params(delta),
        "spectrum": spectrum.method,
        "theta_sq": theta_sq,
    }
    return delta, info


def item_groups(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """[n // m, m] item indices: a seeded permutation of n items cut into groups of m (the rest unused)."""
    m = max(2, min(int(m), n))
    perm = torch.randperm(n, generator=generator)
    return perm[: (n // m) * m].reshape(-1, m)


def triplet_mask(y: torch.Tensor) -> torch.Tensor:
    """[nb, m, m, m] bool over (anchor, positive, negative) within each group of labels y [nb, m]:
    y_a = y_p, a != p, y_n != y_a (the orderings retrieval should get right)."""
    same = y[:, :, None] == y[:, None, :]
    eye = torch.eye(y.shape[1], dtype=torch.bool, device=y.device)
    return (same & ~eye)[:, :, :, None] & (~same)[:, :, None, :]


def standard_draws(samples: int, groups: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[S, groups, dim] standard normal draws in antithetic pairs (z, -z), S = samples rounded up to even:
    drawn once and shared by every (t, delta) of a search (common random numbers, so the objective is a
    deterministic function of the grid point and differences between points are not sampling noise)."""
    half = torch.randn((samples + 1) // 2, groups, dim, generator=generator, dtype=torch.float64)
    return torch.cat([half, -half])


SCORE_SAMPLES = 256  # joint draws per group for triplet_log_score
SCORE_SAMPLE_CHUNK = 64  # joint draws per chunk (bounds the [S, nb, m, m] distance tensor)


def triplet_log_score(
    f: torch.Tensor, C: torch.Tensor, mask: torch.Tensor, z: torch.Tensor, distance: str = "euclidean"
) -> float:
    """Mean over the triplets of `mask` [nb, m, m, m] (`triplet_mask`) of log P(||e_a - e_p|| < ||e_a - e_n||)
    under the joint Gaussian predictive of each group of items: means f [nb, m, d], joint covariance
    C [nb, m d, m d] (item-major; cross-covariances included, since the items share the posterior's weights),
    distances as retrieval measures them (`distance`: euclidean, or cosine on the normalised draws).

    P is estimated from S joint draws e = f + R z of every group (R R^T = C by eigh, z = `standard_draws`
    [S, nb, m d]) as (hits + 1/2) / (S + 1) (Krichevsky-Trofimov), so a triplet the predictive calls
    impossible costs log(1 / (2 S + 2)) (-6.2 for S = 256), not -inf: a clipped log score that a few
    mislabelled or duplicate validation items cannot dominate. An overconfident predictive pays that on
    each misordered triplet, a very wide one drifts every triplet to log(1/2): the score peaks at a
    calibrated spread."""
    count = int(mask.sum())
    if count == 0:
        return float("nan")
    nb, m, d = f.shape
    S = z.shape[0]
    with cpu_threads(
        1, f.device
    ):  # many small ops: extra threads only synchronise (5x slower on 2 busy cores)
        w, V = small_eigh(C.double())
        R = (V * w.clamp_min(0).sqrt()[:, None, :]).float()  # C = R R^T per group
        b, a, p, n = torch.nonzero(mask, as_tuple=True)
        ap, an = (b * m + a) * m + p, (b * m + a) * m + n  # into the flattened [nb, m, m] distances
        hits = torch.zeros(count, dtype=torch.float64, device=f.device)
        for s0 in range(0, S, SCORE_SAMPLE_CHUNK):
            zc = z[s0 : s0 + SCORE_SAMPLE_CHUNK].to(device=f.device, dtype=torch.float32)
            e = f.float()[None] + (R @ zc.permute(1, 2, 0)).permute(2, 0, 1).reshape(
                -1, nb, m, d
            )  # [s, nb, m, d]
            e = retrieval_space(e, distance)
            sq = sum((e[..., k, None] - e[..., None, :, k]).pow(2) for k in range(d)).reshape(
                e.shape[0], -1
            )  # (a tiny last dim reduces slowly)
            hits += (sq.index_select(1, ap) < sq.index_select(1, an)).sum(0)
        return float(torch.log((hits + 0.5) / (S + 1)).mean())
