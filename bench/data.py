"""Data types and the protocol that turns a data source into a benchmark: ID/OOD split by class,
subsampling, far-OOD sets from the dataset registry, and the one place images are normalised.

A dataset plugin (`datasets/`) only reads files: it returns a `DataSource` (raw train/test arrays,
class names, pixel statistics). `load_benchmark(cfg)` does the rest the same way for every source.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from bench.conventions import NEAR_OOD_SET
from bench.errors import BenchError
from bench.registry import DATASETS
from bench.splits import DATA_SEED, Dataset, Split, subset_indices  # noqa: F401  (the data types, re-exported)


@dataclass
class DataSource:
    """What a dataset plugin returns: raw arrays as stored, before any protocol is applied.

    Images are uint8 [N, H, W] or [N, C, H, W], or file paths (a str array [N]: JPEG/PNG decoded as
    RGB); feature data is float [N, F] and passes unchanged.
    pixel_stats: (mean, std) of the training pixels in [0, 1], scalars or one per channel, used to
    standardise images (also the far-OOD images shown to a model trained on this source). ood_name
    names the set when the source serves as far-OOD data; ood_x/ood_y (default: the test arrays)
    are the images used then. label: how results name the data as read (e.g. "CIFAR-10 (JPEG)").
    checksum: names the stored content in cache keys (default: a hash of the arrays).
    seen_classes: the zero-shot protocol's training classes 0..seen_classes-1 (default: the first
    half). split_by_class: train and test hold disjoint classes (the source's own zero-shot split).
    swap_red_blue: the stored images have red and blue swapped (e.g. written as BGR); every read
    reverses the channels (`bench.images.ImageStore`).
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]
    pixel_stats: tuple | None = None
    ood_name: str | None = None
    ood_x: np.ndarray | None = None
    ood_y: np.ndarray | None = None
    label: str | None = None
    checksum: str | None = None
    seen_classes: int | None = None
    split_by_class: bool = False
    swap_red_blue: bool = False


def is_images(x: np.ndarray) -> bool:
    """uint8 image arrays and file paths are images; float arrays are features."""
    return x.dtype == np.uint8 or x.dtype.kind in "UO"


