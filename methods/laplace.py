"""The Laplace family on the contrastive-loss GGN: full, last-layer, diagonal and Kronecker-factored.

All four share `_Laplace`; a subclass only names its curvature structure and parameter subset.
Stages: "hessian" = curvature accumulation (`bench.laplace.curvature`); "prior" = prior-precision
tuning and the posterior factorisation; "predict" = the predictive (GLM closed form or MC).
Config: hessian (ggn | jtj), predictive (glm | mc), samples, prior_precision (number | marglik | grid),
hessian_batch_size (items per Jacobian chunk), hessian_dtype (accumulation), batch_size (mining
batch: pairs are mined per training-sized batch, like training), the loss/miner margins.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, vmap

from bench.errors import BenchError
from bench.laplace import jacobians as jac
from bench.laplace.curvature import Curvature, PairLoss, compute_curvature, scale_curvature
from bench.laplace.posterior import KronPosterior, Posterior, make_posterior, theta_map
from bench.laplace.prior import (DEFAULT_GRID, exact_spectrum, full_spectrum, optimize_marglik,
                                 triplet_log_score)
from bench.method import EmbeddingPrediction, FitContext, Method
from bench.registry import register_method

VAL_MAX = 1000  # items of the validation split carved from train_id for prior_precision=grid


class _Laplace(Method):
    """Shared implementation; subclasses set `structure` and `subset`."""

    post_hoc = True
    structure = "full"
    subset = "all"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.diagnostics: dict = {}
        self._samples: dict[str, torch.Tensor] | None = None

    # -- fit -------------------------------------------------------------------------------
    def fit(self, ctx: FitContext) -> None:
        cfg = self.cfg
        self._ctx = ctx
        self.model = ctx.base_model().eval()
        for p in self.model.parameters():
            p.requires_grad_(True)
        train = ctx.data.train_id
        n_full = len(train)
        train = train.subset(cfg.hessian_samples, seed=ctx.seed * 1000003 + 13)
        acc_dtype = torch.float64 if cfg.hessian_dtype == "float64" else torch.float32
        perm_gen = torch.Generator().manual_seed(ctx.seed * 1000003 + 17)
        with ctx.stage("hessian"):
            curv = compute_curvature(self.model, train.x, train.y, structure=self.structure, subset=self.subset,
                                     hessian=cfg.hessian, loss=PairLoss.from_config(cfg),
                                     mining_batch=cfg.batch_size, chunk=cfg.hessian_batch_size,
                                     dtype=acc_dtype, generator=perm_gen, progress=not cfg.quiet)
            if len(train) < n_full:  # a subset's GGN, scaled to estimate the full-data GGN
                scale_curvature(curv, n_full / len(train))
        with ctx.stage("prior"):
            delta, info = self._prior(ctx, curv)
            self.posterior: Posterior = make_posterior(self.model, curv, delta)
        st = curv.stats
        self.diagnostics = {
            "structure": self.structure, "subset": self.subset, "hessian": cfg.hessian,
            "predictive": cfg.predictive, "D": curv.D, "prior_precision": delta, **info,
            "hessian_items": st["items"], "hessian_rows": st["rows"],
            "dropped_curvature_output": st["dropped_fraction_output"],
            "dropped_curvature_param": st["dropped_fraction_param"],
            "jitter": getattr(self.posterior, "jitter", 0.0),
        }

    def _prior(self, ctx: FitContext, curv: Curvature) -> tuple[float, dict]:
        pp = self.cfg.prior_precision
        if pp not in ("marglik", "grid"):
            return float(pp), {"prior_method": "fixed"}
        if pp == "marglik":
            theta_sq = float(theta_map(self.model, curv).double().pow(2).sum())
            if curv.structure == "full":
                spec = full_spectrum(curv.H, generator=torch.Generator().manual_seed(ctx.seed * 1000003 + 29))
            elif curv.structure == "diag":
                spec = exact_spectrum(curv.H)
            else:
                spec = exact_spectrum(KronPosterior(self.model, curv, 1.0).eigenvalues())
            delta, info = optimize_marglik(spec, theta_sq)
            return delta, {"prior_method": "marglik", **info}
        return self._grid(ctx, curv)

    def _grid(self, ctx: FitContext, curv: Curvature) -> tuple[float, dict]:
        """Grid over DEFAULT_GRID scored by `triplet_log_score` on a seeded validation split of
        train_id (min(VAL_MAX, 10%) items; the base model saw them in training, so it is a
        calibration split rather than held-out data)."""
        train = ctx.data.train_id
        n_val = max(32, min(VAL_MAX, len(train) // 10))
        val = train.subset(n_val, seed=ctx.seed * 1000003 + 31)
        xv = val.x.to(ctx.device)
        with torch.no_grad():
            mean = self.model(xv)
        scores = {}
        for delta in DEFAULT_GRID:
            post = make_posterior(self.model, curv, delta)
            cov = self._glm_cov(post, xv)
            g = torch.Generator().manual_seed(ctx.seed * 1000003 + 37)  # same draws for every delta
            scores[delta] = triplet_log_score(mean.cpu(), cov.cpu(), val.y, g, batch=self.cfg.batch_size)
            del post
        best = max(scores, key=lambda k: scores[k])
        return best, {"prior_method": "grid", "grid_scores": {f"{k:g}": v for k, v in scores.items()},
                      "val_items": n_val}

    # -- predict ---------------------------------------------------------------------------
    def _glm_cov(self, post: Posterior, x: torch.Tensor) -> torch.Tensor:
        step = max(1, self.cfg.hessian_batch_size)
        return torch.cat([post.glm_cov(self.model, x[i:i + step]) for i in range(0, len(x), step)])

    def predict(self, x: torch.Tensor) -> EmbeddingPrediction:
        ctx = getattr(self, "_ctx", None)
        if ctx is None:
            raise BenchError(f"{self.name}: predict called before fit")
        with ctx.stage("predict"):
            dev = next(self.model.parameters()).device
            xd = x.to(dev)
            if self.cfg.predictive == "glm":
                with torch.no_grad():
                    mean = self.model(xd)
                cov = self._glm_cov(self.posterior, xd).to(mean.dtype)
            else:
                mean, cov = self._mc(xd)
            return EmbeddingPrediction(mean=mean.to(x.device), cov=cov.to(x.device))

    def _mc(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample mean and covariance of f(x) over S networks theta_s ~ posterior (drawn once, shared
        by every query set)."""
        if self._samples is None:
            self._samples = self.posterior.sample_params(self.cfg.samples, self._ctx.generator(41))
        base = {k: v.detach() for k, v in self.model.named_parameters()}

        def f(p: dict[str, torch.Tensor], xc: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, {**base, **p}, (xc,))

        outs = []
        step = max(1, self.cfg.hessian_batch_size) * 16
        with torch.no_grad():
            for i in range(0, len(x), step):
                outs.append(vmap(f, in_dims=(0, None))(self._samples, x[i:i + step]))  # [S, n, d]
        E = torch.cat(outs, dim=1)
        mean = E.mean(0)
        c = E - mean
        cov = torch.einsum("sna,snb->nab", c, c) / (E.shape[0] - 1)
        return mean, cov


@register_method("full_la")
class FullLaplace(_Laplace):
    """Laplace, full GGN of the contrastive loss over all weights (Cholesky posterior)."""

    structure, subset = "full", "all"


@register_method("last_layer_la")
class LastLayerLaplace(_Laplace):
    """Laplace, full GGN over the last Linear layer only (closed-form Jacobian)."""

    structure, subset = "full", "last_layer"


@register_method("diag_la")
class DiagLaplace(_Laplace):
    """Laplace, diagonal GGN of the contrastive loss over all weights."""

    structure, subset = "diag", "all"


@register_method("kfac_la")
class KfacLaplace(_Laplace):
    """Laplace, Kronecker-factored GGN per Linear layer."""

    structure, subset = "kron", "all"


__all__ = ["FullLaplace", "LastLayerLaplace", "DiagLaplace", "KfacLaplace"]
