"""The shared run loop: one dataset, one cached base model, every method fitted and scored the same
way, results saved per method as they complete so a killed run resumes where it stopped."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench import __version__, fit_costs, parallel, sensitivity, tuning
from bench.config import ALL_METHODS, RunConfig
from bench.conventions import BASE_METHOD as BASE
from bench.conventions import CORRECTNESS_METRIC, EXTRACT_STAGE, NEAR_OOD_SET, REFERENCE_METHOD
from bench.data import Dataset, Split
from bench.environment import device_description, git_commit, package_versions, resolve_device
from bench.errors import BenchError, error_record
from bench.evaluate import evaluate, resolve_scores
from bench.features import prepare_benchmark
from bench.method import EmbeddingPrediction, FitContext, Method
from bench.metrics.aggregate import paired_differences, seed_summary
from bench.model_cache import ModelCache
from bench.recipes import describe, explicit_names, method_config, recipe_of
from bench.registry import BACKBONES, DATASETS, METHODS
from bench.run_folder import COMPLETE, RESULT_COLUMNS, TIMING_COLUMNS, RunWriter, score_array
from bench.splits import DEFAULT_VAL_CAP, DEFAULT_VAL_FRACTION
from bench.timing import StageTimer


def resolve_methods(cfg: RunConfig) -> list[str]:
    """Expand 'all', check every name against the registry (BenchError lists the known ones) and
    let each method validate its options (in its own config: the run's with its recipe)."""
    out: list[str] = []
    registered = sorted(METHODS.names(), key=lambda m: m != REFERENCE_METHOD)  # the reference first
    for n in cfg.methods:
        for m in registered if n == ALL_METHODS else [n]:
            validate_at_recipe(cfg, METHODS.get(m))
            if m not in out:
                out.append(m)
    if not out:
        raise BenchError("empty method list: give at least one method (see `python -m bench list`)")
    return out


def validate_at_recipe(cfg: RunConfig, cls: type) -> None:
    """cls.validate on the method's own config (the run's with its recipe); a refusal that the recipe
    caused (the run's config without it passes) names what the recipe set and the way out."""
    try:
        cls.validate(method_config(cfg, cls))
    except BenchError as e:
        keep = explicit_names(cfg)
        applied = {k: v for k, v in recipe_of(cls, cfg.recipe).settings.items() if k not in keep}
        try:
            cls.validate(cfg)
        except BenchError:
            applied = {}  # refused without the recipe too: not the recipe's doing
        if not applied:
            raise
        shown = ", ".join(f"{k}={v}" for k, v in applied.items())
        raise BenchError(
            f"{e} (recipe={cfg.recipe} sets {shown} for {cls.name}: override them with --set, or use "
            "--set recipe=default)"
        ) from None


@dataclass
class RunState:
    """What one run carries from seed to seed: the folder, the timings and the failures."""

    cfg: RunConfig
    folder: RunWriter
    device: torch.device
    methods: list[str]
    failures: list[dict] = field(default_factory=list)
    commit: str | None = field(default_factory=git_commit)  # the code that ran: read once, at the start
    tuning_dir: Path | None = None  # recipe=tuned's search logs (bench.tuning)


def write_config(state: RunState, status: str, extra: dict | None = None) -> None:
    """config.json: the resolved config, versions, commit, device and the run's status."""
    state.folder.write_config(
        {
            "bench_version": __version__,
            "config": state.cfg.to_dict(),
            "config_digest": state.cfg.digest(),
            "methods": state.methods,
            "post_hoc_methods": [m for m in state.methods if METHODS.get(m).reuses_base_model],
            "recipes": {m: describe(state.cfg, METHODS.get(m)) for m in state.methods},
            "near_ood_sets": [NEAR_OOD_SET, *DATASETS.meta(state.cfg.dataset).get("near_ood", ())],
            "device": str(state.device),
            "device_description": device_description(state.device),
            "packages": package_versions(),
            "git_commit": state.commit,
            "command": "python -m bench " + " ".join(sys.argv[1:])
            if sys.argv and "bench" in sys.argv[0]
            else None,
            "failures": state.failures,
            **(extra or {}),
        },
        status,
    )


def predict_split(method: Method, split: Split, device: torch.device) -> EmbeddingPrediction:
    """method.predict on every item of `split` (on CPU): one call for an in-memory split, else one
    call per chunk of `cfg.image_chunk` images."""
    if split.in_memory:
        return method.predict(split.x.to(device)).to("cpu")
    with method.query_set():
        return EmbeddingPrediction.cat([method.predict(xb.to(device)).to("cpu") for xb in split.chunks()])


def _predict_all(
    method: Method, data: Dataset, device: torch.device
) -> tuple[EmbeddingPrediction, dict[str, EmbeddingPrediction]]:
    with torch.no_grad():  # torch.func transforms (GLM Jacobians) still work inside
        pid = predict_split(method, data.test_id, device)
        pood = {k: predict_split(method, s, device) for k, s in data.test_ood.items()}
    return pid, pood


def _prediction_arrays(prefix: str, pred: EmbeddingPrediction, labels: torch.Tensor) -> dict[str, np.ndarray]:
    arrs = {f"{prefix}_mean": pred.mean.numpy(), f"{prefix}_labels": labels.numpy()}
    if pred.var is not None:
        arrs[f"{prefix}_var"] = pred.var.numpy()
    return arrs


def fit_context(
    cfg: RunConfig,
    data: Dataset,
    device: torch.device,
    cache: ModelCache,
    timer: StageTimer,
    name: str,
    reuses_base_model: bool,
    charged_base: set,
) -> FitContext:
    """The FitContext of one method: nets come from the model cache, their recorded training time
    (also when loaded) is charged to the method, except the shared base model of a method that reuses it,
    charged once per run to the pseudo-method `base` (`charged_base` remembers it). Parts of the
    training time that the net measured itself (`info["stages"]`, see `Recipe.stages`) go to their own
    stages, the rest to "train"."""

    def train_model(seed: int, dropout: float = 0.0, charge_to: str | None = None, recipe=None):
        model, info, _cached = cache.get(seed, dropout, recipe)
        shared = recipe is None and dropout == 0.0 and seed == cfg.seed and reuses_base_model
        who = charge_to or (BASE if shared else name)
        if who != BASE or (seed, dropout) not in charged_base:
            parts = info.get("stages") or {}
            timer.add(who, "train", info["seconds"] - sum(parts.values()))
            for stage, seconds in parts.items():
                timer.add(who, stage, seconds)
            if who == BASE:
                charged_base.add((seed, dropout))
        return model

    def train_jointly(seeds: list[int]) -> list:
        got = cache.get_joint(seeds)
        timer.add(name, "train", sum(info["seconds"] for _, info, _ in got))
        return [model for model, _, _ in got]

    return FitContext(
        cfg=cfg,
        data=data,
        device=device,
        timer=timer,
        method=name,
        train_model=train_model,
        seed=cfg.seed,
        train_jointly=train_jointly,
    )


def method_run_config(state: RunState, name: str, seed: int) -> tuple[RunConfig, dict]:
    """(the config `name` is built with for `seed` before any tuning, what its diagnostics record of the
    recipe): the run's config + the method's recipe (`bench.recipes.method_config`). recipe=tuned then
    searches the method's knobs on val_id from there (`bench.tuning.fit_method`, which records them)."""
    cfg, cls = state.cfg.replace(seed=seed), METHODS.get(name)
    return method_config(cfg, cls), {"recipe": cfg.recipe}


def run_method(
    state: RunState,
    name: str,
    seed: int,
    data: Dataset,
    cache: ModelCache,
    timer: StageTimer,
    charged_base: set,
) -> tuple[list[dict], dict, dict[str, np.ndarray], list[dict]]:
    """Fit, predict and score one method for one seed: (result rows, diagnostics, per-query arrays,
    sensitivity rows: [] unless the config asks for a sweep and the method offers one). The method is built
    with the run's config + its recipe (+ for recipe=tuned the values searched on val_id: `bench.tuning`)."""
    cls = METHODS.get(name)
    fitter = tuning.Fitter(
        state.cfg.replace(seed=seed),
        name,
        cls,
        lambda c, t: fit_context(c, data, state.device, cache, t, name, cls.reuses_base_model, charged_base),
        lambda m, split: predict_split(m, split, state.device),
        timer,
        state.tuning_dir,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method: Method = tuning.fit_method(fitter, data.val_id)  # recipe=tuned: the search on val_id
        cfg = method.cfg  # the config it was fitted with (recipe, tuned values)
        with timer.stage(name, "predict"):
            pred_id, pred_ood = _predict_all(method, data, state.device)
    with timer.stage(name, "evaluate"):
        ev = evaluate(pred_id, pred_ood, data, cfg)
        rows = [{"method": name, "seed": seed, **r} for r in ev.rows(cfg)]
    sens: list[dict] = []
    if cfg.sensitivity_requested() and sensitivity.offered(method):
        with timer.stage(name, "sensitivity"), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sens = sensitivity.sweep(
                method, name, seed, data, cfg, lambda m: _predict_all(m, data, state.device)
            )
    arrays = _prediction_arrays("id", pred_id, data.test_id.y)
    for k, p in pred_ood.items():
        arrays.update(_prediction_arrays(f"ood_{k}", p, data.test_ood[k].y))
    arrays.update({f"pq_{k}": v for k, v in ev.per_query.items()})
    arrays.update({f"extra_{k}": v for k, v in ev.extras.items()})
    arrays.update({score_array(qs, score): v for (qs, score), v in ev.scores.items()})
    return rows, {**method.diagnostics, **ev.diagnostics}, arrays, sens


@dataclass
class FitOutcome:
    """What one (method, seed) produced: its result rows, diagnostics, per-query arrays, sensitivity rows
    and stage timings (its own, plus the shared base training as this fit saw it), or the error."""

    name: str
    seed: int
    rows: list[dict] = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    sensitivity: list[dict] = field(default_factory=list)
    times: list[dict] = field(default_factory=list)
    trained: int = 0
    error: dict | None = None


def fit_and_score(state: RunState, name: str, seed: int, data: Dataset, cache_root: Path) -> FitOutcome:
    """Fit, predict and score one method for one seed with its own config (`method_run_config`), timer and
    model cache; a failure is returned (one line, plus the traceback of a non-BenchError), never raised,
    so the others go on."""
    timer = StageTimer(state.device)
    out = FitOutcome(name, seed)
    cache = None
    try:
        cfg, recipe = method_run_config(state, name, seed)
        cache = ModelCache(cache_root, cfg, data.train_id, state.device)
        out.rows, out.diagnostics, out.arrays, out.sensitivity = run_method(
            state, name, seed, data, cache, timer, set()
        )
        out.diagnostics = {**out.diagnostics, "recipe": recipe}
    except KeyboardInterrupt:
        raise
    except Exception as e:  # one failing method must not lose the others
        out.error = {"method": name, "seed": seed, **error_record(e)}
    out.times = [
        {"method": m, "seed": seed, "stage": st, "seconds": t} for (m, st), t in timer.records.items()
    ]
    out.trained = cache.trained if cache is not None else 0
    return out


@dataclass
class _Charges:
    """Which shared costs the run has recorded: the base training per seed and the frozen trunk's extraction
    (once per run), each charged to the first method that completes (or was completed earlier)."""

    base: set = field(default_factory=set)
    extract: bool = False

    def saw(self, times: list[dict], seed: int) -> None:
        self.extract = self.extract or any(t["stage"] == EXTRACT_STAGE for t in times)
        if any(t["method"] == BASE and t["stage"] == "train" for t in times):
            self.base.add(seed)

    def keep(self, times: list[dict], seed: int, features: dict | None) -> list[dict]:
        """This outcome's timings with the base training kept only when not yet charged for the seed, and
        the extraction added when not yet charged for the run."""
        kept = [t for t in times if not (t["method"] == BASE and seed in self.base)]
        if features and not self.extract:
            kept.insert(
                0, {"method": BASE, "seed": seed, "stage": EXTRACT_STAGE, "seconds": features["seconds"]}
            )
        self.saw(kept, seed)
        return kept


def run(cfg: RunConfig, log=print) -> Path:
    """Run every method of cfg over every seed; returns the run folder. With cfg.workers != 1 (CPU) the
    (method, seed) pairs run in worker processes (`bench.parallel`); results are saved as they complete."""
    wall0, cpu0 = time.perf_counter(), parallel.process_cpu_seconds()
    methods = resolve_methods(cfg)
    resolve_scores(cfg)  # an unknown score fails here, before any data or folder
    BACKBONES.get(cfg.backbone)  # an unknown backbone fails here, before any data or folder
    device = resolve_device(cfg.device)
    # bad data fails here, before any run folder exists; a frozen trunk's features are made (or loaded) here
    data, features = prepare_benchmark(cfg, device, Path(cfg.out) / "cache")
    if any(tuning.wants_tuning(cfg, METHODS.get(m)) for m in methods):
        tuning.check_val(data.val_id)  # too small a split to tune on fails here, before any folder
    folder = RunWriter.open(cfg.out, cfg.name, cfg.digest())
    state = RunState(cfg, folder, device, methods, tuning_dir=folder.path / "tuning")
    write_config(state, "running")
    log(f"run folder: {folder.path}" + (" (resuming)" if folder.resumed else ""))
    if data.val_id is not None:
        how = (
            "val_items"
            if cfg.val_items
            else (
                f"carved for recipe=tuned: {DEFAULT_VAL_FRACTION:.0%} of the ID training pool, "
                f"at most {DEFAULT_VAL_CAP}"
            )
        )
        log(f"  val_id: {len(data.val_id)} items ({how})")
    if features:
        ref = features["raw_features"].get(CORRECTNESS_METRIC, [float("nan")] * 3)
        log(
            f"  frozen {cfg.backbone} trunk: {features['feature_dim']}-d features of "
            f"{features['input_shape']} inputs "
            f"({features['extracted']} splits extracted now, {features['seconds']:.1f} s recorded); "
            f"raw-feature "
            f"{CORRECTNESS_METRIC} {ref[0]:.3f} [{ref[1]:.3f}, {ref[2]:.3f}]"
        )
    cache_root = Path(cfg.out) / "cache" / "models"
    pairing = REFERENCE_METHOD in methods  # then per-query arrays are kept for the paired differences
    charges = _Charges()
    done: dict[tuple[str, int], dict] = {}  # (method, seed) -> rows, times, sensitivity, diagnostics, arrays
    pending: list[tuple[str, int]] = []
    for seed in cfg.resolved_seeds():
        for name in methods:
            saved = folder.finished(name, seed)
            arrays = folder.arrays(name, seed) if saved is not None else None
            if saved is not None and arrays is None:  # a marker without its arrays: paired.csv needs them
                log(
                    f"  {name} (seed {seed}): its per-query arrays are missing or unreadable; "
                    "fitting it again"
                )
            if arrays is None:
                pending.append((name, seed))
                continue
            charges.saw(saved["timings"], seed)
            done[(name, seed)] = {
                "rows": saved["rows"],
                "times": saved["timings"],
                "sensitivity": saved.get("sensitivity", []),
                "diagnostics": saved.get("diagnostics", {}),
                "arrays": arrays if pairing else None,
            }
            log(f"  {name} (seed {seed}): done earlier, reused")
    t0 = time.perf_counter()
    trained = 0

    def record(out: FitOutcome, seconds: float | None = None, _cpu: float | None = None) -> None:
        nonlocal trained
        trained += out.trained
        took = f" in {seconds:.0f} s" if seconds is not None else ""
        if out.error is not None:
            state.failures.append(out.error)
            log(f"  {out.name} (seed {out.seed}) FAILED{took}: {out.error['error']}")
            return
        fit_costs.remember(cache_root.parent, cfg, out.name, fit_costs.fit_seconds(out.times))
        times = charges.keep(out.times, out.seed, features)
        folder.save_method(out.name, out.seed, out.arrays, out.rows, times, out.diagnostics, out.sensitivity)
        done[(out.name, out.seed)] = {
            "rows": out.rows,
            "times": times,
            "sensitivity": out.sensitivity,
            "diagnostics": out.diagnostics,
            "arrays": out.arrays if pairing else None,
        }
        if seconds is not None:
            log(f"  {out.name} (seed {out.seed}) done{took}")
        if (tuned := tuning.summary(out.diagnostics)) is not None:
            log(f"  {out.name} (seed {out.seed}): {tuned}")

    workers = parallel.worker_count(cfg, device, len(pending))
    if workers > 1:
        costs, source = fit_costs.estimate_costs(cfg, pending, cache_root.parent)
        log(
            f"  {len(pending)} method fits in {workers} worker processes, longest first; "
            "the last ones share every core"
        )
        log(f"  cost estimates {source}")
        quiet = RunState(
            cfg.replace(quiet=True), None, device, methods, commit=state.commit, tuning_dir=state.tuning_dir
        )  # bars would interleave
        parallel.run_pool(
            lambda n, s: fit_and_score(quiet, n, s, data, cache_root),
            lambda n, s, msg: FitOutcome(n, s, error={"method": n, "seed": s, "error": msg, "traceback": ""}),
            pending,
            workers,
            record,
            costs,
        )
    else:
        for name, seed in pending:
            log(f"  {name} (seed {seed}) ...")
            record(fit_and_score(state, name, seed, data, cache_root))
    order = [
        (n, s) for s in cfg.resolved_seeds() for n in methods if (n, s) in done
    ]  # the run's order, not completion's
    all_rows = [r for k in order for r in done[k]["rows"]]
    all_times = [t for k in order for t in done[k]["times"]]
    all_sens = [r for k in order for r in done[k]["sensitivity"]]
    diagnostics = {f"{n}-seed{s}": done[(n, s)]["diagnostics"] for n, s in order}
    results = pd.DataFrame(all_rows, columns=RESULT_COLUMNS)
    timings = pd.DataFrame(all_times, columns=TIMING_COLUMNS)
    timings = timings.groupby(["method", "seed", "stage"], as_index=False, sort=False)["seconds"].sum()
    paired = None
    if pairing:
        perquery = {
            k: done[k]["arrays"]
            for k in sorted(order, key=lambda k: (methods.index(k[0]), k[1]))
            if done[k]["arrays"] is not None
        }
        paired = paired_differences(
            perquery,
            REFERENCE_METHOD,
            cfg.bootstrap_resamples,
            cfg.ci_level,
            cfg.seed,
            id_score=cfg.id_score,
            ood_score=cfg.ood_score,
        )
    sens_table = pd.DataFrame(all_sens, columns=sensitivity.SENSITIVITY_COLUMNS) if all_sens else None
    folder.write_tables(results, timings, seed_summary(results, cfg.ci_level), paired, sens_table)
    status = COMPLETE if not state.failures else "complete-with-failures"
    write_config(
        state,
        status,
        {
            "diagnostics": diagnostics,
            **(
                {"tuning": {k: d["tuning"] for k, d in diagnostics.items() if "tuning" in d}}
                if cfg.recipe == "tuned"
                else {}
            ),
            "wall_seconds": time.perf_counter() - t0,
            "models_trained": trained,
            "workers": workers,
            "cpu": parallel.utilisation_record(
                time.perf_counter() - wall0, parallel.process_cpu_seconds() - cpu0
            ),
            "class_names": data.class_names,
            "data_label": data.label,
            **({"features": features} if features else {}),
            "data": {
                "train_id": len(data.train_id),
                "test_id": len(data.test_id),
                **({"val_id": len(data.val_id)} if data.val_id is not None else {}),
                **{f"ood_{k}": len(v) for k, v in data.test_ood.items()},
            },
        },
    )
    return folder.path
