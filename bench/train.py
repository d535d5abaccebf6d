"""The shared training loop: PML ContrastiveLoss on pairs mined by a TripletMarginMiner, seeded,
device-agnostic, and cached on disk by a hash of everything that determines the trained weights."""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from pytorch_metric_learning import distances, losses, miners
from tqdm.auto import tqdm

from bench.config import RunConfig
from bench.errors import BenchError
from bench.data import Split
from bench.model import build_model
from bench.atomic import atomic_torch_save


def make_loss_and_miner(cfg: RunConfig) -> tuple[losses.ContrastiveLoss, miners.TripletMarginMiner]:
    """ContrastiveLoss and TripletMarginMiner on plain Euclidean distances (no L2 normalisation,
    so 2-d embeddings are not squashed onto a circle); the miner's triplets become the loss's pairs."""
    dist = distances.LpDistance(normalize_embeddings=False, p=2, power=1)
    loss = losses.ContrastiveLoss(pos_margin=cfg.pos_margin, neg_margin=cfg.neg_margin, distance=dist)
    miner = miners.TripletMarginMiner(margin=cfg.miner_margin, type_of_triplets=cfg.miner_type, distance=dist)
    return loss, miner


def model_key(cfg: RunConfig, in_shape: tuple[int, ...], n_train: int, seed: int, dropout: float) -> dict:
    """Everything that determines the trained weights (the cache key's content)."""
    keys = ["dataset", "heldout_classes", "n_train", "backbone", "hidden", "embed_dim", "epochs", "batch_size",
            "lr", "weight_decay", "pos_margin", "neg_margin", "miner_margin", "miner_type"]
    d = {k: cfg.to_dict()[k] for k in keys}
    d.update(in_shape=list(in_shape), n_train_actual=n_train, seed=seed, dropout=dropout, version=2)
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


@contextmanager
def cpu_threads(n: int, device: torch.device) -> Iterator[None]:
    """Run a block with n intra-op CPU threads (no change when n == 0 or on a GPU)."""
    if n <= 0 or device.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x [B, ...], y [B]) -> loss


@dataclass(frozen=True)
class Recipe:
    """How a method trains its own net through the shared loop: `build(cfg, in_shape, seed)` makes the
    net, `loss(cfg)` gives its batch loss. `name` and `options` (JSON-safe) enter the cache key."""

    name: str
    build: Callable[..., nn.Module]
    loss: Callable[[RunConfig], BatchLoss]
    options: tuple[tuple[str, Any], ...] = ()


def contrastive_loss(cfg: RunConfig) -> BatchLoss:
    """The shared objective: ContrastiveLoss on the pairs the TripletMarginMiner finds in the batch."""
    loss_fn, miner = make_loss_and_miner(cfg)

    def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = model(x)
        return loss_fn(emb, y, miner(emb, y))

    return batch_loss


def train_net(model: nn.Module, batch_loss: BatchLoss, cfg: RunConfig, train: Split, device: torch.device,
              seed: int, desc: str = "train") -> dict:
    """Train `model` in place with Adam on `batch_loss` over seeded shuffled batches; returns info
    (per-epoch mean losses, wall time). A non-finite loss raises BenchError."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y = train.x.to(device), train.y.to(device)
    n = len(train)
    g = torch.Generator().manual_seed(seed)
    steps = math.ceil(n / cfg.batch_size)
    history: list[float] = []
    start = time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), cpu_threads(cfg.train_threads, device):
        torch.manual_seed(seed + 1)  # dropout masks and any sampling inside the loss
        bar = tqdm(total=cfg.epochs * steps, desc=desc, disable=True if cfg.quiet else None, leave=False)
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=g).to(device)
            total = torch.zeros((), device=device)
            for s in range(steps):
                idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                if idx.numel() < 2:
                    continue
                loss = batch_loss(model, x[idx], y[idx])
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
        key = model_key(self.cfg, self.train.in_shape, len(self.train), seed, dropout)
        if recipe is not None:
            key.update(recipe=recipe.name, recipe_options=dict(recipe.options))
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
            info = {**info, "key": key}
            atomic_torch_save({"state_dict": model.state_dict(), "info": info}, path)
        self.trained += 1
        self.used[h] = info
        return model, info, False

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
