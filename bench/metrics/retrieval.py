"""Leave-one-out retrieval metrics on a labelled test set (mAP@K, Recall@K, MAP@R), as per-query
vectors so a bootstrap over queries needs one kNN search."""
from __future__ import annotations

import numpy as np
import torch


def _ranked_relevance(emb: torch.Tensor, labels: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """rel [N, k]: relevance of each query's k nearest other items (leave-one-out), as float."""
    n = emb.shape[0]
    k = min(k, n - 1)
    out = torch.empty(n, k, dtype=torch.float64)
    emb = emb.float()
    for s in range(0, n, chunk):
        d = torch.cdist(emb[s:s + chunk], emb)
        rows = torch.arange(d.shape[0])
        d[rows, rows + s] = float("inf")  # a query never retrieves itself
        idx = torch.topk(d, k, dim=1, largest=False, sorted=True).indices
        out[s:s + chunk] = (labels[idx] == labels[s:s + chunk, None]).double().cpu()
    return out


def num_relevant(labels: torch.Tensor) -> torch.Tensor:
    """R_q [N]: items of the query's class among the other N-1 items."""
    _, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return (counts[inv] - 1).double().cpu()


def _ap_from_rel(rel: torch.Tensor, norm: torch.Tensor) -> np.ndarray:
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
    prec = rel.cumsum(1) / ranks
    ap = (prec * rel).sum(1) / norm.clamp(min=1)
    return torch.where(norm > 0, ap, torch.zeros_like(ap)).numpy()


def retrieval_per_query(emb: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 3, 5, 7)) -> dict[str, np.ndarray]:
    """Per-query AP@K and Recall@K vectors [N] for each K, named `mAP@K` and `Recall@K`.

    For query q the gallery is every other test item, ranked by Euclidean distance to q;
    rel_q(k) = 1 when the k-th item shares q's label, R_q = relevant items in the gallery and
    P_q(k) = (1/k) sum_{i<=k} rel_q(i):
    * AP@K_q = 1/min(K, R_q) * sum_{k<=K} P_q(k) rel_q(k): normalised by the most hits possible in
      the top K, so a perfect ranking scores 1 for every K (pytorch-metric-learning's
      `mean_average_precision` divides by R_q instead). AP@1 equals precision@1.
    * Recall@K_q = 1 if any of the top K items is relevant, else 0 (the metric-learning Recall@K).
    Queries with R_q = 0 score 0. One kNN search (to the largest K) serves every K.
    """
    labels = labels.to(emb.device)
    kmax = max(ks)
    rel = _ranked_relevance(emb, labels, kmax)
    r = num_relevant(labels)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        kk = min(k, rel.shape[1])
        out[f"mAP@{k}"] = _ap_from_rel(rel[:, :kk], torch.minimum(r, torch.tensor(float(k))))
    for k in ks:
        kk = min(k, rel.shape[1])
        out[f"Recall@{k}"] = (rel[:, :kk].sum(1) > 0).double().numpy()
    return out


def map_at_r_per_query(emb: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per-query AP@R_q = 1/R_q * sum_{k<=R_q} P_q(k) rel_q(k) [N] (PML's MAP@R), for cross-checks."""
    labels = labels.to(emb.device)
    r = num_relevant(labels)
    rmax = int(r.max().item())
    rel = _ranked_relevance(emb, labels, max(rmax, 1))
    mask = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)[None, :] <= r[:, None]
    return _ap_from_rel(rel * mask, r)
