"""Run configuration: one dataclass, named presets, and validated command-line overrides."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any, get_args, get_origin, get_type_hints

from bench.conventions import DISTANCES
from bench.errors import BenchError, require

ALL_METHODS = "all"
ALL_SCORES = "all"


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run. Presets fill it; CLI flags override single fields."""

    name: str = "default"
    preset: str = "default"
    methods: tuple[str, ...] = (ALL_METHODS,)
    dataset: str = "fashion_mnist"
    far_ood: tuple[str, ...] | None = (
        None  # datasets whose test images are far-OOD sets (None: the dataset's default)
    )
    heldout_classes: tuple[int, ...] = (7, 8, 9)  # held out of training, used as near-OOD queries
    data_dir: str | None = None
    n_train: int | None = None  # subsample of the ID training set (None: all)
    n_test: int | None = None  # subsample of each test split (None: all)
    # validation split carved from the ID training classes before training (the base model never sees
    # it): class-stratified, seeded; for tuning (prior precision, likelihood scale). 0: none
    val_items: int = 0
    # recipes (bench.recipes): paper | tuned (paper, then the method's tunable knobs searched on val_id with
    # tune_trials trials, bench.tuning) | default (the harness's former defaults)
    recipe: str = "paper"
    tune_trials: int = 12
    seed: int = 0
    seeds: tuple[int, ...] = ()  # several seeds: the run repeats per seed (empty: just `seed`)
    # protocol: closed (train on the classes not held out, retrieve among them, held-out classes as
    # near-OOD) | zero_shot (train on the first half of the classes, retrieve among the unseen ones)
    protocol: str = "closed"
    # images: None keeps images at their stored size, in memory as float tensors; a size N feeds them
    # through a DataLoader (uint8 or paths kept), test time Resize(N / crop_fraction) + CenterCrop(N)
    image_size: int | None = None
    crop_fraction: float = 0.875
    augment: bool = False  # train-time RandomResizedCrop(image_size) + horizontal flip
    data_workers: int = 2  # DataLoader worker processes (results do not depend on it)
    image_chunk: int = 256  # images per DataLoader batch when a whole split is read (predict, features)
    # model: a registered backbone (see `bench list`); the MLP takes flattened images
    backbone: str = "mlp"
    hidden: tuple[int, ...] = (16, 16, 16, 16)
    embed_dim: int = 2
    # CNN backbones: trunk (images -> pooled features) + head (features -> embedding)
    pooling: str = "avg"  # avg | gem (generalised mean, p = 3 learnable) | flat (flatten the last map)
    whiten_dim: int = 0  # > 0: a learned whitening Linear(features -> whiten_dim) before the embedding layer
    head_hidden: tuple[int, ...] = ()  # hidden Linear-ReLU widths of the head before the embedding layer
    l2_normalize: bool = False  # embeddings on the unit sphere
    dropout_before_head: bool = (
        False  # mc_dropout: also a Dropout on the pooled features (else only inside the head)
    )
    freeze_backbone: bool = (
        False  # a frozen trunk: its features are computed once, cached, and methods see the head
    )
    backbone_weights: str | None = None  # local weights file for the trunk (None: the backbone's default)
    # training (shared loop): PML ContrastiveLoss on pairs from a TripletMarginMiner
    epochs: int = 15
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    pos_margin: float = 0.0
    neg_margin: float = 1.0
    miner_margin: float = 0.2
    miner_type: str = "all"
    # the geometry of loss, miner, curvature and retrieval: euclidean = ||f_a - f_b||, cosine =
    # ||f_a/||f_a|| - f_b/||f_b||| (pytorch-metric-learning's default LpDistance: normalised embeddings)
    distance: str = "euclidean"
    # CPU threads for the training loop (0: torch's default). Small-batch training of a small net is
    # dispatch-bound; extra intra-op threads only add synchronisation (measured on 2 cores: 5 ms per
    # step with 1 thread vs 55 ms with 2 while the other core is busy).
    train_threads: int = 1
    # evaluation
    ks: tuple[int, ...] = (1, 3, 5, 7)
    bootstrap_resamples: int = 1000
    ci_level: float = 0.95
    # uncertainty scores (bench/scores/, `bench list`): every one in `scores` gets its metrics
    # (`AUSE:<score>`, ...); the headline ECE/AUSE/AURG are id_score's, AUROC/AUPR/FPR95/var_ratio[set]
    # ood_score's
    scores: tuple[str, ...] = (ALL_SCORES,)
    id_score: str = "top1_flip"
    ood_score: str = "trace"
    score_candidates: int = (
        0  # K_c: search only the K_c nearest gallery items (under the mean) per draw; 0: all (exact)
    )
    score_samples: int = 100  # independent Gaussian draws for methods without joint samples
    # Laplace family
    la_subset: str = (
        "auto"  # auto | all | head | last_k:<k>: the parameters a posterior covers (bench.la.subsets)
    )
    hessian: str = "ggn"  # ggn | jtj
    # what one observation of the Gibbs likelihood is and its temperature (bench.la.likelihood):
    # batch (the loss as trained) | pair (every active pair) | a number t (t x batch) | tuned (on val_id)
    likelihood_scale: str = "batch"
    predictive: str = "glm"  # glm (closed form) | lmc (linearised samples) | mc (sampled networks)
    posterior_samples: int = 100  # posterior draws: sampled networks (mc) or linearised samples (glm, lmc)
    prior_precision: str = "marglik"  # a number, marglik or grid
    jacobian_chunk: int = 256  # items per Jacobian chunk (curvature, GLM predictive, MC predictive)
    hessian_items: int | None = None  # seeded subset of train_id for the curvature (None: all), scaled by N/n
    hessian_dtype: str = "float32"  # accumulation dtype: float32 | float64
    # sensitivity sweep (opt-in): methods that offer one (the Laplace family) are re-evaluated at every
    # (prior precision, likelihood temperature) of these axes from one factorisation; an empty axis
    # holds the fitted value; both empty: off (bench.sensitivity)
    sensitivity_priors: tuple[float, ...] = ()
    sensitivity_scales: tuple[float, ...] = ()
    # options that method plugins declare (`Method.options`, e.g. mc_dropout's dropout_passes), as sorted
    # (name, value) pairs; a preset may set them by name (`preset_config`)
    method_options: tuple[tuple[str, Any], ...] = ()
    # execution
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # (method, seed) fits at once in forked CPU worker processes (bench.parallel): 0 = one per core (at most
    # one per fit), 1 = serial; CUDA runs are serial. Results do not depend on it (up to rounding)
    workers: int = 0
    out: str = "runs"
    quiet: bool = False
    report: bool = True

    def resolved_seeds(self) -> tuple[int, ...]:
        """The seeds this run covers."""
        return self.seeds or (self.seed,)

    def sensitivity_requested(self) -> bool:
        """Whether a sensitivity sweep was asked for (either axis non-empty; `bench.sensitivity`)."""
        return bool(self.sensitivity_priors or self.sensitivity_scales)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field."""
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}

    def digest(self, keys: list[str] | None = None) -> str:
        """Short stable hash of the given fields (all fields but execution ones when None)."""
        skip = {
            "name",
            "out",
            "quiet",
            "report",
            "device",
            "data_dir",
            "data_workers",
            "image_chunk",
            "workers",
        }
        d = self.to_dict()
        payload = {k: d[k] for k in (keys or [k for k in d if k not in skip])}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with some fields changed (validated)."""
        cfg = dataclasses.replace(self, **changes)
        validate(cfg)
        return cfg


