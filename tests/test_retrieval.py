"""Retrieval metrics against hand-computed cases and pytorch-metric-learning's AccuracyCalculator."""
import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from bench.metrics.retrieval import map_at_r_per_query, retrieval_per_query


def test_hand_computed_ranking():
    # 1-d embeddings; query 0 (label 0) at 0.0 ranks: 1.0 (label 1), 2.0 (label 0), 3.0 (label 0), 10 (1)
    emb = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    lab = torch.tensor([0, 1, 0, 0, 1])
    pq = retrieval_per_query(emb, lab, ks=(1, 2, 3))
    # query 0: rel = [0, 1, 1], R = 2
    assert pq["mAP@1"][0] == 0.0
    assert pq["mAP@2"][0] == pytest.approx((1 / 2) / 2)  # P(2)=1/2, min(2, R)=2
    assert pq["mAP@3"][0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert pq["Recall@1"][0] == 0.0 and pq["Recall@2"][0] == 1.0
    # query 4 (label 1) at 10: nearest 3.0 (0), 2.0 (0), 1.0 (1); R = 1
    assert pq["mAP@3"][4] == pytest.approx(1 / 3)
    assert pq["Recall@3"][4] == 1.0 and pq["Recall@2"][4] == 0.0


def test_perfect_ranking_scores_one_for_every_k():
    emb = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    lab = torch.tensor([0, 0, 0, 1, 1, 1])
    pq = retrieval_per_query(emb, lab, ks=(1, 2, 5))
    for k in (1, 2, 5):
        # with R = 2, AP@5 normalises by min(5, 2) = 2 and the two hits come first
        assert np.allclose(pq[f"mAP@{k}"], 1.0)


def test_query_without_relevant_items_scores_zero():
    emb = torch.tensor([[0.0], [1.0], [2.0]])
    lab = torch.tensor([0, 1, 1])
    pq = retrieval_per_query(emb, lab, ks=(1, 2))
    assert pq["mAP@2"][0] == 0.0 and pq["Recall@2"][0] == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pml_accuracy_calculator(seed):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, 6, (400,), generator=g)
    emb = torch.randn(400, 3, generator=g) + lab[:, None].float() * 0.7
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                              knn_func=CustomKNN(LpDistance(normalize_embeddings=False)))
    ref = calc.get_accuracy(emb, lab, ref_includes_query=True)
    pq = retrieval_per_query(emb, lab, ks=(1,))
    assert pq["mAP@1"].mean() == pytest.approx(ref["precision_at_1"], abs=1e-9)
    assert map_at_r_per_query(emb, lab).mean() == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-9)


def test_chunking_does_not_change_results():
    from bench.metrics import retrieval

    g = torch.Generator().manual_seed(3)
    lab = torch.randint(0, 4, (300,), generator=g)
    emb = torch.randn(300, 2, generator=g)
    a = retrieval._ranked_relevance(emb, lab, 5, chunk=7)
    b = retrieval._ranked_relevance(emb, lab, 5, chunk=4096)
    assert torch.equal(a, b)
