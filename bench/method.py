"""The method plugin contract: Method, the context it fits in, and the prediction it returns."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from bench.errors import require

if TYPE_CHECKING:
    from torch import nn

    from bench.config import RunConfig
    from bench.data import Dataset
    from bench.recipes import Knob, Recipe
    from bench.timing import StageTimer

SEED_STRIDE = 1_000_003  # generator seeds are seed * SEED_STRIDE + offset: distinct streams per offset


def stream_seed(seed: int, offset: int) -> int:
    """The integer seed of stream `offset` of run seed `seed` (FitContext.seed_for, also for evaluation)."""
    return seed * SEED_STRIDE + offset


SAMPLE_COV_MAX_DIM = 16  # sampling methods' full per-query covariance only up to this width


@dataclass
class EmbeddingPrediction:
    """Predicted embeddings of N queries: mean [N, d] and, for uncertainty-aware methods, the
    per-dimension variance [N, d] and optionally the full covariance [N, d, d] (None otherwise).

    samples [S, N, d] (optional): S joint draws of the N embeddings from the method's predictive,
    for scores computed at the level of retrieval (does the top-1 label change under the predictive?).
    Draw s of every query set of one fitted method comes from the same weights / members / posterior
    sample, so query and gallery items are jointly distributed (a method whose items are independent,
    e.g. MC dropout's per-item masks, is jointly independent). None: the predictive is the Gaussian
    (mean, var or cov), independent across items.
    """

    mean: torch.Tensor
    var: torch.Tensor | None = None
    cov: torch.Tensor | None = None
    samples: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.var is None and self.cov is not None:
            self.var = torch.diagonal(self.cov, dim1=-2, dim2=-1)

    @classmethod
    def from_sample_moments(cls, z: torch.Tensor) -> EmbeddingPrediction:
        """`from_samples`, the full covariance only for embeddings of width <= SAMPLE_COV_MAX_DIM (a sampling
        method's predictive: [N, d, d] memory otherwise)."""
        return cls.from_samples(z, with_cov=z.shape[-1] <= SAMPLE_COV_MAX_DIM)

    @classmethod
    def from_samples(cls, z: torch.Tensor, with_cov: bool = True, keep: bool = True) -> "EmbeddingPrediction":
        """Sample moments of z [S, N, d]: mean, unbiased per-dimension variance and (with_cov) the
        unbiased covariance (1/(S-1)) sum_s (z_s - mean)(z_s - mean)^T; `keep` keeps z as `samples`."""
        mean = z.mean(0)
        c = z - mean
        denom = max(z.shape[0] - 1, 1)
        var = (c**2).sum(0) / denom
        cov = torch.einsum("tni,tnj->nij", c, c) / denom if with_cov else None
        return cls(mean=mean, var=var, cov=cov, samples=z if keep else None)

    @classmethod
    def cat(cls, parts: "list[EmbeddingPrediction]") -> "EmbeddingPrediction":
        """The predictions of consecutive chunks of items as one (items concatenated; a field is kept
        only when every part has it)."""

        def join(name: str, dim: int) -> torch.Tensor | None:
            ts = [getattr(p, name) for p in parts]
            return None if any(t is None for t in ts) else torch.cat(ts, dim=dim)

        return cls(mean=join("mean", 0), var=join("var", 0), cov=join("cov", 0), samples=join("samples", 1))

    def to(self, device: torch.device | str) -> "EmbeddingPrediction":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return EmbeddingPrediction(mv(self.mean), mv(self.var), mv(self.cov), mv(self.samples))


@dataclass
class FitContext:
    """What a method may use while fitting: the config, the data, the device, the stage timer and
    the shared training loop (cached). `train_model(seed, dropout=0.0, recipe=None)` trains (or
    loads) a net: the shared contrastive embedding net, or with a `bench.train.Recipe` a method's own
    net and objective, charged to the method's train stage; `base_model` is the shared MAP network
    that all post-hoc methods reuse."""

    cfg: "RunConfig"
    data: "Dataset"
    device: torch.device
    timer: "StageTimer"
    method: str
    train_model: Callable[..., "nn.Module"]
    seed: int
    train_jointly: Callable[[list[int]], list["nn.Module"]] | None = None

    def train_models(self, seeds: list[int]) -> list["nn.Module"]:
        """Contrastive nets of the given seeds, trained side by side when the runner offers it (each
        equal to the net trained alone up to float rounding), else one by one; charged to this method."""
        if self.train_jointly is None:
            return [self.train_model(seed=s) for s in seeds]
        return self.train_jointly(list(seeds))

    def base_model(self) -> "nn.Module":
        """The shared MAP embedding net (trained once per run and cached; charged to the run's base)."""
        return self.train_model(seed=self.seed, dropout=0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage of this method (train, hessian, prior; the runner times predict and evaluate)."""
        with self.timer.stage(self.method, name):
            yield

    def seed_for(self, offset: int) -> int:
        """The integer seed of stream `offset` of this run seed (for APIs that take a seed)."""
        return stream_seed(self.seed, offset)

    def generator(self, offset: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A torch.Generator seeded for stream `offset` of this run seed (on `device`, CPU by default)."""
        return torch.Generator(device=device).manual_seed(self.seed_for(offset))


@dataclass(frozen=True)
class Option:
    """A method option settable with `--set NAME=VALUE`: its type, default and one line of help
    (with the source of the default). Values live in RunConfig.method_options."""

    type: type
    default: Any
    help: str
    choices: tuple | None = None  # the allowed values, when the option is one of a few
    minimum: float | None = None  # the smallest allowed value of a number (finite numbers only)

    def check(self, name: str, value: Any) -> None:
        """BenchError (one line) unless `value` is allowed."""
        if self.choices is not None:
            require(
                value in self.choices,
                f"{name} must be one of {', '.join(map(str, self.choices))}, got {value!r}",
            )
        if self.minimum is not None:
            ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= self.minimum
            require(ok, f"{name} must be a finite number >= {self.minimum:g}, got {value!r}")


class Method:
    """Base class of method plugins. Subclasses set `reuses_base_model` and implement fit and predict.

    `reuses_base_model = True`: the method works on the shared base model; its train stage is the shared
    base training, counted once per run and reported separately (method "base").
    After `fit`, `diagnostics` holds JSON-safe facts about the fit (saved in config.json).
    """

    name: str = ""
    reuses_base_model: bool = False
    options: ClassVar[dict[str, Option]] = {}  # this method's own options (names unique across methods)
    # its published settings by recipe name (at least "paper"; "default" may be left out: the harness's
    # defaults) and the knobs recipe=tuned searches ({}: nothing to tune); bench.recipes
    recipes: ClassVar[dict[str, "Recipe"]] = {}
    tunable: ClassVar[dict[str, "Knob"]] = {}

    def __init__(self, cfg: "RunConfig") -> None:
        self.cfg = cfg
        self.diagnostics: dict[str, Any] = {}

    @classmethod
    def option(cls, cfg: "RunConfig", name: str) -> Any:
        """The value of this method's option `name` in cfg (its default unless set)."""
        return dict(cfg.method_options).get(name, cls.options[name].default)

    @classmethod
    def relative_cost(cls, cfg: "RunConfig") -> float:
        """A rough guess of this fit's wall time in units of a post-hoc fit on the cached base model
        (1.0), used only to start the longest fits first when several run side by side
        (`bench.parallel.estimate_costs`) before an earlier run's timings are known: 1 for a method on
        the shared base model, 2 for one that trains its own net. A method far off that overrides it."""
        return 1.0 if cls.reuses_base_model else 2.0

    @classmethod
    def validate(cls, cfg: "RunConfig") -> None:
        """Reject config values this method cannot run with (BenchError, one line); called before
        any data is loaded. The base class checks the declared options; subclasses add their own
        checks of config fields and call it."""
        for name, opt in cls.options.items():
            opt.check(name, cls.option(cfg, name))

    def fit(self, ctx: FitContext) -> None:
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> EmbeddingPrediction:
        raise NotImplementedError

    @contextmanager
    def query_set(self) -> Iterator[None]:
        """Around the `predict` calls of one query set read in chunks (`bench.runner.predict_split`): a
        method whose predict draws fresh randomness per call continues one stream across the chunks
        here, so items at the same offset of different chunks do not share draws (default: nothing)."""
        yield

    def export_state(self) -> dict[str, Any]:
        """The fitted state an exported artefact may keep (`bench.export`): attribute name -> value, by
        default every instance attribute but the config (which the artefact stores on its own). Values
        must be encodable by `bench.state_codec` (tensors, numbers, strings, containers, generators and
        objects of this project's packages or torch.nn; no lambdas). The exporter keeps, of these, the
        attributes that `predict` read while it checked the refit against the run. Override to give a
        compact form (then override `load_state` too)."""
        return {k: v for k, v in vars(self).items() if k != "cfg"}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore, on a method made with `__init__(cfg)`, what `export_state` gave (default: set the
        attributes); `predict` must then give what the fitted method gave."""
        self.__dict__.update(state)

    def variants(self, points: list[dict[str, float | None]]) -> Iterator[tuple[dict, "Method"]] | None:
        """For a sensitivity sweep (`bench.sensitivity`): a fitted copy of this method per point of
        settings (config field -> value; None: the fitted value), made without refitting, as
        (the settings it used, the copy); None when the method offers no sweep (the default)."""
        return None