def bootstrap_resamples(recorded: dict[str, Any]) -> int:
    """The bootstrap resamples of a recorded config (a run folder's config.json; the RunConfig default
    where an older folder lacks the field)."""
    return int(recorded.get("bootstrap_resamples", RunConfig.bootstrap_resamples))


def jsonable(v: Any) -> Any:
    """A config value as JSON holds it: tuples (nested too) as lists."""
    return [jsonable(x) for x in v] if isinstance(v, tuple) else v


# (dataset, result label, zero-shot split, near-OOD set) of the real fine-grained presets
FINE_GRAINED = (
    ("cub100", "CUB-200-2011 (100-species subset, 227 px)", "50 species train, 50 test", "cars_train"),
    ("cars_train", "Cars196 (training half, 196 classes)", "98 classes train, 98 test", "cub100"),
)

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "smoke": (
        "seconds, for tests: a few hundred samples, 1 epoch, tiny net",
        dict(
            n_train=400,
            n_test=150,
            epochs=1,
            batch_size=32,
            hidden=(16, 16),
            posterior_samples=10,
            dropout_passes=10,
            ensemble_size=2,
            bootstrap_resamples=200,
            jacobian_chunk=64,
        ),
    ),
    "default": (
        "every method on Fashion-MNIST in a few minutes on a 2-core CPU (paper net, shorter training)",
        dict(
            epochs=2, batch_size=64, n_test=2000, posterior_samples=30, dropout_passes=30, hessian_items=4096
        ),
    ),
    "seed": (
        "the seed's pipeline as written: PML defaults (cosine distance), TripletMarginMiner(0.2, all), "
        "5 Linear layers to 2-d, batch 16, 15 epochs, J^T J Hessian, 100 sampled networks, their mean",
        dict(
            methods=("plain", "full_la", "laplace_torch"),
            distance="cosine",
            epochs=15,
            batch_size=16,
            hessian="jtj",
            predictive="mc",
            posterior_samples=100,
            dropout_passes=100,
            prior_precision="marglik",
            # the J^T J spectrum decays slowly: no low rank reaches the tolerance, the exact Cholesky path is
            # the fast one
            method_options=(("posterior_rank_tol", 0.0),),
        ),
    ),
    "paper": (
        "the seed paper's protocol: 5 Linear layers, 2-d embedding, batch 16, 15 epochs, 100 samples",
        # curvature from 8192 of the 42,000 training items (scaled by N/n): AUROC within the all-items CIs
        # (README)
        dict(epochs=15, batch_size=16, posterior_samples=100, dropout_passes=100, hessian_items=8192),
    ),
    "cifar": (
        "CIFAR-10 (0-6 ID, 7-9 near-OOD, MNIST/Fashion far-OOD): frozen ImageNet EfficientNet-Lite0 "
        "features at "
        "64 px + a trained Linear head to 8-d (weight decay 0.5); every method on a 2-core CPU",
        dict(
            dataset="cifar10",
            backbone="efficientnet_lite0",
            freeze_backbone=True,
            image_size=64,
            crop_fraction=1.0,
            embed_dim=8,
            far_ood=("mnist_ood", "fashion_ood"),
            n_train=10000,
            n_test=2000,
            epochs=20,
            batch_size=64,
            lr=3e-4,
            weight_decay=0.5,  # Adam's L2 term: without it the head overfits (train P@1 0.71, test 0.52)
            posterior_samples=30,
            dropout_passes=30,
            hessian_items=2048,
        ),
    ),
    "cifar_scratch": (
        "CIFAR-10 with the 32-64-64 conv net from scratch (flatten -> Linear(1024, 16)), augmented; "
        "meant for a GPU",
        dict(
            dataset="cifar10",
            backbone="convnet",
            pooling="flat",
            image_size=32,
            crop_fraction=1.0,
            augment=True,
            embed_dim=16,
            far_ood=("mnist_ood", "fashion_ood"),
            epochs=30,
            batch_size=64,
            n_test=2000,
            posterior_samples=30,
            dropout_passes=30,
            hessian_items=4096,
        ),
    ),
    **{
        name: (
            f"{label}, zero-shot (train on the first half of the classes): ImageNet "
            f"EfficientNet-Lite0 fine-tuned "
            "at 224 px, GeM pooling, 128-d L2-normalised embedding; needs the data under --data-dir",
            dict(
                dataset=ds,
                protocol="zero_shot",
                backbone="efficientnet_lite0",
                pooling="gem",
                image_size=224,
                augment=True,
                embed_dim=128,
                l2_normalize=True,
                epochs=30,
                batch_size=64,
                lr=1e-4,
                posterior_samples=30,
                dropout_passes=30,
                hessian_items=4096,
            ),
        )
        for name, ds, label in (
            ("cub", "cub200", "CUB-200-2011"),
            ("cars", "cars196", "Cars-196"),
            ("sop", "sop", "Stanford Online Products"),
        )
    },
    # the real fine-grained sets on this CPU (docs/fine-grained.md): a frozen ImageNet trunk at 128 px
    # (raw-feature R@1 on 600 cub100 test images: 96 px 0.475, 128 px 0.620, 160 px 0.685, at 35 / 91 /
    # 196 ms per image under load), cached features, a trained Linear head, every method; zero-shot on
    # half the classes, near-OOD the other fine-grained set, far-OOD Caltech-101 and PACS sketches
    **{
        name: (
            f"{label}, zero-shot ({split}): frozen ImageNet EfficientNet-Lite0 features at 128 px + a "
            "trained Linear head to 8-d (weight decay 0.5), 1000 items per test split; every method on a "
            f"2-core CPU; near-OOD {near}, far-OOD Caltech-101 and PACS sketches (images under --data-dir)",
            dict(
                dataset=name,
                protocol="zero_shot",
                backbone="efficientnet_lite0",
                freeze_backbone=True,
                image_size=128,
                crop_fraction=1.0,
                embed_dim=8,
                far_ood=(near, "caltech101", "pacs_sketch"),
                n_test=1000,
                epochs=20,
                batch_size=64,
                lr=3e-4,
                weight_decay=0.5,
                posterior_samples=30,
                dropout_passes=30,
                hessian_items=2048,
            ),
        )
        for name, label, split, near in FINE_GRAINED
    },
    # the same sets fine-tuned end to end (the cub/cars recipe: 224 px, augmented, GeM, 128-d on the sphere)
    **{
        f"{name}_finetune": (
            f"{label}, zero-shot: ImageNet EfficientNet-Lite0 fine-tuned at 224 px with "
            "augmentation, GeM pooling, 128-d L2-normalised embedding, Adam 1e-4, 30 epochs; "
            "meant for a GPU (images under --data-dir)",
            dict(
                dataset=name,
                protocol="zero_shot",
                backbone="efficientnet_lite0",
                pooling="gem",
                image_size=224,
                augment=True,
                embed_dim=128,
                l2_normalize=True,
                epochs=30,
                batch_size=64,
                lr=1e-4,
                far_ood=(near, "caltech101", "pacs_sketch"),
                n_test=1000,
                posterior_samples=30,
                dropout_passes=30,
                hessian_items=4096,
            ),
        )
        for name, label, _, near in FINE_GRAINED
    },
}


