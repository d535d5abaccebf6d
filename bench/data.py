"""Data types and the protocol that turns a data source into a benchmark: ID/OOD split by class,
subsampling, far-OOD sets from the dataset registry, and the one place images are normalised.

A dataset plugin (`datasets/`) only reads files: it returns a `DataSource` (raw train/test arrays,
class names, pixel statistics). `load_benchmark(cfg)` does the rest the same way for every source.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bench.conventions import NEAR_OOD_SET
from bench.errors import BenchError
from bench.registry import DATASETS

DATA_SEED = 0  # subsampling uses a fixed seed so every model seed sees the same data


@dataclass
class Split:
    """Model inputs x [N, *in_shape] (float32) and integer labels y [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one input (e.g. (1, 28, 28) for a grey image, (32,) for a feature vector)."""
        return tuple(self.x.shape[1:])

    def subset(self, n: int | None, seed: int = DATA_SEED) -> "Split":
        """A seeded random subset of n items (all when n is None or >= len), in the original order."""
        idx = subset_indices(len(self), n, seed)
        return self if idx is None else Split(self.x[idx], self.y[idx])


def subset_indices(total: int, n: int | None, seed: int = DATA_SEED) -> torch.Tensor | None:
    """Sorted indices of a seeded random subset of n of `total` items (None: keep all)."""
    if n is None or n >= total:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:n].sort().values


@dataclass
class Dataset:
    """In-distribution train/test splits, named OOD query sets and class names (what methods see).

    test_ood maps a set name ("heldout", "mnist", ...) to a Split; its labels are the source labels.
    val_id: items of the training classes held out of train_id before training (`val_items`; None
    when 0), for tuning that must not touch test data nor data the base model was fitted to.
    """

    name: str
    train_id: Split
    test_id: Split
    test_ood: dict[str, Split] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    val_id: Split | None = None


@dataclass
class DataSource:
    """What a dataset plugin returns: raw arrays as stored, before any protocol is applied.

    Images are uint8 [N, H, W] or [N, C, H, W]; feature data is float [N, F] and passes unchanged.
    pixel_stats: (mean, std) of the training pixels in [0, 1], used to standardise images (also the
    far-OOD images shown to a model trained on this source). ood_name names the set when the
    source serves as far-OOD data; ood_x/ood_y (default: the test arrays) are the images used then.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]
    pixel_stats: tuple[float, float] | None = None
    ood_name: str | None = None
    ood_x: np.ndarray | None = None
    ood_y: np.ndarray | None = None


def to_model_input(x: np.ndarray, pixel_stats: tuple[float, float] | None) -> torch.Tensor:
    """The one place inputs are normalised: uint8 images -> float32 [N, C, H, W] in [0, 1],
    standardised with pixel_stats; float feature arrays -> float32 as they are."""
    if x.dtype == np.uint8:
        if pixel_stats is None:
            raise BenchError("image data needs pixel statistics (mean, std) to be normalised")
        mean, std = pixel_stats
        img = x[:, None] if x.ndim == 3 else x
        return torch.from_numpy(np.ascontiguousarray((img.astype(np.float32) / 255.0 - mean) / std))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def check_heldout(heldout: tuple[int, ...], n_classes: int, dataset: str) -> None:
    """Held-out classes must exist and leave at least two classes for training."""
    bad = [c for c in heldout if not 0 <= c < n_classes]
    if bad:
        raise BenchError(f"heldout classes {bad} are outside {dataset}'s classes 0..{n_classes - 1}")
    if n_classes - len(set(heldout)) < 2:
        raise BenchError(f"heldout classes leave fewer than 2 training classes of {dataset}'s {n_classes}")


def _by_class(x: np.ndarray, y: np.ndarray, heldout: tuple[int, ...]) -> tuple[tuple, tuple]:
    """((x, y) of the classes not held out, (x, y) of the held-out classes)."""
    mask = np.isin(y, np.asarray(heldout, dtype=y.dtype))
    return (x[~mask], y[~mask].astype(np.int64)), (x[mask], y[mask].astype(np.int64))


