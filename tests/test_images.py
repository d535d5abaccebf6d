"""The image data layer: the Split API (in memory it is plain slicing of x), ImageSplit's DataLoader
batches (seeded per item: the same under a seed whatever the worker count), the train/test
transforms and channel conforming."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from bench.data import Split
from bench.errors import BenchError
from bench.images import TEST_ITEM, ImageSplit, ImageStore, ImageTransform, conform_channels, item_seeds

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(40, 3, 12, 12), dtype=np.uint8)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _split(workers=0, augments=True, size=8, chunk=7, crop=1.0):
    t = ImageTransform(size, crop, MEAN, STD, 3)
    idx = np.arange(5, 35)
    return ImageSplit(
        ImageStore(IMAGES, "fake"), idx, torch.arange(30), t, workers=workers, chunk=chunk, augments=augments
    )


def _epoch(split, seed):
    batches = list(torch.randperm(len(split), generator=torch.Generator().manual_seed(1)).split(6))
    seeds = [item_seeds(seed, 0, s, len(b)) for s, b in enumerate(batches)]
    return list(split.batches(batches, seeds)), batches


def test_in_memory_split_api_is_plain_slicing():
    x, y = torch.randn(10, 3), torch.arange(10)
    s = Split(x, y)
    idx = torch.tensor([4, 1, 7])
    assert torch.equal(s.inputs(idx), x[idx]) and s.in_memory and not s.augments
    assert [torch.equal(a, x[i]) for a, i in zip(s.batches([idx, idx[:1]]), [idx, idx[:1]])] == [True, True]
    assert len(list(s.chunks())) == 1 and next(s.chunks()) is x
    assert torch.equal(s.take(idx).x, x[idx]) and torch.equal(s.take(idx).y, y[idx])


def test_test_time_inputs_equal_the_written_pipeline():
    s = _split(augments=False, size=8, crop=0.8)
    got = s.inputs(torch.tensor([0, 3]))
    ref = v2.Compose(
        [
            v2.Resize(10, antialias=True),
            v2.CenterCrop(8),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(MEAN), list(STD)),
        ]
    )
    want = torch.stack([ref(torch.from_numpy(IMAGES[i])) for i in (5, 8)])
    assert got.shape == (2, 3, 8, 8) and torch.allclose(got, want)
    # by hand for a resize to the stored size: (x / 255 - mean) / std
    full = _split(augments=False, size=12).inputs(torch.tensor([0]))[0]
    hand = (torch.from_numpy(IMAGES[5]).float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(
        STD
    )[:, None, None]
    assert torch.allclose(full, hand, atol=1e-6)


def test_augmented_batches_are_seeded_and_independent_of_workers():
    a, idx = _epoch(_split(workers=0), seed=3)
    b, _ = _epoch(_split(workers=2), seed=3)
    c, _ = _epoch(_split(workers=0), seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a, b)), "same seed, different worker counts: same batches"
    assert not all(torch.equal(p, q) for p, q in zip(a, c)), "another seed: other crops"
    test = list(_split(workers=0).batches(idx))  # no seeds: the deterministic test transform
    assert not all(torch.equal(p, q) for p, q in zip(a, test))
    state = torch.random.get_rng_state()
    _epoch(_split(workers=0), seed=3)
    assert torch.equal(state, torch.random.get_rng_state()), "batches leave the global RNG alone"


def test_a_split_without_augmentation_ignores_seeds_and_chunks_cover_every_item():
    s = _split(augments=False, chunk=7)
    idx = [torch.arange(6)]
    assert torch.equal(next(s.batches(idx, [item_seeds(0, 0, 0, 6)])), next(s.batches(idx)))
    chunks = list(s.chunks())
    assert [len(c) for c in chunks] == [7, 7, 7, 7, 2]
    assert torch.equal(torch.cat(chunks), s.inputs(torch.arange(30)))
    sub = s.subset(10)
    assert len(sub) == 10 and torch.equal(
        sub.inputs(torch.arange(10)), s.inputs(torch.as_tensor(np.flatnonzero(np.isin(s.index, sub.index))))
    )
    with pytest.raises(BenchError, match="split.inputs"):
        s.x  # noqa: B018


def test_item_seeds_are_distinct_across_items_steps_and_epochs():
    seeds = torch.cat([item_seeds(0, e, s, 64) for e in range(3) for s in range(50)])
    assert len(torch.unique(seeds)) == len(seeds)
    assert torch.equal(item_seeds(5, 1, 2, 4), item_seeds(5, 1, 2, 4))


def test_conform_channels():
    grey = torch.randint(0, 256, (1, 4, 4), dtype=torch.uint8)
    assert torch.equal(conform_channels(grey, 3), grey.expand(3, 4, 4))
    rgb = torch.tensor([10, 20, 40], dtype=torch.uint8)[:, None, None].expand(3, 2, 2)
    assert conform_channels(rgb, 1).flatten().tolist() == [23] * 4
    with pytest.raises(BenchError, match="channels"):
        conform_channels(rgb, 2)
    assert TEST_ITEM < 0