def preset_config(preset: str) -> RunConfig:
    """The RunConfig of a named preset."""
    if preset not in PRESETS:
        raise BenchError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    settings = dict(PRESETS[preset][1])
    known = {f.name for f in fields(RunConfig)}
    options = dict(settings.pop("method_options", ()))
    options.update((k, settings.pop(k)) for k in list(settings) if k not in known)  # method options by name
    return RunConfig(name=preset, preset=preset, method_options=tuple(sorted(options.items())), **settings)


def _field_types() -> dict[str, Any]:
    return get_type_hints(RunConfig)


def declared_options() -> dict[str, Any]:
    """Option name -> `bench.method.Option` for every option a registered method declares."""
    from bench.registry import METHODS

    return {name: opt for m in METHODS.names() for name, opt in METHODS.get(m).options.items()}


def parse_value(key: str, text: str) -> Any:
    """Parse a command-line string into the type of RunConfig field (or declared method option) `key`."""
    types = _field_types()
    if key not in types:
        opts = declared_options()
        if key in opts:
            return _scalar(key, opts[key].type, text)
        raise BenchError(
            f"unknown config field {key!r}; fields: {', '.join(types)}; "
            f"method options: {', '.join(opts) or 'none'}"
        )
    tp = types[key]
    if type(None) in get_args(tp):
        inner = next(a for a in get_args(tp) if a is not type(None))
        if str(text).lower() in ("none", "null") or (str(text) == "" and get_origin(inner) is not tuple):
            return None  # an empty tuple field (e.g. far_ood=) stays an empty tuple: "none of them"
        tp = inner
    if get_origin(tp) is tuple and key != "method_options":
        inner = get_args(tp)[0]
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        return tuple(_scalar(key, inner, p) for p in parts)
    return _scalar(key, tp, text)