def to_model_input(x: np.ndarray, pixel_stats: tuple | None) -> torch.Tensor:
    """The one place inputs are normalised: uint8 images -> float32 [N, C, H, W] in [0, 1],
    standardised with pixel_stats (scalars, or one (mean, std) per channel); float feature arrays ->
    float32 as they are."""
    if x.dtype == np.uint8:
        if pixel_stats is None:
            raise BenchError("image data needs pixel statistics (mean, std) to be normalised")
        mean, std = pixel_stats
        img = x[:, None] if x.ndim == 3 else x
        if isinstance(mean, (tuple, list)):
            mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
            std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
        return torch.from_numpy(np.ascontiguousarray((img.astype(np.float32) / 255.0 - mean) / std))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def conform_images(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 images [N, (C,) h, w] as uint8 [N, *shape] for shape (C, H, W): channels replicated
    (grey -> colour) or averaged (colour -> grey), then resized (bilinear, antialiased). The one
    place a far-OOD image set is made to look like the ID images, e.g. MNIST 1x28x28 -> 3x32x32."""
    from torchvision.transforms.v2 import functional as TF

    from bench.images import conform_channels

    img = torch.from_numpy(np.ascontiguousarray(x[:, None] if x.ndim == 3 else x))
    img = conform_channels(img, shape[0])
    if tuple(img.shape[-2:]) != tuple(shape[1:]):
        img = TF.resize(img, list(shape[1:]), antialias=True)
    return img.numpy()


def check_heldout(heldout: tuple[int, ...], n_classes: int, dataset: str) -> None:
    """Held-out classes must exist and leave at least two classes for training."""
    bad = [c for c in heldout if not 0 <= c < n_classes]
    if bad:
        raise BenchError(f"heldout classes {bad} are outside {dataset}'s classes 0..{n_classes - 1}")
    if n_classes - len(set(heldout)) < 2:
        raise BenchError(f"heldout classes leave fewer than 2 training classes of {dataset}'s {n_classes}")


PROTOCOLS = ("closed", "zero_shot")


def protocol_indices(src: DataSource, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(train items, test items, near-OOD test items or None) of the protocol, as indices into
    src.train_x / src.test_x.

    closed: train and retrieve on the classes not in cfg.heldout_classes; the held-out classes'
    test images are the near-OOD set. zero_shot: train on classes 0..S-1 (S = src.seen_classes,
    default half of the classes) and retrieve among the test images of the unseen classes S..C-1
    (leave-one-out); no held-out set (near-OOD comes from other datasets, cfg.far_ood)."""
    n_classes = len(src.class_names)
    if cfg.protocol == "zero_shot":
        seen = src.seen_classes or n_classes // 2
        if not 2 <= seen <= n_classes - 2:
            raise BenchError(
                f"zero_shot needs at least 2 seen and 2 unseen classes; {src.name} has {n_classes}"
            )
        return np.flatnonzero(src.train_y < seen), np.flatnonzero(src.test_y >= seen), None
    if src.split_by_class:
        raise BenchError(
            f"{src.name}'s train and test images hold disjoint classes (its standard zero-shot "
            "split); use --set protocol=zero_shot"
        )
    check_heldout(cfg.heldout_classes, n_classes, cfg.dataset)
    held = np.asarray(cfg.heldout_classes, dtype=src.train_y.dtype)
    train_out, test_out = np.isin(src.train_y, held), np.isin(src.test_y, held)
    return np.flatnonzero(~train_out), np.flatnonzero(~test_out), np.flatnonzero(test_out)


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
    """The far-OOD datasets of a run: cfg.far_ood, else the ID dataset's registered default (a
    tuple, or a function of the config, e.g. SVHN when its files are there, else MNIST/Fashion)."""
    if cfg.far_ood is not None:
        return tuple(cfg.far_ood)
    default = DATASETS.meta(cfg.dataset).get("far_ood", ())
    return tuple(default(cfg) if callable(default) else default)


def input_stats(cfg, src: DataSource) -> tuple | None:
    """Pixel statistics that standardise the run's images: the backbone's own when it declares
    them (pretrained weights expect their training's normalisation), else the ID source's."""
    from bench.registry import BACKBONES

    own = BACKBONES.meta(cfg.backbone).get("pixel_stats")
    own = own(cfg) if callable(own) else own
    return own or src.pixel_stats


class _SplitMaker:
    """Turns (array, indices) of a source into Splits: in memory (float tensors, as today) for
    features and for images at their stored size without augmentation; else `ImageSplit`s that
    keep the uint8 images (or paths) and transform them batch by batch."""

    def __init__(self, cfg, src: DataSource, stats: tuple | None) -> None:
        self.cfg, self.stats = cfg, stats
        images = is_images(src.train_x)
        self.lazy = images and (cfg.image_size is not None or cfg.augment or src.train_x.dtype.kind in "UO")
        if self.lazy and cfg.image_size is None and src.train_x.dtype.kind in "UO":
            raise BenchError(
                f"{src.name}'s images are files of different sizes: choose an input size, "
                "e.g. --set image_size=224"
            )
        if cfg.augment and not images:
            raise BenchError(f"augment needs image data; {src.name} holds feature vectors")
        self.transform = None
        if self.lazy:
            from bench.images import ImageTransform

            x = src.train_x
            channels = 3 if x.dtype.kind in "UO" else (1 if x.ndim == 3 else int(x.shape[1]))
            size = cfg.image_size or int(x.shape[-1])
            mean, std = stats if stats is not None else ((0.5,), (0.5,))
            per = lambda v: tuple(float(a) for a in v) if isinstance(v, (tuple, list)) else (float(v),)  # noqa: E731
            self.transform = ImageTransform(size, cfg.crop_fraction, per(mean), per(std), channels)

    def split(
        self,
        x: np.ndarray,
        y: np.ndarray,
        idx: np.ndarray,
        n: int | None,
        fingerprint: str,
        stats: tuple | None = None,
        augments: bool = False,
        swap_red_blue: bool = False,
    ) -> Split:
        """A seeded subset of n of the items idx of (x, y), normalised (labels as int64); swap_red_blue:
        the stored images are BGR (reversed on read)."""
        sub = subset_indices(len(idx), n)
        if sub is not None:
            idx = idx[sub.numpy()]
        labels = torch.from_numpy(y[idx].astype(np.int64))
        if not self.lazy:
            xi = x[idx][:, ::-1] if swap_red_blue and x.ndim == 4 else x[idx]
            return Split(to_model_input(xi, stats or self.stats), labels)
        from bench.images import ImageSplit, ImageStore

        cfg = self.cfg
        return ImageSplit(
            ImageStore(x, fingerprint, swap_red_blue),
            idx,
            labels,
            self.transform,
            cfg.data_workers,
            cfg.image_chunk,
            augments=augments,
        )


def _fingerprint(src: DataSource, part: str, x: np.ndarray) -> str:
    """Names stored images in cache keys: the source's checksum (or a hash of the array) and the part."""
    if src.checksum is not None:
        base = src.checksum
    elif x.dtype.kind in "UO":
        base = hashlib.sha256("\n".join(map(str, x)).encode()).hexdigest()
    else:
        base = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
    return f"{src.name}:{part}:{base[:16]}"


def load_benchmark(cfg) -> Dataset:
    """The run's data: cfg.dataset split by cfg.protocol (`protocol_indices`) into ID train/test
    and, for the closed protocol, the held-out classes (near-OOD "heldout"), plus the test images
    of every far-OOD dataset, each test split subsampled to cfg.n_test and the training split to
    cfg.n_train, all images standardised with one set of pixel statistics (`input_stats`; a
    far-OOD image is shown to the model like any unseen image, made to the ID images' shape by
    `conform_images` when it differs)."""
    for name in (cfg.dataset, *far_ood_names(cfg)):
        DATASETS.get(name)  # unknown names fail before any file is read
    src: DataSource = DATASETS.get(cfg.dataset)(cfg)
    train_idx, test_idx, near_idx = protocol_indices(src, cfg)
    make = _SplitMaker(cfg, src, input_stats(cfg, src))
    fp_train = _fingerprint(src, "train", src.train_x) if make.lazy else ""
    fp_test = _fingerprint(src, "test", src.test_x) if make.lazy else ""
    ood: dict[str, Split] = {}
    if near_idx is not None and len(near_idx):
        ood[NEAR_OOD_SET] = make.split(
            src.test_x, src.test_y, near_idx, cfg.n_test, fp_test, swap_red_blue=src.swap_red_blue
        )
    val = None
    from bench.splits import default_val_items

    n_val = default_val_items(cfg, len(train_idx))  # val_items, or recipe=tuned's default amount
    if n_val:  # carved before any subsampling or training: the base model never sees it
        held = stratified_holdout(src.train_y[train_idx], n_val)
        val = make.split(
            src.train_x, src.train_y, train_idx[held], None, fp_train, swap_red_blue=src.swap_red_blue
        )
        train_idx = train_idx[~held]
    swap = src.swap_red_blue
    data = Dataset(
        cfg.dataset,
        make.split(
            src.train_x,
            src.train_y,
            train_idx,
            cfg.n_train,
            fp_train,
            augments=cfg.augment,
            swap_red_blue=swap,
        ),
        make.split(src.test_x, src.test_y, test_idx, cfg.n_test, fp_test, swap_red_blue=swap),
        ood,
        list(src.class_names),
        val_id=val,
        label=src.label or src.name,
    )
    id_shape = data.test_id.in_shape
    for name in far_ood_names(cfg):
        far: DataSource = DATASETS.get(name)(cfg)
        fx = far.ood_x if far.ood_x is not None else far.test_x
        fy = far.ood_y if far.ood_y is not None else far.test_y
        if is_images(fx) and is_images(src.train_x) and not make.lazy and fx.dtype == np.uint8:
            stored = fx.shape[1:] if fx.ndim == 4 else (1, *fx.shape[1:])
            if tuple(stored) != id_shape:
                fx = conform_images(fx, id_shape)
        if make.lazy and not is_images(fx):
            raise BenchError(
                f"far-OOD dataset {name!r} holds feature vectors but {cfg.dataset!r} holds images; "
                "choose matching --set far_ood="
            )
        fp = _fingerprint(far, "ood", fx) if make.lazy else ""
        split = make.split(
            fx,
            fy,
            np.arange(len(fy)),
            cfg.n_test,
            fp,
            stats=make.stats or far.pixel_stats,
            swap_red_blue=far.swap_red_blue,
        )
        if split.in_shape != id_shape:
            raise BenchError(
                f"far-OOD dataset {name!r} has inputs of shape {list(split.in_shape)} but "
                f"{cfg.dataset!r} has {list(id_shape)}; choose matching --set far_ood="
            )
        set_name = far.ood_name or name
        if set_name in ood:
            raise BenchError(
                f"far-OOD set name {set_name!r} is used twice; list each dataset once in far_ood"
            )
        ood[set_name] = split
    return data
