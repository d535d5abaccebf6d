"""The shared training loop: PML ContrastiveLoss on pairs mined by a TripletMarginMiner, seeded,
device-agnostic, and cached on disk by a hash of everything that determines the trained weights."""
from __future__ import annotations

import ast
import copy
import fcntl
import hashlib
import inspect
import json
import sys
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from pytorch_metric_learning import distances, losses, miners
from tqdm.auto import tqdm

from bench.config import RunConfig
from bench.errors import BenchError
from bench.la.pairs import mined_pair_counts, reducer_weights
from bench.data import Split
from bench.images import item_seeds
from bench.environment import cpu_threads
from bench.metrics.retrieval import retrieval_space
from bench.model import build_model
from bench.atomic import atomic_torch_save
from bench.registry import BACKBONES


def make_loss_and_miner(cfg: RunConfig) -> tuple[losses.ContrastiveLoss, miners.TripletMarginMiner]:
    """ContrastiveLoss and TripletMarginMiner on LpDistance(p=2, power=1): plain Euclidean distances
    for distance=euclidean (2-d embeddings are not squashed onto a circle), distances between
    L2-normalised embeddings (PML's default LpDistance) for cosine; the miner's triplets become the
    loss's pairs."""
    dist = distances.LpDistance(normalize_embeddings=cfg.distance == "cosine", p=2, power=1)
    loss = losses.ContrastiveLoss(pos_margin=cfg.pos_margin, neg_margin=cfg.neg_margin, distance=dist)
    miner = miners.TripletMarginMiner(margin=cfg.miner_margin, type_of_triplets=cfg.miner_type, distance=dist)
    return loss, miner


# fields of the data layer and the CNN backbones that change the trained weights
DATA_MODEL_KEYS = ("protocol", "image_size", "crop_fraction", "augment", "pooling", "whiten_dim", "head_hidden",
                   "l2_normalize", "dropout_before_head", "freeze_backbone", "backbone_weights")


# modules whose code determines a trained net: this loop and loss, the miner emulation and reducer
# (bench.la.pairs), the geometry (bench.metrics.retrieval), the model builder; the backbone's module
# and a recipe's modules are added per key
TRAINING_MODULES = ("bench.train", "bench.la.pairs", "bench.metrics.retrieval", "bench.model")


def code_digest(modules: list[str]) -> str:
    """sha256 over the code of the named (imported) modules, comments, formatting and docstrings
    ignored (the digest of each module's AST without docstrings), in the given order."""
    h = hashlib.sha256()
    for name in modules:
        tree = ast.parse(inspect.getsource(sys.modules[name]))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(name.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()[:16]


def _defining_modules(*fns: Callable) -> list[str]:
    """The modules that define the given functions (for a bound method, also its object's class)."""
    out: list[str] = []
    for fn in fns:
        owner = getattr(fn, "__self__", None)
        for m in (getattr(fn, "__module__", None), type(owner).__module__ if owner is not None else None):
            if m and m in sys.modules and m not in out:
                out.append(m)
    return out


def model_key(cfg: RunConfig, in_shape: tuple[int, ...], n_train: int, seed: int, dropout: float,
              recipe: "Recipe | None" = None) -> dict:
    """Everything that determines the trained weights (the cache key's content): the config fields
    the training reads, and `code`, the `code_digest` of TRAINING_MODULES, the backbone's module and,
    with a recipe, the modules of its build and loss and its `modules` (so changed training code retrains)."""
    keys = ["dataset", "heldout_classes", "val_items", "n_train", "backbone", "hidden", "embed_dim", "epochs",
            "batch_size", "lr", "weight_decay", "pos_margin", "neg_margin", "miner_margin", "miner_type", "distance",
            *DATA_MODEL_KEYS]
    d = {k: cfg.to_dict()[k] for k in keys}
    modules = list(TRAINING_MODULES)
    if cfg.backbone in BACKBONES.names():  # an unknown one is refused before any training
        modules += _defining_modules(BACKBONES.get(cfg.backbone))
    if recipe is not None:
        modules += [m for m in (*_defining_modules(recipe.build, recipe.loss), *recipe.modules) if m not in modules]
        d.update(recipe=recipe.name, recipe_options=dict(recipe.options))
    d.update(in_shape=list(in_shape), n_train_actual=n_train, seed=seed, dropout=dropout, version=4,
             code=code_digest(modules))
    if cfg.freeze_backbone:  # the head's inputs are the trunk's features as bench.features makes them
        from bench.conventions import FEATURE_VERSION

        d.update(features=FEATURE_VERSION)
    return d


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def model_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (fcntl), held for the block: processes that need the
    same model wait for the one that trains it. The lock dies with its process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x [B, ...], y [B]) -> loss


