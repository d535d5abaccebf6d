"""The mined pair multiplicities (`bench.loss.mined_pair_counts`, the training step's and the curvature's
mining) equal the counts of the full triplet mask (`mined_triplets`, the direct transcription of PML's
TripletMarginMiner) exactly, for every miner type, with padding masks and with tied distances."""

import pytest
import torch

from bench.loss import MINER_TYPES, mined_pair_counts, mined_triplets, triplet_pair_counts


@pytest.mark.parametrize("miner_type", MINER_TYPES)
def test_counts_equal_the_full_triplet_mask(miner_type):
    g = torch.Generator().manual_seed(0)
    F = torch.randn(6, 40, 3, generator=g)
    F[:, 5] = F[:, 9]  # duplicate items: tied distances
    y = torch.randint(0, 5, (6, 40), generator=g)
    degenerate = y.clone()
    degenerate[0] = 1  # a batch with one class: no negatives
    degenerate[1] = torch.arange(40)  # every item alone: no positives
    valid = torch.rand(6, 40, generator=g) > 0.2
    for labels in (y, degenerate):
        for v in (None, valid):
            want = triplet_pair_counts(mined_triplets(F, labels, 0.3, miner_type, v), F.dtype)
            got = mined_pair_counts(F, labels, 0.3, miner_type, v)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert want[0][2:].sum() > 0  # something was mined


def test_no_positive_pair_anywhere():
    F, y = torch.randn(2, 5, 2), torch.arange(10).reshape(2, 5)
    cp, cn = mined_pair_counts(F, y, 0.2)
    assert cp.shape == cn.shape == (2, 5, 5) and not cp.any() and not cn.any()
