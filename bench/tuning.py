"""recipe=tuned: every method's declared tunable knobs (`Method.tunable`) searched on val_id with the same
number of trials (cfg.tune_trials) and the same objective (`bench.triplet_objective`), never on test or
OOD items. `fit_method` is the runner's one call site: it fits a method as cfg.recipe asks.

Search: one Optuna study per (method, seed), stored in a journal file in the run folder
(`tuning/<method>-seed<k>.journal`), so a killed run continues its study when rerun; a CSV of the trials
is written (atomically) when the search ends. Sampler: a grid when every knob is a finite set of choices
whose product fits the budget (exhaustive, then trials = grid size), else TPE (multivariate) with
budget // 3 random start-up trials. The sampler is re-seeded from (run seed, trial number) before each
trial, so the sequence of trials is a function of the seed and the completed trials alone: a resumed study
asks what the uninterrupted one would have asked.

Trials. A method whose knobs are exactly the Laplace family's scale axes (prior precision x temperature,
`bench.sensitivity.AXES`) and that offers `Method.variants` is fitted once (at the first trial's values);
every trial is then a copy of it at the trial's values from one factorisation (`variants`): one predictive
on val_id per trial, counted as one trial of the same budget. Any other method is fitted again per trial
(nets it trains come from the model cache when a setting repeats). The best trial's fitted method is the
result (for the Laplace family exact up to rounding, or within full_la's low-rank tolerance; a refit there
would repeat the curvature); after a resume whose best trial ran before the kill, the method is fitted again
at the best values.

Wall time: the kept fit's stages are charged as a plain fit's (train, hessian, prior); everything else the
search cost (the other trials' fits, every trial's validation predictive and objective) goes to the
method's `tune` stage."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench import sensitivity
from bench.atomic import atomic_write_csv
from bench.errors import BenchError, require
from bench.method import EmbeddingPrediction, FitContext, Method, stream_seed
from bench.recipes import Knob, explicit_names, method_config
from bench.splits import Split
from bench.timing import StageTimer
from bench.triplet_objective import NAME as OBJECTIVE
from bench.triplet_objective import triplet_loglik

if TYPE_CHECKING:
    from bench.config import RunConfig

TUNE_STAGE = "tune"
NOTHING = "nothing to tune"
MIN_VAL_ITEMS = 20  # fewer validation items than this (or fewer than MIN_VAL_CLASSES classes): no tuning
MIN_VAL_CLASSES = 2
MAX_VAL_ITEMS = 2000  # the objective is computed on a seeded subset of larger validation splits
SAMPLER_STREAM = 0x7B0  # generator offsets (of the run seed) of the sampler, per trial number
VAL_STREAM = 0x7B1  # the seeded subset of val_id the objective reads


def searched_knobs(cfg: "RunConfig", cls: type[Method]) -> dict[str, Knob]:
    """The method's tunable knobs that recipe=tuned searches: those not set explicitly (a preset, an
    experiment file or `--set` fixes a knob, as it wins over every recipe: `bench.recipes.explicit_names`)."""
    fixed = explicit_names(cfg)
    return {k: v for k, v in cls.tunable.items() if k not in fixed}


def wants_tuning(cfg: "RunConfig", cls: type[Method]) -> bool:
    """Whether `fit_method` searches this method's knobs (recipe=tuned and some are left to search)."""
    return cfg.recipe == "tuned" and bool(searched_knobs(cfg, cls))


def check_val(val: Split | None) -> None:
    """BenchError (one line) unless val_id is large enough to tune on: >= MIN_VAL_ITEMS items of
    >= MIN_VAL_CLASSES classes."""
    n = 0 if val is None else len(val)
    classes = 0 if val is None else int(torch.unique(val.y).numel())
    require(
        n >= MIN_VAL_ITEMS and classes >= MIN_VAL_CLASSES,
        f"recipe=tuned needs a validation split of at least {MIN_VAL_ITEMS} items of {MIN_VAL_CLASSES} "
        f"classes to tune on; val_id has {n} items of {classes} classes (set a larger val_items)",
    )