@dataclass(frozen=True)
class Recipe:
    """How a method trains its own net through the shared loop: `build(cfg, in_shape, seed)` makes the
    net, `loss(cfg)` gives its batch loss. `name` and `options` (JSON-safe) enter the cache key.
    `stages(model)` (optional): seconds of the training time that the trained net measured itself as
    parts of it ({stage: seconds}, e.g. online curvature), cached with the net and charged by the
    runner to those stages instead of "train". `modules`: further (imported) modules whose code
    determines the trained net, besides those defining build and loss (their code enters the key)."""

    name: str
    build: Callable[..., nn.Module]
    loss: Callable[[RunConfig], BatchLoss]
    options: tuple[tuple[str, Any], ...] = ()
    stages: Callable[[nn.Module], dict[str, float]] | None = None
    modules: tuple[str, ...] = ()


def batched_contrastive_loss(F: torch.Tensor, y: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """Per-batch losses [nb] of embeddings F [nb, m, d] with labels y [nb, m]: PML's ContrastiveLoss
    (cfg.distance, AvgNonZeroReducer) on the pairs of its TripletMarginMiner, computed as sum over
    pairs of reducer weight x pair loss without listing pairs (`bench.la.pairs`); equal to
    `make_loss_and_miner`'s loss and gradients on the same batch up to float rounding (tested)."""
    return contrastive_loss_and_counts(F, y, cfg)[0]


def contrastive_loss_and_counts(F: torch.Tensor, y: torch.Tensor, cfg: RunConfig
                                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`batched_contrastive_loss` and the mined pair multiplicities (C_pos, C_neg) [nb, m, m] it used
    (`bench.la.pairs.mined_pair_counts`), so the loss's curvature can reuse its pairs."""
    dist, (W_pos, W_neg), counts = mined_pair_weights(F, y, cfg)
    return weighted_pair_loss(dist, W_pos, W_neg, cfg), counts


def mined_pair_weights(F: torch.Tensor, y: torch.Tensor, cfg: RunConfig
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The mining half of the loss: (dist [nb, m, m] with grad, (W_pos, W_neg), (C_pos, C_neg)), the
    distances in cfg.distance's geometry, the reducer weights and mined multiplicities (no grad)."""
    G = retrieval_space(F, cfg.distance)  # cosine: normalised as PML's LpDistance normalises
    dist = torch.cdist(G, G)  # what PML's LpDistance computes, so the mined set is the same
    with torch.no_grad():
        C_pos, C_neg = mined_pair_counts(F, y, cfg.miner_margin, cfg.miner_type, dist=dist)
        W = reducer_weights(C_pos, C_neg, dist, cfg.pos_margin, cfg.neg_margin)
    return dist, W, (C_pos, C_neg)


def weighted_pair_loss(dist: torch.Tensor, W_pos: torch.Tensor, W_neg: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """The loss half: sum_ab W_pos relu(d_ab - m_pos) + W_neg relu(m_neg - d_ab) per batch [nb]."""
    pos = (W_pos * torch.relu(dist - cfg.pos_margin)).sum((1, 2))
    neg = (W_neg * torch.relu(cfg.neg_margin - dist)).sum((1, 2))
    return pos + neg


def contrastive_loss(cfg: RunConfig) -> BatchLoss:
    """The shared objective on one batch (see `batched_contrastive_loss`)."""

    def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return batched_contrastive_loss(model(x)[None], y[None], cfg)[0]

    return batch_loss


def make_optimizer(params, cfg: RunConfig) -> torch.optim.Optimizer:
    """Adam with the config's learning rate and weight decay, its fused kernel (one call per tensor
    for the whole update): a small net's step is bound by per-operator dispatch, and on CPU the fused
    step of the paper net takes ~0.4x the time of the multi-tensor (foreach) one, which there falls
    back to a loop of single-tensor operators (`python -m bench step-profile`). Same updates as the
    single-tensor reference up to float rounding (tested)."""
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def resident(train: Split, device: torch.device) -> Split:
    """The split the training loop draws batches from: an in-memory split without train-time
    augmentation is moved to `device` once, so that its batches are index slices of tensors already
    there (no host-to-device copy per step on a GPU); any other split as it is (its batches are made on
    the host, e.g. by a DataLoader, and copied)."""
    if not train.in_memory or train.augments or train.x.device == device:
        return train
    return Split(train.x.to(device), train.y.to(device))


def train_net(model: nn.Module, batch_loss: BatchLoss, cfg: RunConfig, train: Split, device: torch.device,
              seed: int, desc: str = "train") -> dict:
    """Train `model` in place with Adam on `batch_loss` over seeded shuffled batches; returns info
    (per-epoch mean losses, wall time). A non-finite loss raises BenchError."""
    opt = make_optimizer(model.parameters(), cfg)
    train = resident(train, device)
    y = train.y.to(device)
    n = len(train)
    g = torch.Generator().manual_seed(seed)  # the data order is drawn on the CPU on every device
    steps = math.ceil(n / cfg.batch_size)
    history: list[float] = []
    start = time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), cpu_threads(cfg.train_threads, device):
        torch.manual_seed(seed + 1)  # dropout masks and any sampling inside the loss
        bar = tqdm(total=cfg.epochs * steps, desc=desc, disable=True if cfg.quiet else None, leave=False)
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=g).to(train.y.device)
            total = torch.zeros((), device=device)
            batches = [b for b in perm.split(cfg.batch_size) if b.numel() >= 2]
            seeds = [item_seeds(seed, epoch, s, len(b)) for s, b in enumerate(batches)] if train.augments else None
            for idx, xb in zip(batches, train.batches(batches, seeds)):
                idx = idx.to(device)
                loss = batch_loss(model, xb.to(device), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach()
                bar.update(1)
            mean_loss = float(total) / steps
            if not math.isfinite(mean_loss):
                bar.close()
                raise BenchError(f"non-finite training loss in epoch {epoch + 1} ({desc}); try a smaller --set lr=")
            history.append(mean_loss)
        bar.close()
    model.eval()
    return {"loss_history": history, "seconds": time.perf_counter() - start}


def train_embedding(cfg: RunConfig, train: Split, device: torch.device, seed: int, dropout: float = 0.0,
                    desc: str = "train") -> tuple[nn.Module, dict]:
    """Train one `cfg.backbone` embedding net on the shared contrastive objective; (model, info)."""
    model = build_model(cfg, train.in_shape, seed, dropout).to(device)
    return model, train_net(model, contrastive_loss(cfg), cfg, train, device, seed, desc)


def train_nets_jointly(models: list[nn.Module], cfg: RunConfig, train: Split, device: torch.device,
                       seeds: list[int], desc: str = "train jointly") -> list[dict]:
    """Train M nets of one architecture side by side, in place: one vmapped forward over the stacked
    parameters (`torch.func.stack_module_state`), the batched loss over [M, B, d], one backward and
    one Adam over the stacked tensors (Adam is elementwise, so each net keeps its own moments).
    Net m keeps its own init, data order (Generator(seeds[m])) and optimiser state: it equals
    `train_net` of that net alone up to float rounding (tested). Returns one info per net; each is
    charged 1/M of the joint wall time."""
    if not models:
        return []
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules()):
        # batch-norm statistics are updated in place, which vmap cannot batch: train one by one
        return [train_net(model, contrastive_loss(cfg), cfg, train, device, s, f"{desc} {i + 1}/{len(models)}")
                for i, (model, s) in enumerate(zip(models, seeds))]
    params, buffers = stack_module_state(models)  # name -> [M, ...] leaves that require grad
    template = copy.deepcopy(models[0]).to("meta")

    def forward(p: dict, b: dict, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(template, (p, b), (xb,))

    batched_forward = vmap(forward)
    opt = make_optimizer(list(params.values()), cfg)
    train = resident(train, device)
    y = train.y.to(device)
    n, M = len(train), len(models)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    steps = math.ceil(n / cfg.batch_size)
    history: list[list[float]] = [[] for _ in models]
    start = time.perf_counter()
    with cpu_threads(cfg.train_threads, device):
        bar = tqdm(total=cfg.epochs * steps, desc=desc, disable=True if cfg.quiet else None, leave=False)
        for epoch in range(cfg.epochs):
            perms = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(train.y.device)  # [M, n]
            total = torch.zeros(M, device=device)
            batches = [b for b in perms.split(cfg.batch_size, dim=1) if b.shape[1] >= 2]  # [M, b] each
            seeds_ = ([torch.cat([item_seeds(sd, epoch, s, b.shape[1]) for sd in seeds]) for s, b in enumerate(batches)]
                      if train.augments else None)  # member m's items get the seeds train_net would give them
            for idx, xb in zip(batches, train.batches([b.reshape(-1) for b in batches], seeds_)):
                xb = xb.reshape(*idx.shape, *xb.shape[1:]).to(device)
                idx = idx.to(device)
                losses = batched_contrastive_loss(batched_forward(params, buffers, xb), y[idx], cfg)
                opt.zero_grad(set_to_none=True)
                losses.sum().backward()
                opt.step()
                total += losses.detach()
                bar.update(1)
            mean = (total / steps).tolist()
            if not all(math.isfinite(v) for v in mean):
                bar.close()
                raise BenchError(f"non-finite training loss in epoch {epoch + 1} ({desc}); try a smaller --set lr=")
            for h, v in zip(history, mean):
                h.append(v)
        bar.close()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for m, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(params[name][m])
            model.eval()
    return [{"loss_history": h, "seconds": seconds / M, "joint_seconds": seconds, "joint_size": M} for h in history]


class ModelCache:
    """Trained nets on disk under `root`, keyed by the hash of `model_key`; loads instead of retraining.

    `trained` counts the nets actually trained by this cache object (tests assert reuse with it).
    """

    def __init__(self, root: Path, cfg: RunConfig, train: Split, device: torch.device) -> None:
        self.root, self.cfg, self.train, self.device = Path(root), cfg, train, device
        self.trained = 0
        self.used: dict[str, dict] = {}

    def get(self, seed: int, dropout: float = 0.0, recipe: Recipe | None = None) -> tuple[nn.Module, dict, bool]:
        """(model, info, from_cache) for the given seed and dropout rate: the shared contrastive
        embedding net, or, with a `recipe`, a method's own net and objective."""
        key = model_key(self.cfg, self.train.in_shape, len(self.train), seed, dropout, recipe)
        h = key_hash(key)
        path = self.root / f"{h}.pt"
        found = self._load(path, h, seed, dropout, recipe)
        if found is not None:
            return found
        with model_lock(self.root / f"{h}.lock"):  # concurrent runs (a grid) train each model once
            found = self._load(path, h, seed, dropout, recipe)  # another process trained it meanwhile
            if found is not None:
                return found
            desc = f"train seed={seed}" + (f" dropout={dropout}" if dropout else "") + (f" {recipe.name}" if recipe else "")
            if recipe is None:
                model, info = train_embedding(self.cfg, self.train, self.device, seed, dropout, desc)
            else:
                model = self._build(seed, dropout, recipe)
                info = train_net(model, recipe.loss(self.cfg), self.cfg, self.train, self.device, seed, desc)
                if recipe.stages is not None:
                    info["stages"] = recipe.stages(model)
            info = {**info, "key": key}
            atomic_torch_save({"state_dict": model.state_dict(), "info": info}, path)
        self.trained += 1
        self.used[h] = info
        return model, info, False

    def get_joint(self, seeds: list[int]) -> list[tuple[nn.Module, dict, bool]]:
        """(model, info, from_cache) for contrastive nets of the given seeds trained side by side
        (`train_nets_jointly`); cached per member under a key naming the whole group."""
        keys = []
        for s in seeds:
            key = model_key(self.cfg, self.train.in_shape, len(self.train), s, 0.0)
            key.update(joint=list(seeds))
            keys.append(key)
        paths = [self.root / f"{key_hash(k)}.pt" for k in keys]
        with model_lock(self.root / f"{key_hash({'joint': [key_hash(k) for k in keys]})}.lock"):
            found = [self._load(p, key_hash(k), s, 0.0, None) for p, k, s in zip(paths, keys, seeds)]
            if all(f is not None for f in found):
                return found  # type: ignore[return-value]
            models = [build_model(self.cfg, self.train.in_shape, s).to(self.device) for s in seeds]
            infos = train_nets_jointly(models, self.cfg, self.train, self.device, seeds,
                                       f"train {len(seeds)} nets jointly")
            out = []
            for model, info, key, path in zip(models, infos, keys, paths):
                info = {**info, "key": key}
                atomic_torch_save({"state_dict": model.state_dict(), "info": info}, path)
                self.used[key_hash(key)] = info
                out.append((model, info, False))
        self.trained += len(seeds)
        return out

    def _load(self, path: Path, h: str, seed: int, dropout: float, recipe: Recipe | None
              ) -> tuple[nn.Module, dict, bool] | None:
        """(model, info, True) from a cache file, or None when absent; a corrupt file is deleted."""
        if not path.exists():
            return None
        try:
            blob = torch.load(path, map_location=self.device, weights_only=False)
            model = self._build(seed, dropout, recipe)
            model.load_state_dict(blob["state_dict"])
        except Exception:  # a corrupt cache entry is retrained, never trusted
            path.unlink(missing_ok=True)
            return None
        model.eval()
        self.used[h] = blob["info"]
        return model, blob["info"], True

    def _build(self, seed: int, dropout: float, recipe: Recipe | None) -> nn.Module:
        if recipe is None:
            return build_model(self.cfg, self.train.in_shape, seed, dropout).to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return recipe.build(self.cfg, self.train.in_shape, seed).to(self.device)
