"""Frozen trunks: with `freeze_backbone`, a CNN's trunk (images -> pooled features) is run once per
split and its features cached on disk, and every method then sees the head on feature splits (so
every method, the deep ensemble included, works unchanged: an ensemble is M heads on one frozen trunk).

Cache: `<cache root>/features/<hash>.pt`, keyed by the backbone, a hash of the trunk's weights
(so a different weights file is a different key), the pooling, the split (its stored images,
items and transform: `Split.fingerprint`), the device type and EXTRACTION_VERSION; post-hoc methods,
seeds and reruns reuse it. The trunk is built with the fixed seed FROZEN_TRUNK_SEED (it does not
depend on the run seed, so seeds share the features; pretrained weights overwrite it anyway).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bench.atomic import atomic_torch_save
from bench.data import Dataset, Split, load_benchmark
from bench.errors import BenchError
from bench.model import build_model

EXTRACTION_VERSION = 1  # bump when the extraction changes the raw features (the feature-cache key)
FROZEN_TRUNK_SEED = 0
STD_FLOOR = 0.1  # a feature's std is at least this share of the mean std when standardising


def frozen_trunk(cfg, in_shape: tuple[int, ...]) -> nn.Module | None:
    """The run's frozen trunk in eval mode (None without `freeze_backbone`); a BenchError for a
    backbone without one (the MLP) or inputs that are not images."""
    if not cfg.freeze_backbone:
        return None
    if len(in_shape) != 3:
        raise BenchError(
            f"freeze_backbone needs image inputs, {cfg.dataset} has inputs of shape {list(in_shape)}"
        )
    trunk = getattr(build_model(cfg, in_shape, FROZEN_TRUNK_SEED), "trunk", None)
    if trunk is None:
        raise BenchError(
            f"freeze_backbone: backbone {cfg.backbone!r} has no trunk to freeze (use a CNN backbone)"
        )
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk.eval()


def weights_hash(module: nn.Module) -> str:
    """sha256 (16 hex digits) of every parameter and buffer of `module`, by name."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def extract_features(
    trunk: nn.Module,
    split: Split,
    device: torch.device,
    chunk: int,
    desc: str = "features",
    quiet: bool = False,
) -> torch.Tensor:
    """trunk(test-time inputs) of every item of split, in order, as float32 [N, F] on CPU, in
    batches of `chunk` images."""
    n = len(split)
    batches = [torch.arange(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    out = []
    with torch.no_grad():
        for xb in tqdm(
            split.batches(batches),
            total=len(batches),
            desc=desc,
            disable=True if quiet else None,
            leave=False,
        ):
            out.append(trunk(xb.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


class FeatureCache:
    """Features of one frozen trunk on disk under `root` (module docstring); `extracted` counts the
    splits whose features this object computed (tests count reuse with it), `seconds` the recorded
    extraction time of every split it served (charged once per run, also when loaded)."""

    def __init__(self, root: Path, cfg, trunk: nn.Module, device: torch.device) -> None:
        self.root, self.cfg, self.trunk, self.device = Path(root), cfg, trunk, device
        self.weights = weights_hash(trunk)
        self.extracted, self.seconds = 0, 0.0

    def key(self, split: Split) -> dict:
        return {
            "backbone": self.cfg.backbone,
            "weights": self.weights,
            "pooling": self.cfg.pooling,
            "split": split.fingerprint(),
            "device": self.device.type,
            "version": EXTRACTION_VERSION,
        }

    def get(self, split: Split, name: str) -> Split:
        """The split's features as an in-memory Split (same labels), from the cache or computed now."""
        from bench.model_cache import model_lock

        key = self.key(split)
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = self.root / f"{h}.pt"
        blob = self._load(path)
        if blob is None:
            with model_lock(self.root / f"{h}.lock"):  # concurrent runs extract each split once
                blob = self._load(path)
                if blob is None:
                    start = time.perf_counter()
                    feats = extract_features(
                        self.trunk,
                        split,
                        self.device,
                        self.cfg.image_chunk,
                        f"features {name}",
                        self.cfg.quiet,
                    )
                    blob = {"features": feats, "seconds": time.perf_counter() - start, "key": key}
                    atomic_torch_save(blob, path)
                    self.extracted += 1
        self.seconds += float(blob["seconds"])
        return Split(blob["features"], split.y)

    @staticmethod
    def _load(path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a corrupt entry is recomputed, never trusted
            path.unlink(missing_ok=True)
            return None


def prepare_benchmark(cfg, device: torch.device, cache_root: Path) -> tuple[Dataset, dict]:
    """The run's data as methods see it: `load_benchmark(cfg)`, and with a frozen trunk every split
    replaced by its cached trunk features (`FeatureCache` under cache_root/features). Returns
    (dataset, info); info is empty without a frozen trunk, else seconds (extraction, as recorded),
    extracted (splits computed now), feature_dim, the trunk's weights hash and a note for reports."""
    data = load_benchmark(cfg)
    trunk = frozen_trunk(cfg, data.train_id.in_shape)
    if trunk is None:
        return data, {}
    cache = FeatureCache(Path(cache_root) / "features", cfg, trunk.to(device), device)
    raw = Dataset(
        data.name,
        cache.get(data.train_id, "train_id"),
        cache.get(data.test_id, "test_id"),
        {k: cache.get(s, k) for k, s in data.test_ood.items()},
        data.class_names,
        None if data.val_id is None else cache.get(data.val_id, "val_id"),
        data.label,
    )
    dim = raw.train_id.in_shape[0]
    return standardize(raw), {
        "seconds": cache.seconds,
        "extracted": cache.extracted,
        "feature_dim": dim,
        "raw_features": raw_feature_reference(raw, cfg),
        "trunk_weights": cache.weights,
        "input_shape": list(data.train_id.in_shape),
        "note": f"frozen {cfg.backbone} trunk: methods see the head on cached {dim}-d features "
        "(the deep ensemble is M heads on the one frozen trunk)",
    }


def standardize(data: Dataset) -> Dataset:
    """Every split's features standardised per dimension with the training split's statistics,
    f' = (f - mean_train) / max(std_train, STD_FLOOR * mean(std_train)): the head's input scale, as
    pixel statistics are for images (pooled ReLU features are all positive with norms ~60, which a
    Linear head trained with the shared learning rate fits poorly). The floor keeps a dimension that
    is (nearly) constant on the training images, as sparse ReLU features can be, from blowing a test
    image's feature up by 1e6."""
    mean, std = data.train_id.x.mean(0), data.train_id.x.std(0)
    std = std.clamp_min(STD_FLOOR * float(std.mean()) + 1e-12)
    fix = lambda s: Split((s.x - mean) / std, s.y)  # noqa: E731
    return Dataset(
        data.name,
        fix(data.train_id),
        fix(data.test_id),
        {k: fix(s) for k, s in data.test_ood.items()},
        data.class_names,
        None if data.val_id is None else fix(data.val_id),
        data.label,
    )


def raw_feature_reference(data: Dataset, cfg) -> dict[str, list[float]]:
    """Retrieval of the frozen trunk's raw features (no head, not standardised), the reference a
    trained head must beat: metric -> [value, ci_low, ci_high] of leave-one-out retrieval on test_id
    (Euclidean distance, as the heads'; bootstrap over queries like every method's)."""
    from bench.metrics.bootstrap import bootstrap_mean_ci
    from bench.metrics.retrieval import retrieval_per_query

    per_query = retrieval_per_query(data.test_id.x, data.test_id.y, cfg.ks)
    return {
        k: list(bootstrap_mean_ci(v, cfg.bootstrap_resamples, cfg.ci_level, seed=cfg.seed))
        for k, v in per_query.items()
    }
