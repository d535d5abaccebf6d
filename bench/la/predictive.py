"""What every Laplace-family method plugin shares, as a public base class in core (so no plugin subclasses
another plugin's private class): the configuration checks, the generator streams that must agree between
them (the Hessian's item subset, the posterior draws) and the predictive of a fitted posterior (glm | lmc
| mc). `methods/laplace.py` (post hoc) and `methods/online_la.py` (trained online) subclass it."""

from __future__ import annotations

import torch

from bench.errors import BenchError, require
from bench.la.likelihood import check_scale
from bench.la.posterior import Posterior
from bench.method import EmbeddingPrediction, Method

PREDICTIVES = ("glm", "lmc", "mc")  # closed-form linearised | linearised Monte Carlo | sampled networks
# generator streams (FitContext.generator offsets) shared by the Laplace plugins
SUBSET_STREAM = 13  # the hessian_items subset of train_id
SAMPLE_STREAM = 41  # the posterior's parameter draws


def positive_number(text: str) -> bool:
    """Whether `text` reads as a number > 0."""
    try:
        return float(text) > 0
    except ValueError:
        return False


class LaplacePredictive(Method):
    """A method whose prediction is a Gaussian posterior's over its `model`'s parameters. A subclass's
    fit sets `model`, `posterior` and `_sample_gen` (the draws' generator); `predict` does the rest.

    Config read here: hessian (ggn | jtj), predictive, hessian_dtype, posterior_samples, hessian_items,
    prior_precision (number | marglik | grid), likelihood_scale (`bench.la.likelihood`), jacobian_chunk."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.posterior: Posterior | None = None
        self._sample_gen: torch.Generator | None = None
        self._samples: dict[str, torch.Tensor] | None = None

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        require(cfg.hessian in ("ggn", "jtj"), f"hessian must be ggn or jtj, got {cfg.hessian!r}")
        cls.check_structure(cfg)
        require(
            cfg.predictive in PREDICTIVES,
            f"predictive must be one of {', '.join(PREDICTIVES)}, got {cfg.predictive!r}",
        )
        require(cfg.hessian_dtype in ("float32", "float64"), "hessian_dtype must be float32 or float64")
        require(cfg.posterior_samples >= 2, f"posterior_samples must be >= 2, got {cfg.posterior_samples}")
        require(
            cfg.hessian_items is None or cfg.hessian_items >= 2,
            f"hessian_items must be >= 2, got {cfg.hessian_items}",
        )
        require(
            cfg.prior_precision in ("marglik", "grid") or positive_number(cfg.prior_precision),
            f"prior_precision must be a positive number, marglik or grid, got {cfg.prior_precision!r}",
        )
        check_scale(cfg)

    @classmethod
    def check_structure(cls, cfg) -> None:
        """BenchError (one line) when the method's curvature structure cannot take cfg's (none here)."""

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
