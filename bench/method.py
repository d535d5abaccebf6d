"""The method plugin interface: Method, the context it fits in, and the prediction it returns."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

if TYPE_CHECKING:
    from bench.config import RunConfig
    from bench.model import EmbeddingNet
    from bench.timing import StageTimer
    from datasets.base import Dataset


@dataclass
class EmbeddingPrediction:
    """Predicted embeddings of N queries: mean [N, d] and, for uncertainty-aware methods, the
    per-dimension variance [N, d] and optionally the full covariance [N, d, d] (None otherwise)."""

    mean: torch.Tensor
    var: torch.Tensor | None = None
    cov: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.var is None and self.cov is not None:
            self.var = torch.diagonal(self.cov, dim1=-2, dim2=-1)

    @property
    def has_uncertainty(self) -> bool:
        return self.var is not None

    def uncertainty(self) -> torch.Tensor | None:
        """Uncertainty score per query [N]: trace of the embedding covariance (sum of variances)."""
        return None if self.var is None else self.var.sum(dim=-1)

    def to(self, device: torch.device | str) -> "EmbeddingPrediction":
        mv = lambda t: None if t is None else t.to(device)
        return EmbeddingPrediction(mv(self.mean), mv(self.var), mv(self.cov))


@dataclass
class FitContext:
    """What a method may use while fitting: the config, the data, the device, the stage timer and
    the shared training loop (cached). `train_model` trains (or loads) a net; `base_model` is the
    shared MAP network that all post-hoc methods reuse."""

    cfg: "RunConfig"
    data: "Dataset"
    device: torch.device
    timer: "StageTimer"
    method: str
    train_model: Callable[..., "EmbeddingNet"]
    seed: int

    def base_model(self) -> "EmbeddingNet":
        """The shared MAP embedding net (trained once per run and cached; charged to the run's base)."""
        return self.train_model(seed=self.seed, dropout=0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage of this method (train, hessian, prior, predict, evaluate)."""
        with self.timer.stage(self.method, name):
            yield

    def generator(self, offset: int = 0) -> torch.Generator:
        """A seeded torch.Generator on the run's device, distinct per offset."""
        return torch.Generator(device=self.device).manual_seed(self.seed * 1000003 + offset)


class Method:
    """Base class of method plugins. Subclasses set `post_hoc` and implement fit and predict.

    `post_hoc = True` means the method reuses the shared base model: its train stage is the shared
    base training, counted once per run and reported separately (method "base").
    """

    name: str = ""
    post_hoc: bool = False

    def __init__(self, cfg: "RunConfig") -> None:
        self.cfg = cfg

    def fit(self, ctx: FitContext) -> None:
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> EmbeddingPrediction:
        raise NotImplementedError