def _split(xy: tuple[np.ndarray, np.ndarray], n: int | None, stats: tuple[float, float] | None) -> Split:
    """A seeded subset of n items of (x, y), normalised (labels as int64)."""
    x, y = xy
    idx = subset_indices(len(y), n)
    if idx is not None:
        x, y = x[idx.numpy()], y[idx.numpy()]
    return Split(to_model_input(x, stats), torch.from_numpy(y.astype(np.int64)))


def stratified_holdout(y: np.ndarray, n: int, seed: int = DATA_SEED) -> np.ndarray:
    """Boolean mask [N] selecting n items, class-stratified: class c gets n * N_c / N items rounded by
    largest remainder (ties to the smaller label), each class's items a seeded random choice."""
    classes, counts = np.unique(y, return_counts=True)
    if not 0 < n < len(y):
        raise BenchError(f"val_items must be between 1 and {len(y) - 1} (the ID training items), got {n}")
    quota = n * counts / counts.sum()
    take = np.floor(quota).astype(np.int64)
    rest = n - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:rest]] += 1
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for c, k in zip(classes, take):
        idx = np.flatnonzero(y == c)
        mask[rng.choice(idx, size=int(k), replace=False)] = True
    return mask


def far_ood_names(cfg) -> tuple[str, ...]:
    """The far-OOD datasets of a run: cfg.far_ood, else the ID dataset's registered default."""
    if cfg.far_ood is not None:
        return tuple(cfg.far_ood)
    return tuple(DATASETS.meta(cfg.dataset).get("far_ood", ()))


def load_benchmark(cfg) -> Dataset:
    """The run's data: cfg.dataset split into ID classes (train/test) and held-out classes
    (near-OOD "heldout"), plus the test images of every far-OOD dataset, each test split
    subsampled to cfg.n_test and the training split to cfg.n_train, all images normalised with the
    ID source's pixel statistics (a far-OOD image is shown to the model like any unseen image)."""
    for name in (cfg.dataset, *far_ood_names(cfg)):
        DATASETS.get(name)  # unknown names fail before any file is read
    src: DataSource = DATASETS.get(cfg.dataset)(cfg)
    check_heldout(cfg.heldout_classes, len(src.class_names), cfg.dataset)
    stats = src.pixel_stats
    train_id, _ = _by_class(src.train_x, src.train_y, cfg.heldout_classes)
    test_id, heldout = _by_class(src.test_x, src.test_y, cfg.heldout_classes)
    ood: dict[str, Split] = {}
    if len(heldout[1]):
        ood[NEAR_OOD_SET] = _split(heldout, cfg.n_test, stats)
    val = None
    if cfg.val_items:  # carved before any subsampling or training: the base model never sees it
        held = stratified_holdout(train_id[1], cfg.val_items)
        val = Split(to_model_input(train_id[0][held], stats), torch.from_numpy(train_id[1][held]))
        train_id = (train_id[0][~held], train_id[1][~held])
    data = Dataset(cfg.dataset, _split(train_id, cfg.n_train, stats), _split(test_id, cfg.n_test, stats),
                   ood, list(src.class_names), val_id=val)
    for name in far_ood_names(cfg):
        far: DataSource = DATASETS.get(name)(cfg)
        fx = far.ood_x if far.ood_x is not None else far.test_x
        fy = far.ood_y if far.ood_y is not None else far.test_y
        split = _split((fx, fy), cfg.n_test, stats or far.pixel_stats)
        if split.in_shape != data.test_id.in_shape:
            raise BenchError(f"far-OOD dataset {name!r} has inputs of shape {list(split.in_shape)} but "
                             f"{cfg.dataset!r} has {list(data.test_id.in_shape)}; choose matching --set far_ood=")
        set_name = far.ood_name or name
        if set_name in ood:
            raise BenchError(f"far-OOD set name {set_name!r} is used twice; list each dataset once in far_ood")
        ood[set_name] = split
    return data