def _scalar(key: str, tp: Any, text: str) -> Any:
    try:
        if tp is bool:
            low = str(text).lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return low in ("1", "true", "yes")
        return tp(text)
    except (TypeError, ValueError):
        raise BenchError(f"bad value {text!r} for {key}: expected {getattr(tp, '__name__', tp)}") from None


def validate(cfg: RunConfig) -> None:
    """Reject configurations that cannot run, with one line saying why (the generic fields; each
    method checks its own options in `Method.validate`)."""
    require(len(cfg.methods) > 0, "empty method list: give at least one method (see `python -m bench list`)")
    require(
        cfg.seed >= 0 and all(s >= 0 for s in cfg.seeds),
        f"seeds must be >= 0, got {cfg.seed} / {list(cfg.seeds)}",
    )
    require(cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}")
    require(cfg.batch_size >= 2, f"batch-size must be >= 2 (pairs need two items), got {cfg.batch_size}")
    require(len(cfg.ks) > 0 and all(k >= 1 for k in cfg.ks), f"every K must be >= 1, got {list(cfg.ks)}")
    require(cfg.embed_dim >= 1, f"embed_dim must be >= 1, got {cfg.embed_dim}")
    require(
        cfg.protocol in ("closed", "zero_shot"), f"protocol must be closed or zero_shot, got {cfg.protocol!r}"
    )
    require(
        cfg.image_size is None or cfg.image_size >= 8, f"image_size must be >= 8 pixels, got {cfg.image_size}"
    )
    require(0.0 < cfg.crop_fraction <= 1.0, f"crop_fraction must be in (0, 1], got {cfg.crop_fraction}")
    require(cfg.data_workers >= 0, f"data_workers must be >= 0, got {cfg.data_workers}")
    require(cfg.workers >= 0, f"workers must be >= 0 (0: one per CPU core), got {cfg.workers}")
    require(cfg.image_chunk >= 1, f"image_chunk must be >= 1, got {cfg.image_chunk}")
    require(cfg.pooling in ("avg", "gem", "flat"), f"pooling must be avg, gem or flat, got {cfg.pooling!r}")
    require(cfg.whiten_dim >= 0, f"whiten_dim must be >= 0, got {cfg.whiten_dim}")
    require(
        all(h >= 1 for h in cfg.head_hidden), f"head_hidden widths must be >= 1, got {list(cfg.head_hidden)}"
    )
    require(all(h >= 1 for h in cfg.hidden), f"hidden widths must be >= 1, got {list(cfg.hidden)}")
    require(cfg.jacobian_chunk >= 1, f"jacobian_chunk must be >= 1, got {cfg.jacobian_chunk}")
    require(cfg.train_threads >= 0, f"train_threads must be >= 0, got {cfg.train_threads}")
    require(
        cfg.distance in DISTANCES, f"distance must be one of {', '.join(DISTANCES)}, got {cfg.distance!r}"
    )
    require(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    require(cfg.n_train is None or cfg.n_train >= 2, f"n_train must be >= 2, got {cfg.n_train}")
    require(cfg.n_test is None or cfg.n_test >= 2, f"n_test must be >= 2, got {cfg.n_test}")
    require(cfg.val_items >= 0, f"val_items must be >= 0, got {cfg.val_items}")
    from bench.recipes import RECIPES

    require(cfg.recipe in RECIPES, f"unknown recipe {cfg.recipe!r}; recipes: {', '.join(RECIPES)}")
    require(cfg.tune_trials >= 1, f"tune_trials must be >= 1, got {cfg.tune_trials}")
    require(
        all(v > 0 for v in (*cfg.sensitivity_priors, *cfg.sensitivity_scales)),
        "sensitivity_priors and sensitivity_scales must be positive numbers",
    )
    require(cfg.bootstrap_resamples >= 0, "bootstrap_resamples must be >= 0")
    require(
        len(cfg.scores) > 0,
        "empty score list: give at least one score, or 'all' (see `python -m bench list`)",
    )
    require(
        cfg.score_candidates >= 0,
        f"score_candidates must be >= 0 (0: the whole gallery), got {cfg.score_candidates}",
    )
    require(cfg.score_samples >= 2, f"score_samples must be >= 2, got {cfg.score_samples}")
    require(0.0 < cfg.ci_level < 1.0, f"ci_level must be in (0, 1), got {cfg.ci_level}")
    require(len(set(cfg.heldout_classes)) == len(cfg.heldout_classes), "heldout_classes has duplicates")
    from bench.la.subsets import check_la_subset  # (lazy: torch)

    check_la_subset(cfg.la_subset)
    dev = cfg.device
    require(
        dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"),
        f"device must be auto, cpu or cuda[:N], got {dev!r}",
    )


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply already-typed overrides (config fields or declared method options) and validate."""
    known = {f.name for f in fields(RunConfig)} - {"method_options"}
    opts = {k: v for k, v in overrides.items() if k not in known}
    if opts:
        declared = declared_options()
        bad = [k for k in opts if k not in declared]
        if bad:
            raise BenchError(
                f"unknown config field {bad[0]!r}; fields: {', '.join(sorted(known))}; "
                f"method options: {', '.join(declared) or 'none'}"
            )
        merged = {**dict(cfg.method_options), **opts}
        overrides = {k: v for k, v in overrides.items() if k in known}
        overrides["method_options"] = tuple(sorted(merged.items()))
    cfg = dataclasses.replace(cfg, **overrides)
    validate(cfg)
    return cfg
