"""Online Laplace: a Gaussian posterior over a parameter subset kept up to date while the net trains, the
net trained at posterior samples (Warburg et al. 2023, "Bayesian Metric Learning for Uncertainty
Quantification in Image Retrieval" (LAM); the prior precision re-tuned by the Laplace evidence during
training as in Immer et al. 2021, "Scalable Marginal Likelihood Estimation for Model Selection in Deep
Learning").

One training step on a batch b, with mu the subset's current weights, H the running curvature and delta
the prior precision (`methods.online_la.OnlineStep`; steps 4-5 here, `OnlineCurvature`):
  1. the current posterior N(mu, (H + delta I)^-1) of the structure, one of the post-hoc family's
     classes (`bench.la.posterior`; diag: sigma = 1 / sqrt(H + delta));
  2. S = train_samples draws theta_s = mu + eps_s from it (eps_s detached);
  3. loss = 1/S sum_s L_b(theta_s), the shared contrastive batch loss; its gradient flows to mu
     (d theta_s / d mu = I) and, by plain backpropagation, to the rest of the net;
  4. h_b = 1/S sum_s c_s GGN_b(theta_s): the batch's contrastive GGN at each sample, on the subset's
     detached inputs (the head's features), mined, PSD-clamped and accumulated by the post-hoc code
     (`bench.la.pairs`, the `bench.la.curvature` accumulators: `batch_curvature`);
  5. S_t = m S_{t-1} + h_b and Z_t = m Z_{t-1} + 1 with m the memory factor (`OnlineState`);
and at the end of every E-th epoch delta <- the maximiser of the Laplace evidence at (mu, H)
(`marglik_prior`: `bench.la.prior.optimize_marglik`, the post-hoc family's marglik), once more after
training at the trained weights (the final posterior's delta).

The curvature h_b is PSD by construction (each pair's Hessian clamped to its PSD part, as post hoc),
so LAM's relu(h) is a no-op here.

Scaling of H (what H is the curvature of):
  gibbs (default): the training objective read as a Gibbs likelihood p(D | theta) = exp(-sum_b L_b(theta))
    over the n_b mining batches of an epoch, the likelihood of the post-hoc family's GGN and marglik
    (`bench.la.prior.log_marglik`). Its data-term GGN is sum_b GGN_b, so one batch's GGN times n_b is an
    unbiased estimate of it (batches drawn uniformly), and the online H is n_b times the bias-corrected
    running mean of the batch GGNs:
        H_t = n_b S_t / Z_t = n_b sum_u m^(t-u) h_u / sum_u m^(t-u)      (H = 0 before the first step).
    With m = 1 and weights held fixed, H after one epoch is exactly the post-hoc GGN of the same batches;
    with m < 1 it is a recency-weighted mean over about 1 / (1 - m) steps.
  lam (reproduction of LAM): H_t = m H_{t-1} + h_sum N^2 / P, H_0 = N, with N the training set size, P the
    number of Hessian pairs of the batch (2 per mined triplet, after the cap) and h_sum the GGN summed
    over pairs. LAM sums its Hessian over the pairs; ours is of the reduced loss, the mean over the
    n_pos active positive pairs (the only ones the PSD part keeps), so h_sum = n_pos h_b. Not derived
    from the loss: in the steady state H ~ N^2 h_sum / (P (1 - m)).

Kronecker factors are kept the KFAC way: S_G as S above (scaled), the input factor A as the running mean
S_A / Z (the identity before the first step).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bench.errors import BenchError, require
from bench.la import jacobians as jac
from bench.la.curvature import Curvature
from bench.la.online_batch import batch_curvature
from bench.la.posterior import Posterior
from bench.la.prior import optimize_marglik
from bench.la.structures import get_structure, online_structures
from bench.la.subsets import la_head
from bench.loss import PairLoss
from bench.timing import sync

SUBSETS = ("head", "all")
SCALINGS = ("gibbs", "lam")
STAGE_NAMES = ("hessian", "prior")  # the parts of the training time the state measures (OnlineState.seconds)


@dataclass(frozen=True)
class OnlineSettings:
    """What determines an online-Laplace training run besides the shared training config."""

    structure: str = "diag"  # diag | kron | last_layer (full GGN over the last Linear layer)
    subset: str = "head"  # head | all: the Bayesian parameters (the rest are trained by plain gradients)
    train_samples: int = 1  # posterior draws per step
    memory: float = 0.999  # m in S_t = m S_{t-1} + h_t
    scaling: str = "gibbs"  # gibbs | lam
    prior: float = 1.0  # prior precision: fixed, or the start of the marglik re-tuning
    marglik_every: int = 1  # epochs between marglik re-tunings of the prior precision (0: fixed)
    pair_cap: int = 0  # most Hessian pairs per batch, 0: all (LAM: 5000)
    hessian: str = "ggn"  # ggn | jtj (the seed's identity output Hessian)
    dtype: str = "float32"  # dtype of the running curvature
    distance: str = "euclidean"  # the training loss's (euclidean | cosine)

    def check(self) -> None:
        """BenchError (one line) for values or combinations that cannot run."""
        structures = online_structures()
        require(
            self.structure in structures,
            f"online_structure must be one of {', '.join(structures)}, got {self.structure!r}",
        )
        require(
            self.subset in SUBSETS, f"online_subset must be one of {', '.join(SUBSETS)}, got {self.subset!r}"
        )
        require(
            self.scaling in SCALINGS,
            f"online_scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}",
        )
        require(0.0 < self.memory <= 1.0, f"online_memory must be in (0, 1], got {self.memory}")
        require(
            self.prior > 0 and math.isfinite(self.prior),
            f"online_prior must be a positive number, got {self.prior}",
        )
        get_structure(self.structure).check_online(self.subset, self.hessian, self.distance)
        require(
            self.scaling != "lam" or self.hessian == "ggn",
            "online_scaling=lam counts Hessian pairs: it needs hessian=ggn",
        )

    def options(self) -> dict:
        return asdict(self)


def bayesian_module(model: nn.Module, subset: str) -> nn.Module:
    """The module whose parameters the posterior covers: the head, or the whole net (subset all)."""
    return la_head(model) if subset == "head" else model


@contextmanager
def _captured_calls(module: nn.Module) -> Iterator[list]:
    store: list = []
    handle = module.register_forward_hook(lambda mod, inp, out: store.append((inp[0], out)))
    try:
        yield store
    finally:
        handle.remove()


def subset_inputs(model: nn.Module, subset: str, x: torch.Tensor, check: bool = False) -> torch.Tensor:
    """The input of the Bayesian module for items x: the head's features (one forward of the net; they
    carry the backbone's gradient when grad is on), or x itself for subset all. check: BenchError unless
    the net's output is the head's (online LA samples the head on these features)."""
    if subset == "all":
        return x
    with _captured_calls(la_head(model)) as store:
        f = model(x)
    if len(store) != 1 or (check and not torch.equal(store[0][1], f)):
        raise BenchError(
            "online_la: the embedding must be the head's output, the head run once per forward pass; "
            "use --set online_subset=all for this backbone"
        )
    return store[0][0]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Training steps (= mining batches) per epoch of `bench.train.train_net`: ceil(n / B) batches, a
    last batch of fewer than 2 items skipped."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


# ---------------------------------------------------------------------------------------------
# the running state (module buffers: cached with the net)
# ---------------------------------------------------------------------------------------------


class OnlineState(nn.Module):
    """The running curvature sums S (diag [D], full [D, D], or per Linear layer S_G [out, out] and S_A
    [in+1, in+1]), their weight Z, the prior precision, the step count, the measured seconds of the
    curvature and prior parts of training, the prior after each epoch (NaN where not re-tuned) and the
    output-space curvature kept / dropped (negative pairs) summed over steps; all buffers, so they travel
    in the model cache."""

    def __init__(
        self,
        structure: str,
        shapes: list[tuple[int, int]],
        epochs: int,
        prior: float,
        init: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.structure, self.kind = structure, get_structure(structure)
        self.n_layers = len(shapes)
        self.kind.init_online(self, shapes, init, dtype)
        f64 = dict(dtype=torch.float64)
        self.register_buffer("weight", torch.zeros((), **f64))
        self.register_buffer("prior_precision", torch.tensor(float(prior), **f64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("seconds", torch.zeros(len(STAGE_NAMES), **f64))
        self.register_buffer("prior_history", torch.full((epochs,), float("nan"), **f64))
        self.register_buffer("traces", torch.zeros(2, **f64))  # output-space kept, dropped

    def add(self, curv: Curvature, memory: float, traces: tuple[float, float] = (0.0, 0.0)) -> None:
        """S <- m S + h (the structure's `online_add`), Z <- m Z + 1, for the step's curvature h."""
        self.kind.online_add(self, curv, memory)
        self.weight.mul_(memory).add_(1.0)
        self.traces[0] += traces[0]
        self.traces[1] += traces[1]

    @property
    def curvature_dtype(self) -> torch.dtype:
        return self.kind.online_dtype(self)

    def curvature(self, names: list[str], subset: str, D: int, scale: float | None) -> Curvature:
        """The current H as a `Curvature` of the structure: scale * S / Z (gibbs: scale = n_b; 0 before the
        first step), or S itself when scale is None (lam); Kronecker: G from S_G that way, A = S_A / Z."""
        return self.kind.online_curvature(self, names, subset, D, scale)

    def stage_seconds(self) -> dict[str, float]:
        return {k: float(v) for k, v in zip(STAGE_NAMES, self.seconds)}


class OnlineLaplaceNet(nn.Module):
    """An embedding net (`net`: its Bayesian subset's weights are the posterior mean) and the online
    posterior state (`state`); the forward pass is the net's."""

    def __init__(self, net: nn.Module, settings: OnlineSettings, epochs: int, n_train: int) -> None:
        super().__init__()
        self.net, self.settings = net, settings
        self._module = (bayesian_module(net, settings.subset),)  # a reference, not a child module
        module = self.bayesian_module()
        dtype = torch.float64 if settings.dtype == "float64" else torch.float32
        kind = get_structure(settings.structure)
        probe = kind.online_accumulator(module)(module, dtype)
        self.names, self.subset_name, self.D = probe.names, probe.subset, probe.D
        shapes = kind.online_shapes(probe)
        init = float(n_train) if settings.scaling == "lam" else 0.0  # LAM: H_0 = N
        self.state = OnlineState(settings.structure, shapes, epochs, settings.prior, init, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def bayesian_module(self) -> nn.Module:
        return self._module[0]

    def curvature(self, n_batches: int) -> Curvature:
        """The current H (`OnlineState.curvature` with this net's scaling)."""
        scale = float(n_batches) if self.settings.scaling == "gibbs" else None
        return self.state.curvature(self.names, self.subset_name, self.D, scale)

    def posterior(self, n_batches: int, delta: float | None = None) -> Posterior:
        """The current posterior N(mu, (H + delta I)^-1) over the Bayesian module (the structure's class);
        delta: the state's prior precision unless given."""
        cls = get_structure(self.settings.structure).posterior
        delta = float(self.state.prior_precision) if delta is None else float(delta)
        return cls(self.bayesian_module(), self.curvature(n_batches), delta)


def sample_deviations(posterior: Posterior, S: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """S draws theta_s of the posterior (its own sampler) as deviations eps_s = theta_s - mu: name -> [S,
    *shape]."""
    params = dict(posterior.model.named_parameters())
    return {n: v - params[n].detach() for n, v in posterior.sample_params(S, generator).items()}


# ---------------------------------------------------------------------------------------------
# the curvature part of a training step
# ---------------------------------------------------------------------------------------------


class OnlineCurvature:
    """Steps 4-5 of a training step (module docstring) and the in-training marglik: the batch's curvature
    at each posterior draw, accumulated into the net's state; timed into the state ("hessian", "prior").
    The training step itself (draws, loss) is `methods.online_la.OnlineStep`."""

    def __init__(
        self,
        settings: OnlineSettings,
        loss: PairLoss,
        n_train: int,
        batch_size: int,
        epochs: int,
        generator: torch.Generator,
    ) -> None:
        self.settings, self.loss, self.n_train, self.epochs = settings, loss, n_train, epochs
        self.n_batches = steps_per_epoch(n_train, batch_size)
        self.generator = generator  # the pair cap's draws
        self._probe: nn.Module | None = None

    def update(
        self,
        model: OnlineLaplaceNet,
        samples: dict[str, torch.Tensor],
        inputs: torch.Tensor,
        y: torch.Tensor,
        counts: list | None = None,
    ) -> None:
        """Add the curvature of the batch (inputs of the Bayesian module [m, ...], y [m]) at the S draws
        `samples` (name -> [S, *shape]; counts: the training loss's mined pairs per draw) to the state;
        at the end of every marglik_every-th epoch but the last, re-tune the prior precision."""
        s, state = self.settings, model.state
        module = model.bayesian_module()
        S = next(iter(samples.values())).shape[0]
        device = state.seconds.device
        sync(device)
        t0 = time.perf_counter()
        if self._probe is None:  # a copy of the Bayesian module that holds each draw in turn (eval mode:
            self._probe = copy.deepcopy(module).eval()  # BatchNorm would couple the items of the Jacobians)
        kind = state.kind
        acc_cls = kind.online_accumulator(module, pair_form=s.hessian == "ggn" and s.distance == "euclidean")
        total: Curvature | None = None
        traces = [0.0, 0.0]
        with torch.no_grad():
            for k in range(S):
                for n, p in self._probe.named_parameters():
                    p.copy_(samples[n][k])
                acc = acc_cls(self._probe, state.curvature_dtype)
                acc.measure_dropped = False  # measured in output space instead (no extra eigh per step)
                bc = batch_curvature(
                    acc,
                    inputs,
                    y,
                    self.loss,
                    s.hessian,
                    s.pair_cap or None,
                    self.generator,
                    counts[k] if counts else None,
                )
                c = (
                    1.0
                    if s.scaling == "gibbs"
                    else (bc.pos_active * self.n_train**2 / bc.pairs if bc.pairs else 0.0)
                )
                total = kind.mean_of_draws(total, kind.scale_(bc.curvature, c / S), S)
                traces = [t + u / S for t, u in zip(traces, bc.output_traces())]
            state.add(total, s.memory, tuple(traces))
            state.steps += 1
        sync(device)
        state.seconds[0] += time.perf_counter() - t0
        epoch, end_of_epoch = divmod(int(state.steps), self.n_batches)
        if s.marglik_every and end_of_epoch == 0 and epoch % s.marglik_every == 0 and epoch < self.epochs:
            t0 = time.perf_counter()  # the final re-tuning, at the trained weights, is the method's own
            delta = marglik_prior(model, self.n_batches)
            state.prior_precision.fill_(delta)
            state.prior_history[epoch - 1] = delta
            state.seconds[1] += time.perf_counter() - t0


def marglik_prior(model: OnlineLaplaceNet, n_batches: int) -> float:
    """The prior precision that maximises the Laplace evidence at the current (mu, H) of the Bayesian
    module (`bench.la.prior.optimize_marglik` on the structure's spectrum of H, ||mu||^2 over the subset)."""
    cls = get_structure(model.settings.structure).posterior
    theta_sq = float(jac.flat_params(model.bayesian_module(), model.names).double().pow(2).sum())
    return optimize_marglik(cls.spectrum(model.curvature(n_batches)), theta_sq)[0]