def check_knobs(cls: type[Method]) -> None:
    """BenchError (one line) for a declared knob that cannot be searched (no range, low >= high, ...)."""
    for name, k in cls.tunable.items():
        if k.choices is not None:
            require(len(k.choices) >= 1, f"{cls.name}: knob {name} has no choices")
            continue
        ok = k.low is not None and k.high is not None and k.low < k.high and (not k.log or k.low > 0)
        require(ok, f"{cls.name}: knob {name} needs low < high (and low > 0 when log), got {k}")


def distributions(knobs: dict[str, Knob]) -> dict[str, Any]:
    """Optuna distributions of the knobs (categorical, integer or float range, log-scaled or not)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name, k in knobs.items():
        if k.choices is not None:
            out[name] = CategoricalDistribution(tuple(k.choices))
        elif k.integer:
            out[name] = IntDistribution(int(k.low), int(k.high), log=k.log)
        else:
            out[name] = FloatDistribution(float(k.low), float(k.high), log=k.log)
    return out


def search_grid(knobs: dict[str, Knob]) -> dict[str, list] | None:
    """Every value of every knob when all are finite (choices, or an integer range without log); else None."""
    grid: dict[str, list] = {}
    for name, k in knobs.items():
        if k.choices is not None:
            grid[name] = list(k.choices)
        elif k.integer and not k.log:
            grid[name] = list(range(int(k.low), int(k.high) + 1))
        else:
            return None
    return grid


def planned_trials(knobs: dict[str, Knob], budget: int) -> tuple[int, str]:
    """(trials, sampler name): the whole grid when it fits the budget, else `budget` TPE trials."""
    grid = search_grid(knobs)
    size = math.prod(len(v) for v in grid.values()) if grid is not None else None
    if size is not None and size <= budget:
        return size, "grid"
    return budget, "tpe"


def make_sampler(knobs: dict[str, Knob], budget: int, seed: int, trial_number: int):
    """The sampler of trial `trial_number` (re-seeded per trial: see the module docstring)."""
    import optuna

    s = stream_seed(seed, SAMPLER_STREAM) + trial_number
    if planned_trials(knobs, budget)[1] == "grid":
        return optuna.samplers.GridSampler(search_grid(knobs), seed=s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=s, n_startup_trials=max(1, budget // 3), multivariate=True)


@dataclass
class Fitter:
    """How the runner fits one method at one seed: its run config, name and class, a FitContext maker
    (config, timer) -> context, a predictor (method, split) -> prediction, the run's stage timer and the
    folder for search logs (None: the study lives in memory only)."""

    cfg: "RunConfig"
    name: str
    cls: type[Method]
    make_ctx: Callable[["RunConfig", StageTimer], FitContext]
    predict: Callable[[Method, Split], EmbeddingPrediction]
    timer: StageTimer
    log_dir: Path | None = None

    def build_and_fit(self, extra: dict | None, timer: StageTimer) -> Method:
        """The method built with method_config(cfg, cls, extra) and fitted, under the run seed's RNG."""
        mcfg = method_config(self.cfg, self.cls, extra)
        self.cls.validate(mcfg)
        method = self.cls(mcfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            method.fit(self.make_ctx(mcfg, timer))
        return method


def predict_val(fitter: Fitter, method: Method, val: Split) -> EmbeddingPrediction:
    """The method's prediction of the validation items: the only data a trial is scored on."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(fitter.cfg.seed)
        return fitter.predict(method, val)


def score(fitter: Fitter, method: Method, val: Split) -> float:
    """The objective of a fitted method on the validation items."""
    cfg = method.cfg
    return triplet_loglik(predict_val(fitter, method, val), val.y, cfg.distance, cfg.score_samples, cfg.seed)


def fit_method(fitter: Fitter, val: Split | None) -> Method:
    """The fitted method of fitter.cls as cfg.recipe asks: fitted once at method_config(cfg, cls) unless
    recipe=tuned and the method declares knobs, then searched on `val` (module docstring). With recipe=tuned
    the method's `diagnostics["tuning"]` records the outcome (chosen values, objective, trials, sampler,
    log file) or "nothing to tune"."""
    cfg, cls = fitter.cfg, fitter.cls
    if not wants_tuning(cfg, cls):
        method = cls(method_config(cfg, cls))
        method.fit(fitter.make_ctx(method.cfg, fitter.timer))  # under the runner's seeded RNG, as before
        if cfg.recipe == "tuned":  # its objective on val, for reference (a step function without spread)
            record = {"status": NOTHING, "trials": 0, "objective": OBJECTIVE}
            if val is not None and len(val) >= MIN_VAL_ITEMS:
                val = val.subset(MAX_VAL_ITEMS, seed=stream_seed(cfg.seed, VAL_STREAM))
                with fitter.timer.stage(fitter.name, TUNE_STAGE):
                    record.update(value=score(fitter, method, val), val_items=len(val))
            method.diagnostics["tuning"] = record
        return method
    check_knobs(cls)
    check_val(val)
    assert val is not None
    val = val.subset(MAX_VAL_ITEMS, seed=stream_seed(cfg.seed, VAL_STREAM))
    return _Search(fitter, val).run()


class _Search:
    """One study: its storage, the trials still to run, and the best fitted method seen in this process."""

    def __init__(self, fitter: Fitter, val: Split) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.f, self.val = fitter, val
        self.knobs = searched_knobs(fitter.cfg, fitter.cls)
        self.trials, self.sampler = planned_trials(self.knobs, fitter.cfg.tune_trials)
        self.cheap = set(self.knobs) == set(sensitivity.AXES) and fitter.cls.variants is not Method.variants
        self.stem = f"{fitter.name}-seed{fitter.cfg.seed}"
        storage = None
        if fitter.log_dir is not None:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            fitter.log_dir.mkdir(parents=True, exist_ok=True)
            storage = JournalStorage(JournalFileBackend(str(fitter.log_dir / f"{self.stem}.journal")))
        self.study = optuna.create_study(
            study_name=self.stem, storage=storage, direction="maximize", load_if_exists=True
        )
        self.base: Method | None = None  # cheap path: the one fit every trial is a copy of
        self.base_values: dict | None = None
        self.best: tuple[float, Method, StageTimer | None] | None = None  # (value, method, its fit's timer)
        self.notes: dict[str, Any] = {}

    def finished(self) -> list:
        """The trials that count against the budget: completed ones, and those that failed with an error
        (a setting the method cannot fit with); not those a kill cut off (failed without an error)."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        return [t for t in trials if t.state == TrialState.COMPLETE or "error" in t.user_attrs]

    def run(self) -> Method:
        from optuna.trial import TrialState

        f = self.f
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study.tell(t.number, state=TrialState.FAIL)  # cut off by a kill: asked again, not counted
        resumed = len(self.finished())
        done = [t for t in self.finished() if t.state == TrialState.COMPLETE]
        if self.cheap and done:  # the one fit is made at the values it was made at before the kill
            self.base_values = dict(min(done, key=lambda t: t.number).params)
        dists = distributions(self.knobs)
        while len(self.finished()) < self.trials:
            self.study.sampler = make_sampler(self.knobs, f.cfg.tune_trials, f.cfg.seed, len(self.finished()))
            trial = self.study.ask(dists)
            try:
                value = self._trial(dict(trial.params))
            except BenchError as e:  # a setting the method cannot fit with: a failed trial of the budget
                trial.set_user_attr("error", str(e))
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            for k, v in self.notes.items():
                trial.set_user_attr(k, v)
            self.study.tell(trial, value)
        complete = [t for t in self.finished() if t.state == TrialState.COMPLETE]
        if not complete:
            errors = [t.user_attrs.get("error") for t in self.finished()]
            raise BenchError(f"{f.name}: all {len(errors)} tuning trials failed; the first: {errors[0]}")
        method = self._result()
        self._write_csv()
        best = self.study.best_trial
        method.diagnostics = {
            **method.diagnostics,
            "tuning": {
                "status": "tuned",
                "objective": OBJECTIVE,
                "values": dict(best.params),
                "value": float(best.value),
                "best_trial": best.number,
                "trials": len(self.finished()),
                "failed_trials": len(self.finished()) - len(complete),
                "budget": f.cfg.tune_trials,
                "resumed_after": resumed,
                "sampler": self.sampler,
                "trial_kind": "one fit, then variants (prior precision x temperature)"
                if self.cheap
                else "refit",
                "knobs": {k: vars(v) for k, v in self.knobs.items()},
                "val_items": len(self.val),
                "val_fingerprint": self.val.fingerprint(),
                **({"log": f"tuning/{self.stem}.journal"} if f.log_dir is not None else {}),
            },
        }
        return method

    # -- trials -------------------------------------------------------------------------------
    def _trial(self, values: dict) -> float:
        """Fit (or derive) the method at `values` and score it on val; keeps the best in memory. The trial's
        notes (a variant's rank_bound) go to `self.notes`."""
        f = self.f
        if self.cheap:
            method, timer = self._variant(values), None
        else:
            timer = StageTimer(f.timer.device)
            try:
                method = f.build_and_fit(values, timer)
            except BenchError:
                self._charge(timer, kept=False)
                raise
        self.notes = {
            k: method.diagnostics[k] for k in ("rank_bound",) if method.diagnostics.get(k) is not None
        }
        with f.timer.stage(f.name, TUNE_STAGE):
            value = score(f, method, self.val)
        if self.best is None or value > self.best[0]:
            if self.best is not None and self.best[2] is not None:
                self._charge(self.best[2], kept=False)
            self.best = (value, method, timer)
        elif timer is not None:
            self._charge(timer, kept=False)
        return value

    def _variant(self, values: dict) -> Method:
        """Cheap path: the one fit (made on first need, its stages charged as a plain fit's), or a copy of it
        at `values` from its factorisation (charged to tune)."""
        f = self.f
        if self.base is None:  # (a fit that fails leaves no base: the next trial tries its own values)
            first = self.base_values or dict(values)
            self.base, self.base_values = f.build_and_fit(first, f.timer), first
            with f.timer.stage(f.name, TUNE_STAGE):  # the one factorisation, made for the box's centre
                next(iter(self.base.variants([self._centre()])))
        if values == self.base_values:
            return self.base
        with f.timer.stage(f.name, TUNE_STAGE):
            settings, variant = next(iter(self.base.variants([dict(values)])))
        variant.diagnostics = {
            **self.base.diagnostics,
            "prior_precision": settings["prior_precision"],
            "temperature": settings["likelihood_scale"],
            "likelihood_scale": repr(float(settings["likelihood_scale"])),
            "rank_bound": settings.get("rank_bound"),
        }
        return variant

    def _centre(self) -> dict[str, float]:
        """The centre of the knob box (geometric for log knobs): the point a low-rank basis (full_la above
        4000 parameters) is grown for; a trial at a smaller prior / temperature ratio records its covariance
        bound (`rank_bound`, relative error; 0 for the exact bases of the other structures)."""
        k = self.knobs
        mid = lambda n: math.sqrt(k[n].low * k[n].high) if k[n].log else (k[n].low + k[n].high) / 2  # noqa: E731
        return {n: mid(n) for n in sensitivity.AXES}

    def _charge(self, timer: StageTimer, kept: bool) -> None:
        """Add a trial fit's stage times to the run's timer: as they are when its method is kept, else its
        own stages as `tune` (shared costs, e.g. the base net's training, stay where they were charged)."""
        for (m, st), sec in timer.records.items():
            self.f.timer.add(m, st if kept or m != self.f.name else TUNE_STAGE, sec)

    def _result(self) -> Method:
        """The best trial's fitted method: the one kept in memory, or fitted again at its values."""
        f, best = self.f, self.study.best_trial
        if self.best is not None and self.best[0] >= best.value:  # the best trial ran in this process
            value, method, timer = self.best
            if timer is not None:
                self._charge(timer, kept=True)
            return method
        if self.best is not None and self.best[2] is not None:
            self._charge(self.best[2], kept=False)
        if self.cheap:
            return self._variant(dict(best.params))
        return f.build_and_fit(dict(best.params), f.timer)

    def _write_csv(self) -> None:
        if self.f.log_dir is None:
            return
        df = self.study.trials_dataframe(
            attrs=("number", "value", "state", "params", "duration", "user_attrs")
        )
        if "duration" in df:
            df["duration"] = df["duration"].dt.total_seconds()
        df.insert(0, "objective", OBJECTIVE)
        atomic_write_csv(self.f.log_dir / f"{self.stem}.csv", df)


def summary(diagnostics: dict) -> str | None:
    """One line of a fit's tuning outcome for the run's log (None when it did not tune)."""
    t = diagnostics.get("tuning")
    if not t:
        return None
    if t["status"] == NOTHING:
        return NOTHING + (f" ({t['objective']} {t['value']:.4f}, for reference)" if "value" in t else "")
    vals = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["values"].items())
    return f"tuned {vals} ({t['objective']} {t['value']:.4f}, {t['trials']} trials)"
