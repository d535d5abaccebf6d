"""Deep ensemble (Lakshminarayanan et al., 2017): M independently seeded nets from the shared loop.

Members. Member m is an embedding net trained on the shared objective (same data, loss, miner,
optimiser, epochs; no dropout) with seed s_m, where s_0 = cfg.seed (the base model's seed) and, for
m >= 1, s_m = member_seed(cfg.seed, m), derived with numpy's SeedSequence((cfg.seed, m)) so members
of different run seeds never collide with each other or with small base seeds. The M members are
trained side by side (`ctx.train_models`: one vmapped step over the stacked parameters), each with
its own seed, initialisation, data order and Adam state, so member m equals the net trained alone
with seed s_m up to float rounding; member 0 is therefore not the cached base model itself but its
twin. The members are cached as a group: a rerun loads them. The joint training time is charged to
this method's "train" stage, also when loaded from the cache.

Alignment (why averaging is meaningful). The contrastive loss sees embeddings only through
Euclidean distances, so each member's embedding is determined at best up to an isometry
z -> z R + t (rotation or reflection R, translation t); the margins fix the scale. Averaging raw
coordinates across members would mix unrelated frames and shrink the mean towards the origin. We
therefore map every member into member 0's frame with the orthogonal-Procrustes isometry
(bench/alignment.py) fitted on the embeddings of the same training images:

    A_m = argmin_{R orthogonal, t} sum_i || (f_m(x_i) - mu_m) R + t - f_0(x_i) ||^2,  x_i in train_id subset
    g_m(x) = A_m(f_m(x)),  g_0 = f_0

on up to ALIGN_MAX_POINTS training images drawn with a seeded generator. The prediction for a query x:

    mean(x) = (1/M) sum_m g_m(x)
    var(x)  = (1/(M-1)) sum_m (g_m(x) - mean(x))^2       (per dimension, unbiased)
    cov(x)  = (1/(M-1)) sum_m (g_m - mean)(g_m - mean)^T  (only for d <= SAMPLE_COV_MAX_DIM)

Whatever disagreement survives the best isometry (members that learned genuinely different
geometries, especially far from the training data) is what the variance measures. The alignment
residual per member (RMS distance after alignment on the fitting points, absolute and relative to
the reference spread) is kept in the run's diagnostics. Alignment is timed as part of "train".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bench.alignment import Alignment, fit_procrustes
from bench.method import EmbeddingPrediction, FitContext, Method, Option
from bench.recipes import Recipe
from bench.registry import register_method

ALIGN_MAX_POINTS = 5000  # training images used to fit each member's alignment
ALIGN_OFFSET = 0xA11  # generator offset of the alignment subsample


def member_seed(seed: int, m: int) -> int:
    """Training seed of ensemble member m for run seed `seed`: the run seed for m = 0, else a
    31-bit integer derived from SeedSequence((seed, m)) (deterministic, distinct per (seed, m))."""
    if m == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(m)]).generate_state(1, dtype=np.uint32)[0] >> 1)


def member_seeds(seed: int, size: int) -> list[int]:
    """Seeds of the `size` members (distinct; raises if a derived seed collided, which is ~never)."""
    seeds = [member_seed(seed, m) for m in range(size)]
    if len(set(seeds)) != len(seeds):  # pragma: no cover - 31-bit collision
        raise RuntimeError(f"ensemble member seeds collide for seed {seed}: {seeds}")
    return seeds


@register_method("deep_ensemble")
class DeepEnsemble(Method):
    """Deep ensemble of M seeded nets, Procrustes-aligned to member 0; mean and variance across members."""

    reuses_base_model = False
    options = {
        "ensemble_size": Option(int, 5, "ensemble members M (Lakshminarayanan et al. 2017: 5)", minimum=2)
    }
    recipes = {
        "paper": Recipe(
            settings={"ensemble_size": 5},
            source="Lakshminarayanan et al. 2017 (NeurIPS); M = 5 networks in its experiments, from random "
            "initialisations and data orders (no adversarial training here: the loss is the shared "
            "contrastive one)",
        )
    }
    # nothing to tune: M is a compute budget, not a hyperparameter (more members only refine the estimate
    # of the same predictive; a search would pick the largest M it is allowed)
    tunable = {}

    @classmethod
    def relative_cost(cls, cfg) -> float:
        """M nets trained side by side: about M post-hoc fits."""
        return float(cls.option(cfg, "ensemble_size"))

    def fit(self, ctx: FitContext) -> None:
        self.seeds = member_seeds(ctx.seed, self.option(self.cfg, "ensemble_size"))
        self.members: list[nn.Module] = ctx.train_models(self.seeds)
        for m in self.members:
            m.eval()
        with ctx.stage("train"), torch.no_grad():
            train = ctx.data.train_id
            n = len(train)
            g = ctx.generator(ALIGN_OFFSET)
            idx = torch.randperm(n, generator=g)[:ALIGN_MAX_POINTS]
            xs = train.inputs(idx).to(ctx.device)
            ref = self.members[0](xs)
            self.alignments: list[Alignment] = [Alignment.identity(ref.shape[1])]
            for model in self.members[1:]:
                self.alignments.append(fit_procrustes(model(xs), ref, center=True))
        self.diagnostics = {
            "member_seeds": self.seeds,
            "align_points": int(len(idx)),
            "align_rms": [a.residual for a in self.alignments],
            "align_relative_rms": [a.relative_residual for a in self.alignments],
            "align_det": [float(torch.linalg.det(a.rotation.double())) for a in self.alignments],
        }

    def member_embeddings(self, x: torch.Tensor, aligned: bool = True) -> torch.Tensor:
        """Embeddings of x by every member [M, N, d], mapped into member 0's frame if `aligned`."""
        outs = []
        for model, a in zip(self.members, self.alignments):
            z = model(x)
            outs.append(a.apply(z) if aligned else z)
        return torch.stack(outs)

    def predict(self, x: torch.Tensor) -> EmbeddingPrediction:
        z = self.member_embeddings(x, aligned=True)
        return EmbeddingPrediction.from_sample_moments(z)
