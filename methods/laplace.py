"""The Laplace family on the contrastive-loss GGN: full, last-layer, diagonal and Kronecker-factored,
one shared implementation; a subclass names its structure (`bench.la.structures`) and its own options."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator

import torch

from bench.data import Split
from bench.errors import BenchError, require
from bench.la import jacobians as jac
from bench.la.curvature import Curvature, accumulate
from bench.la.family import ScaledFamily
from bench.la.likelihood import LikelihoodScale, check_scale
from bench.la.lowrank import MAX_RANK_FRACTION
from bench.la.posterior import PRIOR_TOL, FullPosterior, Posterior
from bench.la.predictive import SAMPLE_STREAM, SUBSET_STREAM, LaplacePredictive
from bench.la.prior import (
    DEFAULT_GRID,
    SCORE_SAMPLES,
    item_groups,
    optimize_marglik,
    standard_draws,
    triplet_log_score,
    triplet_mask,
)
from bench.la.structures import curvature_trace, get_structure, resolve_subset, scale_curvature
from bench.la.tuning import TEMPERATURES, search
from bench.loss import PairLoss
from bench.method import FitContext, Method, Option
from bench.recipes import Knob, Recipe
from bench.registry import register_method

log = logging.getLogger("bench")

VAL_MAX = 1000  # prior_precision=grid without a validation split: items of train_id it scores on
# full posterior above EXACT_EIG_MAX_D: the search's Krylov basis starts at this rank and doubles (up to D *
# MAX_RANK_FRACTION) while the best point is the largest temperature it resolves within the tolerance
TUNE_START_RANK = 1024
TUNE_MAX_ITEMS = 2000  # validation items the search scores on (a seeded subset of larger splits)
VAL_GROUP = 16  # validation items per group: every triplet within a group is scored
# generator streams (FitContext.generator offsets; SUBSET_STREAM = 13 and SAMPLE_STREAM = 41 in
# bench.la.predictive)
PERM_STREAM, LANCZOS_STREAM, VAL_STREAM, GRID_STREAM = 17, 29, 31, 37


# the seed paper's post-hoc Laplace (docs/recipes.md): what it states, with the method's own curvature
SEED_RECIPE = Recipe(
    settings={
        "la_subset": "auto",
        "prior_precision": "marglik",
        "likelihood_scale": "batch",
        "predictive": "glm",
        "posterior_samples": 100,
    },
    source="the seed paper (Mikkelsen, Illum & Olsen), Sec. 3, 6: the Hessian of the full network, "
    "hyper-parameters tuned post hoc (laplace-torch's marglik); with a GGN posterior, the GLM predictive "
    "(Immer et al. 2021, AISTATS: the GGN Laplace is the linearised net's posterior)",
    note="the seed predicts from 100 sampled networks with its J^T J (--preset seed); sampled networks "
    "of a GGN posterior underfit (Immer et al. 2021), measured on the default preset, seed 0: mAP@1 full_la "
    "0.224, diag_la 0.403, kfac_la 0.308 against 0.759 with glm (--set predictive=mc to see it); "
    "the curvature stays the method's own (hessian=ggn, the contrastive-loss GGN; the seed's J^T J is "
    "--set hessian=jtj, and laplace_torch is the J^T J reference); the seed states no temperature: t = 1 "
    "on the loss as trained (likelihood_scale=batch), as laplace-torch's temperature 1; la_subset=auto is "
    "all weights of the MLP (the seed's 'full network') and a CNN's head (its Sec. 5: 'LA only applied on "
    "the linear layers')",
)
# recipe=tuned: the posterior's two scales (DESIGN: prior precision and likelihood temperature), log-spaced
# over the ranges `bench.la.prior.DEFAULT_GRID` and `bench.la.tuning.TEMPERATURES` span and a decade beyond
LAPLACE_KNOBS = {
    "prior_precision": Knob(1e-4, 1e6, log=True),
    "likelihood_scale": Knob(1e-2, 1e5, log=True),
}


class _Laplace(LaplacePredictive):
    """Shared implementation; subclasses set `structure`.

    Stages: "hessian" = curvature accumulation; "prior" = the likelihood temperature and prior precision
    (marglik, grid or tuned on the validation split) and the posterior factorisation; the runner times
    "predict" (GLM closed form or MC). Config: la_subset (the parameters the posterior covers,
    `bench.la.structures.resolve_subset`; the rest stay at theta_MAP), hessian (ggn | jtj), likelihood_scale
    (batch | pair | number | tuned, `bench.la.likelihood`), predictive (glm | lmc | mc), posterior_samples,
    prior_precision (number | marglik | grid), hessian_items, jacobian_chunk, hessian_dtype, batch_size
    (pairs are mined per training-sized batch), the margins; full_la's option posterior_rank_tol, kfac_la's
    kfac_conv.
    """

    reuses_base_model = True
    structure = "full"
    recipes = {"paper": SEED_RECIPE}
    tunable = LAPLACE_KNOBS

    @classmethod
    def check_structure(cls, cfg) -> None:
        get_structure(cls.structure).check_supported(cfg.hessian, cfg.distance)

    @classmethod
    def accumulator_options(cls, cfg) -> dict:
        """Keyword options of the structure's curvature accumulator (kfac_la: reduce)."""
        return {}

    @classmethod
    def rank_tol(cls, cfg) -> float:
        """A full posterior's low-rank tolerance (`FullLaplace.options`); 0 (exact) for the others."""
        return float(cls.option(cfg, "posterior_rank_tol")) if "posterior_rank_tol" in cls.options else 0.0

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._curvature: Curvature | None = None
        self._carried = 1.0  # the temperature the curvature's H carries (scaled in place)
        self._family: ScaledFamily | None = None
        self._generators: tuple[int, int, torch.device] | None = None  # (sample seed, Lanczos seed, device)

    # -- fit -------------------------------------------------------------------------------
    def fit(self, ctx: FitContext) -> None:
        cfg = self.cfg
        scale = check_scale(cfg)
        struct = get_structure(self.structure)
        self.model = ctx.base_model().eval()  # BatchNorm in eval mode: items independent
        subset = resolve_subset(self.structure, cfg.la_subset, self.model)
        params = dict(self.model.named_parameters())
        for name in jac.subset_names(self.model, subset):
            params[name].requires_grad_(True)
        train = ctx.data.train_id
        n_full = len(train)
        train = train.subset(cfg.hessian_items, seed=ctx.seed_for(SUBSET_STREAM))
        acc_dtype = torch.float64 if cfg.hessian_dtype == "float64" else torch.float32
        loss = dataclasses.replace(PairLoss.from_config(cfg), reduction=scale.reduction)
        with ctx.stage("hessian"):
            acc = struct.accumulator(self.model, acc_dtype, subset, **self.accumulator_options(cfg))
            curv = accumulate(
                acc,
                train,
                train.y,
                hessian=cfg.hessian,
                loss=loss,
                mining_batch=cfg.batch_size,
                chunk=cfg.jacobian_chunk,
                generator=ctx.generator(PERM_STREAM),
                progress=not cfg.quiet,
            )
            if len(train) < n_full:  # a subset's GGN, scaled to estimate the full-data GGN
                scale_curvature(curv, n_full / len(train))
        self._curvature, self._generators = (
            curv,
            (ctx.seed_for(SAMPLE_STREAM), ctx.seed_for(LANCZOS_STREAM), ctx.device),
        )
        with ctx.stage(
            "prior"
        ):  # temperature, prior precision and the posterior's factorisation (shared work)
            self.posterior, delta, temperature, info = self._prior(ctx, curv, scale)
        self._sample_gen = ctx.generator(SAMPLE_STREAM, ctx.device)  # networks drawn on the first MC predict
        self._samples = None
        if not cfg.sensitivity_requested():
            self._family = None  # only a sensitivity sweep reuses it after fit
        st = curv.stats
        self.diagnostics = {
            "structure": self.structure,
            "subset": curv.subset,
            "la_subset": cfg.la_subset,
            "hessian": cfg.hessian,
            "predictive": cfg.predictive,
            "D": curv.D,
            "D_model": sum(p.numel() for p in params.values()),
            "prior_precision": delta,
            "likelihood_scale": cfg.likelihood_scale,
            "likelihood_observations": scale.observations,
            "temperature": temperature,
            "curvature_trace": curvature_trace(curv) * temperature / self._carried,
            **info,
            "hessian_items": st["items"],
            "hessian_rows": st["rows"],
            "dropped_curvature_output": st["dropped_fraction_output"],
            "dropped_curvature_param": st["dropped_fraction_param"],
            "jitter": getattr(self.posterior, "jitter", 0.0),
        }
        if "excluded_params" in st:  # kfac_la: parameters of the subset outside Linear/Conv2d layers
            self.diagnostics["excluded_params"] = st["excluded_params"]

    def _prior(
        self, ctx: FitContext, curv: Curvature, scale: LikelihoodScale
    ) -> tuple[Posterior, float, float, dict]:
        """(posterior, delta, t, info): a fixed temperature t scales H in place, then marglik or the
        number as before; tuned scales and prior_precision=grid search on the validation split."""
        pp, post = self.cfg.prior_precision, get_structure(self.structure).posterior
        if scale.tuned or pp == "grid":
            return self._tune(ctx, curv, scale)
        t = float(scale.temperature)  # type: ignore[arg-type]
        if t != 1.0:
            scale_curvature(curv, t)
            self._carried = t
        if pp == "marglik":
            theta_sq = self._theta_sq(curv)
            prior, method = (lambda spec: optimize_marglik(spec, theta_sq)), "marglik"
        else:
            prior, method = float(pp), "fixed"
        posterior, delta, info = post.fit(
            self.model, curv, prior, ctx.generator(LANCZOS_STREAM), rank_tol=self.rank_tol(self.cfg)
        )
        return posterior, delta, t, {"prior_method": method, "scale_method": "fixed", **info}

    def _theta_sq(self, curv: Curvature) -> float:
        return float(jac.flat_params(self.model, curv.names).double().pow(2).sum())

    def _validation(self, ctx: FitContext) -> tuple[Split, str]:
        """The split the search scores on: Dataset.val_id (never trained on; at most TUNE_MAX_ITEMS of it),
        else, for prior_precision=grid only, a seeded subset of train_id (min(VAL_MAX, 10%) items, which
        the base model saw in training: a calibration split rather than held-out data)."""
        if ctx.data.val_id is not None:
            return ctx.data.val_id.subset(TUNE_MAX_ITEMS, seed=ctx.seed_for(VAL_STREAM)), "val_id"
        train = ctx.data.train_id
        return train.subset(
            max(2 * VAL_GROUP, min(VAL_MAX, len(train) // 10)), seed=ctx.seed_for(VAL_STREAM)
        ), "train_id"

    def _tune(
        self, ctx: FitContext, curv: Curvature, scale: LikelihoodScale
    ) -> tuple[Posterior, float, float, dict]:
        """Search (t, delta) by the validation triplet log-likelihood under the joint linearised predictive
        (`bench.la.tuning`), every point from one factorisation; the posterior at the chosen point."""
        cfg = self.cfg
        temps = TEMPERATURES if scale.tuned else (float(scale.temperature),)  # type: ignore[arg-type]
        prior = (
            cfg.prior_precision if cfg.prior_precision in ("marglik", "grid") else float(cfg.prior_precision)
        )
        theta_sq = self._theta_sq(curv)

        def smallest_ratio(spectrum) -> float:  # the smallest delta / t the search asks for
            if prior == "marglik":
                return min(optimize_marglik(spectrum.scaled(t), theta_sq)[0] / t for t in temps)
            return (min(DEFAULT_GRID) if prior == "grid" else float(prior)) / max(temps)

        val, source = self._validation(ctx)
        tol = self.rank_tol(cfg) or PRIOR_TOL
        gen = ctx.generator(GRID_STREAM)
        groups = item_groups(len(val), VAL_GROUP, gen)
        trip = triplet_mask(val.y[groups])
        require(
            bool(trip.any()),
            f"{self.name}: the validation split ({len(val)} items) has no triplet; set a larger val_items",
        )
        z = None  # drawn once, shared by every (t, delta) and every basis
        limit, rank, ranks = int(curv.D * MAX_RANK_FRACTION), TUNE_START_RANK, []
        while True:  # a low-rank basis grows (doubling) while the best point is the largest one it resolves
            family = ScaledFamily.build(
                self.model,
                curv,
                smallest_ratio,
                tol=tol,
                max_rank=min(rank, limit),
                generator=ctx.generator(LANCZOS_STREAM),
            )
            proj = family.project(val, groups)
            if z is None:
                z = standard_draws(SCORE_SAMPLES, groups.shape[0], proj.A.shape[1], gen)

            def score(t, d, proj=proj, family=family, z=z):  # (bound now: the search runs in this iteration)
                return triplet_log_score(
                    proj.f, family.joint_cov(proj, t, d), trip.to(proj.f.device), z, cfg.distance
                )

            def delta_at(t, family=family):
                return optimize_marglik(family.spectrum(t), theta_sq)

            t, delta, search_info = search(score, temps, prior, delta_at, family.bound, max_bound=tol)
            ranks.append(None if family.basis is None else family.basis.rank)
            if family.basis is None or not search_info["trust_edge"] or rank >= limit:
                break
            rank *= 2
        require(
            search_info["best"] is not None,
            f"{self.name}: no (temperature, prior precision) point is within the "
            f"low-rank basis's tolerance {tol:g} even at rank {ranks[-1]}",
        )
        if search_info["trust_edge"]:
            log.warning(
                "%s: the best likelihood temperature %.3g is the largest the low-rank basis (rank "
                "%d) resolves "
                "within %.2g; larger ones were not scored",
                self.name,
                t,
                family.basis.rank,
                tol,
            )
        search_info["basis_ranks"] = ranks
        self._family = family
        posterior, post_info = self._final(family, curv, t, delta, ctx, tol)
        info = {
            "prior_method": prior if isinstance(prior, str) else "fixed",
            "scale_method": "tuned" if scale.tuned else "fixed",
            "tuning": {
                **search_info,
                "val_source": source,
                "val_items": len(val),
                "val_groups": int(groups.shape[0]),
                "triplets": int(trip.sum()),
            },
            **post_info,
        }
        return posterior, delta, t, info

    def _final(
        self, family: ScaledFamily, curv: Curvature, t: float, delta: float, ctx: FitContext, tol: float
    ) -> tuple[Posterior, dict]:
        """The posterior at the chosen (t, delta): from the family's factorisation, unless it is a
        low-rank basis outside the tolerance there (or the exact full posterior was asked for,
        posterior_rank_tol=0): then H is scaled in place and the full posterior fitted at that point."""
        rank_tol = self.rank_tol(self.cfg)
        if family.basis is None:
            posterior = family.posterior(t, delta)
            return posterior, ({"posterior": "cholesky"} if isinstance(posterior, FullPosterior) else {})
        bound = family.bound(t, delta)
        if rank_tol > 0 and bound <= rank_tol:
            return family.posterior(t, delta), {**family.basis.info(delta), "rank_bound": bound}
        scale_curvature(
            curv, t / self._carried
        )  # the family keeps its own basis; only its posteriors read it
        self._carried = t
        posterior, _, info = get_structure(self.structure).posterior.fit(
            self.model, curv, delta, ctx.generator(LANCZOS_STREAM), rank_tol=rank_tol
        )
        return posterior, info

    # -- sensitivity -----------------------------------------------------------------------
    def variants(self, points: list[dict]) -> Iterator[tuple[dict, Method]] | None:
        """Fitted copies at other (prior_precision, likelihood_scale) points, from one factorisation of
        the curvature (the fit's own family when it tuned, else one built here for the points). A
        missing (None) coordinate is the fitted value; likelihood_scale is the temperature on the
        accumulated curvature's observation unit (batch, or pair for likelihood_scale=pair)."""
        if self.posterior is None or self._curvature is None:
            raise BenchError(f"{self.name}: variants asked before fit")
        fitted = (self.diagnostics["prior_precision"], self.diagnostics["temperature"])
        resolved = [
            (p.get("prior_precision") or fitted[0], p.get("likelihood_scale") or fitted[1]) for p in points
        ]
        return self._variants(resolved)

    def _variants(self, resolved: list[tuple[float, float]]) -> Iterator[tuple[dict, Method]]:
        sample_seed, lanczos_seed, device = self._generators
        if self._family is None:
            ratio = min(d / t for d, t in resolved) * self._carried  # relative to H as it is now
            self._family = ScaledFamily.build(
                self.model,
                self._curvature,
                lambda spectrum: ratio,
                tol=self.rank_tol(self.cfg) or PRIOR_TOL,
                generator=torch.Generator().manual_seed(lanczos_seed),
                carried=self._carried,
            )
        for delta, t in resolved:
            v = copy.copy(self)
            v.posterior, v._samples = self._family.posterior(t, delta), None
            v._sample_gen = torch.Generator(device=device).manual_seed(
                sample_seed
            )  # the fit's draws, per variant
            yield (
                {
                    "prior_precision": float(delta),
                    "likelihood_scale": float(t),
                    "rank_bound": self._family.bound(t, delta),
                },
                v,
            )


@register_method("full_la")
class FullLaplace(_Laplace):
    """Laplace, full GGN of the contrastive loss over la_subset (auto: all weights, a CNN's head;
    low-rank or Cholesky posterior)."""

    structure = "full"
    options = {
        "posterior_rank_tol": Option(
            float,
            0.2,
            "D > 4000: low-rank posterior, every covariance within 1 + tol of the exact one (a bound; "
            "paper preset: measured max 1.8%, marglik delta within 0.6%); 0: exact Cholesky",
            minimum=0.0,
        )
    }


@register_method("last_layer_la")
class LastLayerLaplace(_Laplace):
    """Laplace, full GGN over the last Linear layer only (closed-form Jacobian)."""

    structure = "last_layer"


@register_method("diag_la")
class DiagLaplace(_Laplace):
    """Laplace, diagonal GGN of the contrastive loss over la_subset (auto: all weights)."""

    structure = "diag"


@register_method("kfac_la")
class KfacLaplace(_Laplace):
    """Laplace, Kronecker-factored GGN per Linear and Conv2d layer (KFC factors of unfolded patches)."""

    structure = "kron"
    options = {
        "kfac_conv": Option(
            str,
            "expand",
            "Conv2d factors: expand = KFC, one pseudo-sample per output location (Grosse & Martens "
            "2016); reduce = per item, patches averaged and output gradients summed (Eschenhagen et "
            "al. 2023)",
            choices=("expand", "reduce"),
        )
    }

    @classmethod
    def accumulator_options(cls, cfg) -> dict:
        return {"reduce": cls.option(cfg, "kfac_conv") == "reduce"}
