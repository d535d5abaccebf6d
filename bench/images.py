"""Images that stay uint8 (an array or files on disk) and become model inputs batch by batch: a
`torch.utils.data.DataLoader` with workers runs torchvision v2 transforms per item.

Determinism: every item of a batch carries its own seed (`item_seeds`), and its random transform
runs under `torch.manual_seed(that seed)` (the global RNG forked, so nothing leaks), so a given seed
gives the same batches whatever the number of workers and whichever worker makes the item.
Test-time items (seed -1) are deterministic: resize to round(size / crop_fraction), centre crop.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import v2

from bench.errors import BenchError
from bench.splits import Split

TEST_ITEM = -1  # the seed of an item that gets the deterministic test-time transform


@dataclass(frozen=True)
class ImageTransform:
    """How a stored uint8 image [C, H, W] becomes a model input [channels, size, size] (float32):

    test:  Resize(round(size / crop_fraction)) -> CenterCrop(size)
    train: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) -> RandomHorizontalFlip(0.5)
    both:  channels replicated (grey -> colour) or averaged (colour -> grey) to `channels`, then
           x / 255, standardised per channel with (mean, std).
    """

    size: int
    crop_fraction: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int

    def pipeline(self, train: bool) -> v2.Compose:
        geo = (
            [v2.RandomResizedCrop(self.size, antialias=True), v2.RandomHorizontalFlip()]
            if train
            else [v2.Resize(round(self.size / self.crop_fraction), antialias=True), v2.CenterCrop(self.size)]
        )
        return v2.Compose(
            [
                *geo,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self._per_channel(self.mean)), list(self._per_channel(self.std))),
            ]
        )

    def _per_channel(self, v: tuple[float, ...]) -> tuple[float, ...]:
        return v * self.channels if len(v) == 1 else v

    def spec(self) -> dict:
        """JSON-safe description (part of feature-cache keys)."""
        return asdict(self)


def conform_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [C, H, W] (or [N, C, H, W]) with `channels` channels: 1 -> C by replication, C -> 1 by
    the rounded channel mean; equal counts pass unchanged; anything else is a BenchError."""
    c = img.shape[-3]
    if c == channels:
        return img
    if c == 1:
        return img.expand(*img.shape[:-3], channels, *img.shape[-2:]).contiguous()
    if channels == 1:
        return img.float().mean(-3, keepdim=True).round().to(torch.uint8)
    raise BenchError(f"cannot turn images of {c} channels into {channels} channels")


class ImageStore:
    """N stored images: a uint8 array [N, C, H, W] (or [N, H, W]) in memory, or N file paths
    (JPEG/PNG, decoded as RGB when read). `fingerprint` names the content (cache keys);
    `swap_red_blue`: the stored images are BGR, so every read reverses the channel order."""

    def __init__(self, images: np.ndarray, fingerprint: str, swap_red_blue: bool = False) -> None:
        if images.dtype == np.uint8 and images.ndim == 3:
            images = images[:, None]
        if not (images.dtype == np.uint8 and images.ndim == 4) and images.dtype.kind not in "UO":
            raise BenchError(
                f"images must be uint8 [N, C, H, W] or file paths, got {images.dtype} {images.shape}"
            )
        self.images, self.fingerprint, self.swap_red_blue = images, fingerprint, bool(swap_red_blue)
        self.is_files = images.dtype.kind in "UO"

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        """Channels of a stored image (files decode as RGB: 3)."""
        return 3 if self.is_files else int(self.images.shape[1])

    def get(self, i: int) -> torch.Tensor:
        """Image i as uint8 [C, H, W] (RGB: channels reversed when stored as BGR)."""
        if not self.is_files:
            img = np.array(self.images[i])  # a copy: stored arrays may be read-only
            if self.swap_red_blue and img.ndim == 3:
                img = np.ascontiguousarray(img[::-1])
            return torch.from_numpy(img)
        from PIL import Image

        path = str(self.images[i])
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
        except OSError as e:
            raise BenchError(f"cannot read image {path}: {e}") from None
        return torch.from_numpy((arr[::-1] if self.swap_red_blue else arr).copy())


