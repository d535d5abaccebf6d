"""The Laplace family on the contrastive-loss GGN: full, last-layer, diagonal and Kronecker-factored,
one shared implementation; a subclass names its structure (`bench.la.structures`) and its own options."""
from __future__ import annotations


import torch

from bench.errors import BenchError, require
from bench.la import jacobians as jac
from bench.la.curvature import Curvature, PairLoss, accumulate, check_supported, scale_curvature
from bench.la.posterior import Posterior
from bench.la.prior import DEFAULT_GRID, optimize_marglik, triplet_log_score
from bench.la.structures import get_structure, resolve_subset
from bench.method import EmbeddingPrediction, FitContext, Method, Option
from bench.registry import register_method

PREDICTIVES = ("glm", "lmc", "mc")  # closed-form linearised | linearised Monte Carlo | sampled networks
VAL_MAX = 1000  # items of the validation split carved from train_id for prior_precision=grid
# generator streams (FitContext.generator offsets)
SUBSET_STREAM, PERM_STREAM, LANCZOS_STREAM, VAL_STREAM, GRID_STREAM, SAMPLE_STREAM = 13, 17, 29, 31, 37, 41


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


class _Laplace(Method):
    """Shared implementation; subclasses set `structure`.

    Stages: "hessian" = curvature accumulation; "prior" = prior-precision tuning and the posterior
    factorisation; the runner times "predict" (GLM closed form or MC). Config: la_subset (the parameters
    the posterior covers, `bench.la.structures.resolve_subset`; the rest stay at theta_MAP), hessian
    (ggn | jtj), predictive (glm | lmc | mc), posterior_samples, prior_precision (number | marglik | grid),
    hessian_items, jacobian_chunk, hessian_dtype, batch_size (pairs are mined per training-sized batch),
    the margins; full_la's option posterior_rank_tol, kfac_la's kfac_conv.
    """

    post_hoc = True
    structure = "full"

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        require(cfg.hessian in ("ggn", "jtj"), f"hessian must be ggn or jtj, got {cfg.hessian!r}")
        check_supported(cls.structure, cfg.hessian, cfg.distance)
        require(cfg.predictive in PREDICTIVES, f"predictive must be one of {', '.join(PREDICTIVES)}, got {cfg.predictive!r}")
        require(cfg.hessian_dtype in ("float32", "float64"), "hessian_dtype must be float32 or float64")
        require(cfg.posterior_samples >= 2, f"posterior_samples must be >= 2, got {cfg.posterior_samples}")
        require(cfg.hessian_items is None or cfg.hessian_items >= 2,
                f"hessian_items must be >= 2, got {cfg.hessian_items}")
        require(cfg.prior_precision in ("marglik", "grid") or _positive_number(cfg.prior_precision),
                f"prior_precision must be a positive number, marglik or grid, got {cfg.prior_precision!r}")

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
        self.posterior: Posterior | None = None
        self._sample_gen: torch.Generator | None = None
        self._samples: dict[str, torch.Tensor] | None = None

    # -- fit -------------------------------------------------------------------------------
    def fit(self, ctx: FitContext) -> None:
        cfg = self.cfg
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
        with ctx.stage("hessian"):
            acc = struct.accumulator(self.model, acc_dtype, subset, **self.accumulator_options(cfg))
            curv = accumulate(acc, train, train.y, hessian=cfg.hessian,
                              loss=PairLoss.from_config(cfg), mining_batch=cfg.batch_size,
                              chunk=cfg.jacobian_chunk, generator=ctx.generator(PERM_STREAM),
                              progress=not cfg.quiet)
            if len(train) < n_full:  # a subset's GGN, scaled to estimate the full-data GGN
                scale_curvature(curv, n_full / len(train))
        with ctx.stage("prior"):  # the prior precision and the posterior's factorisation (shared work)
            self.posterior, delta, info = self._prior(ctx, curv)
        self._sample_gen = ctx.generator(SAMPLE_STREAM, ctx.device)  # networks drawn on the first MC predict
        self._samples = None
        st = curv.stats
        self.diagnostics = {
            "structure": self.structure, "subset": curv.subset, "la_subset": cfg.la_subset, "hessian": cfg.hessian,
            "predictive": cfg.predictive, "D": curv.D, "D_model": sum(p.numel() for p in params.values()),
            "prior_precision": delta, **info,
            "hessian_items": st["items"], "hessian_rows": st["rows"],
            "dropped_curvature_output": st["dropped_fraction_output"],
            "dropped_curvature_param": st["dropped_fraction_param"],
            "jitter": getattr(self.posterior, "jitter", 0.0),
        }
        if "excluded_params" in st:  # kfac_la: parameters of the subset outside Linear/Conv2d layers
            self.diagnostics["excluded_params"] = st["excluded_params"]

    def _prior(self, ctx: FitContext, curv: Curvature) -> tuple[Posterior, float, dict]:
        """(posterior, delta, info) for the configured prior precision (marglik, grid or a number)."""
        pp, post = self.cfg.prior_precision, get_structure(self.structure).posterior
        if pp == "grid":
            delta, info = self._grid(ctx, curv)
            return post(self.model, curv, delta), delta, info
        if pp == "marglik":
            theta_sq = float(jac.flat_params(self.model, curv.names).double().pow(2).sum())
            prior, method = (lambda spec: optimize_marglik(spec, theta_sq)), "marglik"
        else:
            prior, method = float(pp), "fixed"
        posterior, delta, info = post.fit(self.model, curv, prior, ctx.generator(LANCZOS_STREAM),
                                          rank_tol=self.rank_tol(self.cfg))
        return posterior, delta, {"prior_method": method, **info}

    def _grid(self, ctx: FitContext, curv: Curvature) -> tuple[float, dict]:
        """Grid over DEFAULT_GRID scored by `triplet_log_score` on a seeded validation split of
        train_id (min(VAL_MAX, 10%) items; the base model saw them in training, so it is a
        calibration split rather than held-out data)."""
        train = ctx.data.train_id
        n_val = max(32, min(VAL_MAX, len(train) // 10))
        val = train.subset(n_val, seed=ctx.seed_for(VAL_STREAM))
        xv = torch.cat(list(val.chunks())).to(ctx.device)
        with torch.no_grad():
            mean = self.model(xv)
        posterior = get_structure(self.structure).posterior
        scores = {}
        for delta in DEFAULT_GRID:
            cov = posterior(self.model, curv, delta).glm_cov(xv, self.cfg.jacobian_chunk)
            scores[delta] = triplet_log_score(mean.cpu(), cov.cpu(), val.y, ctx.generator(GRID_STREAM),
                                              batch=self.cfg.batch_size)  # same draws for every delta
        best = max(scores, key=lambda k: scores[k])
        return best, {"prior_method": "grid", "grid_scores": {f"{k:g}": v for k, v in scores.items()},
                      "val_items": n_val}

    # -- predict ---------------------------------------------------------------------------
    def predict(self, x: torch.Tensor) -> EmbeddingPrediction:
        """predictive=glm: the closed-form linearised moments (mean f_MAP, covariance J Sigma J^T), plus
        S = posterior_samples joint samples of that linearised predictive for retrieval-level scores;
        lmc: the moments of those linearised samples (linearised Monte Carlo); mc: the moments of S
        sampled networks f(x; theta_s) (the seed's predictive). The S parameter draws are made once and
        shared by every query set (and chunk), so the samples are joint across query and gallery items."""
        post = self.posterior
        if post is None:
            raise BenchError(f"{self.name}: predict called before fit")
        xd = x.to(next(self.model.parameters()).device)
        if self._samples is None:  # S parameter sets drawn once, shared by every query set
            self._samples = post.sample_params(self.cfg.posterior_samples, self._sample_gen)
        chunk = self.cfg.jacobian_chunk * 16
        if self.cfg.predictive == "mc":
            E = post.sampled_embeddings(self._samples, xd, chunk)  # [S, n, d]
            return EmbeddingPrediction.from_samples(E).to(x.device)
        E = post.linearized_embeddings(self._samples, xd, chunk)
        if self.cfg.predictive == "lmc":
            return EmbeddingPrediction.from_samples(E).to(x.device)
        with torch.no_grad():
            mean = self.model(xd)
        cov = post.glm_cov(xd, self.cfg.jacobian_chunk).to(mean.dtype)
        return EmbeddingPrediction(mean=mean, cov=cov, samples=E.to(mean.dtype)).to(x.device)


@register_method("full_la")
class FullLaplace(_Laplace):
    """Laplace, full GGN of the contrastive loss over la_subset (auto: all weights, a CNN's head;
    low-rank or Cholesky posterior)."""

    structure = "full"
    options = {"posterior_rank_tol": Option(
        float, 0.2, "D > 4000: low-rank posterior, every covariance within 1 + tol of the exact one (a bound; "
        "paper preset: measured max 1.8%, marglik delta within 0.6%); 0: exact Cholesky", minimum=0.0)}


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
    options = {"kfac_conv": Option(
        str, "expand", "Conv2d factors: expand = KFC, one pseudo-sample per output location (Grosse & Martens "
        "2016); reduce = per item, patches averaged and output gradients summed (Eschenhagen et al. 2023)",
        choices=("expand", "reduce"))}

    @classmethod
    def accumulator_options(cls, cfg) -> dict:
        return {"reduce": cls.option(cfg, "kfac_conv") == "reduce"}
