"""The on-disk cache of trained nets: a net is keyed by a hash of everything that determines its
weights (the config fields training reads, the data, the seed, and the code that trains it), loaded
instead of retrained, and trained once when concurrent runs need it (a file lock)."""

from __future__ import annotations

import ast
import fcntl
import hashlib
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from bench.atomic import atomic_torch_save
from bench.config import RunConfig
from bench.data import Split
from bench.model import build_model
from bench.registry import BACKBONES
from bench.train import Recipe, train_embedding, train_net, train_nets_jointly

# fields of the data layer and the CNN backbones that change the trained weights
DATA_MODEL_KEYS = (
    "protocol",
    "image_size",
    "crop_fraction",
    "augment",
    "pooling",
    "whiten_dim",
    "head_hidden",
    "l2_normalize",
    "dropout_before_head",
    "freeze_backbone",
    "backbone_weights",
)


# the config fields the training reads (with the data's and the backbone's, DATA_MODEL_KEYS)
TRAINING_FIELDS = (
    "dataset",
    "heldout_classes",
    "val_items",
    "n_train",
    "backbone",
    "hidden",
    "embed_dim",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "pos_margin",
    "neg_margin",
    "miner_margin",
    "miner_type",
    "distance",
    *DATA_MODEL_KEYS,
)


# modules whose code determines a trained net: the loop, its optimiser, the loss (miner emulation, reducer
# weights and geometry included), the model builder; the backbone's module and a recipe's modules are added
# per key
TRAINING_MODULES = ("bench.train", "bench.optim", "bench.loss", "bench.model")


def code_digest(modules: list[str]) -> str:
    """sha256 over the code of the named (imported) modules, comments, formatting and docstrings
    ignored (the digest of each module's AST without docstrings), in the given order."""
    h = hashlib.sha256()
    for name in modules:
        tree = ast.parse(inspect.getsource(sys.modules[name]))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(body, list)
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
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


def model_key(
    cfg: RunConfig,
    in_shape: tuple[int, ...],
    n_train: int,
    seed: int,
    dropout: float,
    recipe: Recipe | None = None,
) -> dict:
    """Everything that determines the trained weights (the cache key's content): the config fields
    the training reads, and `code`, the `code_digest` of TRAINING_MODULES, the backbone's module and,
    with a recipe, the modules of its build and loss and its `modules` (so changed training code retrains)."""
    d = {k: cfg.to_dict()[k] for k in TRAINING_FIELDS}
    if getattr(cfg, "recipe", None) == "tuned" and not cfg.val_items:  # a default val_id was carved
        d["val_carved"] = "recipe=tuned default (bench.tuning.default_val_items)"
    modules = list(TRAINING_MODULES)
    if cfg.backbone in BACKBONES.names():  # an unknown one is refused before any training
        modules += _defining_modules(BACKBONES.get(cfg.backbone))
    if recipe is not None:
        modules += [
            m for m in (*_defining_modules(recipe.build, recipe.loss), *recipe.modules) if m not in modules
        ]
        d.update(recipe=recipe.name, recipe_options=dict(recipe.options))
    d.update(
        in_shape=list(in_shape),
        n_train_actual=n_train,
        seed=seed,
        dropout=dropout,
        version=4,
        code=code_digest(modules),
    )
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


class ModelCache:
    """Trained nets on disk under `root`, keyed by the hash of `model_key`; loads instead of retraining.

    `trained` counts the nets actually trained by this cache object (tests assert reuse with it).
    """

    def __init__(self, root: Path, cfg: RunConfig, train: Split, device: torch.device) -> None:
        self.root, self.cfg, self.train, self.device = Path(root), cfg, train, device
        self.trained = 0
        self.used: dict[str, dict] = {}

    def get(
        self, seed: int, dropout: float = 0.0, recipe: Recipe | None = None
    ) -> tuple[nn.Module, dict, bool]:
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
            desc = (
                f"train seed={seed}"
                + (f" dropout={dropout}" if dropout else "")
                + (f" {recipe.name}" if recipe else "")
            )
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
            infos = train_nets_jointly(
                models, self.cfg, self.train, self.device, seeds, f"train {len(seeds)} nets jointly"
            )
            out = []
            for model, info, key, path in zip(models, infos, keys, paths):
                info = {**info, "key": key}
                atomic_torch_save({"state_dict": model.state_dict(), "info": info}, path)
                self.used[key_hash(key)] = info
                out.append((model, info, False))
        self.trained += len(seeds)
        return out

    def _load(
        self, path: Path, h: str, seed: int, dropout: float, recipe: Recipe | None
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