class _Items(TorchDataset):
    """Keys (store index, seed) -> transformed image; seed TEST_ITEM: the test-time transform."""

    def __init__(self, store: ImageStore, transform: ImageTransform) -> None:
        self.store, self.transform = store, transform
        self.test, self.train = transform.pipeline(False), transform.pipeline(True)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        i, seed = key
        img = conform_channels(self.store.get(int(i)), self.transform.channels)
        if seed == TEST_ITEM:
            return self.test(img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.train(img)


def item_seeds(seed: int, epoch: int, step: int, n: int) -> torch.Tensor:
    """Seeds [n] of the n items of batch `step` of `epoch` in the stream of `seed` (distinct per
    item; from numpy's SeedSequence((seed, epoch, step)), so streams of nearby seeds do not overlap)."""
    base = int(
        np.random.SeedSequence([int(seed), int(epoch), int(step)]).generate_state(1, dtype=np.uint32)[0]
    )
    return base * 65_536 + torch.arange(n, dtype=torch.int64)


class ImageSplit(Split):
    """A Split whose model inputs are made on demand from stored uint8 images: items `index` of
    `store`, labels y, transformed by `transform` (random train-time transforms when `augments`
    and a batch comes with seeds), fed by a DataLoader with `workers` processes in batches of at most
    `chunk` images when the whole split is read (`chunks`)."""

    def __init__(
        self,
        store: ImageStore,
        index: np.ndarray,
        y: torch.Tensor,
        transform: ImageTransform,
        workers: int = 0,
        chunk: int = 256,
        augments: bool = False,
    ) -> None:
        self.store, self.index, self.y, self.transform = (
            store,
            np.asarray(index, dtype=np.int64),
            y,
            transform,
        )
        self.workers, self.chunk, self.augments = int(workers), int(chunk), bool(augments)
        self._items = _Items(store, transform)

    @property
    def x(self) -> torch.Tensor:  # type: ignore[override]
        raise BenchError(
            "this split's images are read in batches: use split.inputs(idx), split.batches(...) "
            "or split.chunks(), not split.x"
        )

    @property
    def in_memory(self) -> bool:
        return False

    @property
    def in_shape(self) -> tuple[int, ...]:
        t = self.transform
        return (t.channels, t.size, t.size)

    def take(self, idx: torch.Tensor) -> "ImageSplit":
        i = torch.as_tensor(idx).cpu().numpy()
        return ImageSplit(
            self.store,
            self.index[i],
            self.y[torch.as_tensor(i)],
            self.transform,
            self.workers,
            self.chunk,
            self.augments,
        )

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.store.fingerprint.encode())
        h.update(np.ascontiguousarray(self.index).tobytes())
        h.update(json.dumps(self.transform.spec(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def batches(
        self, index_batches: Iterable[torch.Tensor], seeds: Iterable[torch.Tensor | None] | None = None
    ) -> Iterator[torch.Tensor]:
        keys = []
        seed_iter = iter(seeds) if seeds is not None and self.augments else None
        for idx in index_batches:
            s = next(seed_iter) if seed_iter is not None else None
            pos = self.index[torch.as_tensor(idx).cpu().numpy()]
            sv = [TEST_ITEM] * len(pos) if s is None else torch.as_tensor(s).tolist()
            keys.append([(int(p), int(q)) for p, q in zip(pos, sv)])
        if not keys:
            return iter(())
        # a daemonic process (a grid's local-pool worker) cannot start DataLoader workers: load inline
        workers = 0 if multiprocessing.current_process().daemon else self.workers
        loader = DataLoader(
            self._items,
            batch_sampler=keys,
            num_workers=workers,
            generator=torch.Generator().manual_seed(0),
        )  # never draws from the global RNG
        return iter(loader)

    def chunks(self) -> Iterator[torch.Tensor]:
        n = len(self)
        return self.batches(torch.arange(i, min(i + self.chunk, n)) for i in range(0, n, self.chunk))
