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
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
    )
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


def test_pml_map_hand_computed_and_rises_with_k():
    """AP_pml@K divides by the hits in the top K (the seed's definition): query 0 of the hand case has
    rel = [0, 1, 1] so AP_pml@2 = (1/2) / 1 and AP_pml@3 = (1/2 + 2/3) / 2; no hit scores 0."""
    emb = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    lab = torch.tensor([0, 1, 0, 0, 1])
    pq = retrieval_per_query(emb, lab, ks=(1, 2, 3))
    assert pq["mAP_pml@1"][0] == 0.0
    assert pq["mAP_pml@2"][0] == pytest.approx(1 / 2)
    assert pq["mAP_pml@3"][0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert pq["mAP_pml@2"][4] == 0.0 and pq["mAP_pml@3"][4] == pytest.approx(1 / 3)  # one hit at rank 3
    assert np.array_equal(pq["mAP_pml@1"], pq["mAP@1"])


def _pml_calc(k: int) -> AccuracyCalculator:
    return AccuracyCalculator(
        include=("mean_average_precision",), k=k, knn_func=CustomKNN(LpDistance(normalize_embeddings=False))
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_pml_map_against_accuracy_calculator(seed):
    """Against the installed AccuracyCalculator (v2.x divides by R_q): the seed's numerator over R_q
    is its mean_average_precision; and per query, with the gallery cut to the query's own top K
    (so that R_q = its hits), AccuracyCalculator computes the seed's AP_pml@K itself (a query without
    hits is 'lone' there, NaN, and 0 here)."""
    g = torch.Generator().manual_seed(seed)
    n, K = 60, 5
    lab = torch.randint(0, 4, (n,), generator=g)
    emb = torch.randn(n, 2, generator=g) + lab[:, None].float() * 0.5
    pq = retrieval_per_query(emb, lab, ks=(K,))
    d = torch.cdist(emb, emb)
    d.fill_diagonal_(float("inf"))
    top = d.topk(K, largest=False).indices  # [n, K]
    hits = (lab[top] == lab[:, None]).sum(1).double().numpy()
    R = np.array([(lab == lab[i]).sum().item() - 1 for i in range(n)], dtype=float)
    ref = _pml_calc(K).get_accuracy(emb, lab, ref_includes_query=True)["mean_average_precision"]
    assert float(np.mean(pq[f"mAP_pml@{K}"] * hits / R)) == pytest.approx(ref, abs=1e-9)
    for q in range(n):
        if hits[q] == 0:
            assert pq[f"mAP_pml@{K}"][q] == 0.0
            continue
        got = _pml_calc(K).get_accuracy(
            emb[q : q + 1], lab[q : q + 1], emb[top[q]], lab[top[q]], ref_includes_query=False
        )["mean_average_precision"]
        assert pq[f"mAP_pml@{K}"][q] == pytest.approx(got, abs=1e-9)


def test_retrieval_space():
    from bench.errors import BenchError
    from bench.loss import retrieval_space

    e = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    assert torch.equal(retrieval_space(e, "euclidean"), e)
    assert torch.allclose(retrieval_space(e, "cosine"), torch.tensor([[0.6, 0.8], [0.0, -1.0]]))
    # cosine retrieval ignores each embedding's norm
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 3, (80,), generator=g)
    emb = torch.randn(80, 2, generator=g) + lab[:, None].float()
    scaled = emb * torch.rand(80, 1, generator=g).add(0.1) * 10
    a = retrieval_per_query(retrieval_space(emb, "cosine"), lab, ks=(3,))
    b = retrieval_per_query(retrieval_space(scaled, "cosine"), lab, ks=(3,))
    assert all(np.allclose(a[k], b[k]) for k in a)
    with pytest.raises(BenchError, match="distance"):
        retrieval_space(e, "manhattan")


@pytest.mark.parametrize("loo", [False, True])
def test_kd_tree_knn_equals_brute_force(loo, monkeypatch):
    """The k-d tree path of `nearest` (width <= KD_TREE_MAX_DIM) finds the k nearest at the distances of
    a float64 brute force, as the cdist + topk path does (float32 cdist: to 1e-4), never a query itself
    under leave-one-out, duplicates included."""
    from bench.metrics import retrieval as R

    g = torch.Generator().manual_seed(3)
    q = torch.randn(400, 2, generator=g)
    q[200:210] = q[100]  # duplicates: ties at distance 0
    gal = q if loo else torch.randn(300, 2, generator=g)
    exact = torch.cdist(q.double(), gal.double())
    if loo:
        exact.fill_diagonal_(float("inf"))
    ref = exact.topk(7, dim=1, largest=False).values.float()
    i_kd, d_kd = R.nearest(q, gal, 7, exclude_self=loo)
    monkeypatch.setattr(R, "KD_TREE_MAX_DIM", 0)
    i_bf, d_bf = R.nearest(q, gal, 7, exclude_self=loo)
    torch.testing.assert_close(d_kd, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        exact.gather(1, i_kd).float(), ref, atol=1e-6, rtol=0
    )  # the indices are the nearest
    torch.testing.assert_close(d_bf, ref, atol=1e-4, rtol=0)
    if loo:
        assert not (i_kd == torch.arange(len(q))[:, None]).any()
