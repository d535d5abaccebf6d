"""Leave-one-out retrieval metrics on a labelled test set (mAP@K, Recall@K, MAP@R and the seed's
mAP_pml@K), as per-query vectors so a bootstrap over queries needs one kNN search; distances are
measured in the loss's geometry (`bench.loss.retrieval_space`)."""

from __future__ import annotations

import numpy as np
import torch

from bench.loss import retrieval_space

PML_MAP = "mAP_pml"  # name stem of the seed's AP@K (hits-normalised, pytorch-metric-learning <= 1.6.0)


KD_TREE_MAX_DIM = (
    8  # up to this embedding width the exact kNN goes through a k-d tree (scipy), above it brute force
)


def nearest(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    distance: str = "euclidean",
    exclude_self: bool = False,
    chunk: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [N, k], distances [N, k]) of each query's k nearest gallery items in the retrieval
    space, nearest first. exclude_self: the queries are the gallery (query i is gallery item i) and
    never retrieve themselves (leave-one-out). k is capped at the gallery size (minus one).
    Exact either way: a k-d tree for embeddings of width <= KD_TREE_MAX_DIM (the paper's 2-d nets:
    about 20x faster than the full distance matrix), else cdist + topk in chunks of `chunk` queries."""
    q = retrieval_space(query.float(), distance)
    g = retrieval_space(gallery.float(), distance)
    k = min(k, g.shape[0] - (1 if exclude_self else 0))
    if 0 < k and q.shape[1] <= KD_TREE_MAX_DIM and q.device.type == "cpu" and g.device.type == "cpu":
        return _nearest_kd_tree(q, g, k, exclude_self)
    idx = torch.empty(q.shape[0], k, dtype=torch.long)
    dist = torch.empty(q.shape[0], k)
    for s in range(0, q.shape[0], chunk):
        d = torch.cdist(q[s : s + chunk], g)
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + s] = float("inf")  # a query never retrieves itself
        top = torch.topk(d, k, dim=1, largest=False, sorted=True)
        idx[s : s + chunk], dist[s : s + chunk] = top.indices.cpu(), top.values.cpu()
    return idx, dist


def _nearest_kd_tree(
    q: torch.Tensor, g: torch.Tensor, k: int, exclude_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest` through scipy's cKDTree (float64 distances, cast to float32). Leave-one-out asks for k + 1
    and drops each query's own index (or, when duplicates hide it beyond the k + 1, the last column)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(g.numpy().astype(np.float64))
    dist, idx = tree.query(
        q.numpy().astype(np.float64), k=k + int(exclude_self), workers=torch.get_num_threads()
    )
    dist, idx = np.asarray(dist).reshape(len(q), -1), np.asarray(idx).reshape(len(q), -1)
    if exclude_self:
        own = idx == np.arange(len(q))[:, None]
        own[~own.any(axis=1), -1] = True
        keep = ~own
        dist, idx = dist[keep].reshape(len(q), k), idx[keep].reshape(len(q), k)
    return torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(dist.astype(np.float32))


def _ranked_relevance(emb: torch.Tensor, labels: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """rel [N, k]: relevance of each query's k nearest other items (leave-one-out), as float."""
    idx, _ = nearest(emb, emb, k, exclude_self=True, chunk=chunk)
    labels = labels.cpu()
    return (labels[idx] == labels[:, None]).double()


def num_relevant(labels: torch.Tensor) -> torch.Tensor:
    """R_q [N]: items of the query's class among the other N-1 items."""
    _, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return (counts[inv] - 1).double().cpu()


def _ap_from_rel(rel: torch.Tensor, norm: torch.Tensor) -> np.ndarray:
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
    prec = rel.cumsum(1) / ranks
    ap = (prec * rel).sum(1) / norm.clamp(min=1)
    return torch.where(norm > 0, ap, torch.zeros_like(ap)).numpy()


def retrieval_per_query(
    emb: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 3, 5, 7)
) -> dict[str, np.ndarray]:
    """Per-query AP@K, Recall@K and AP_pml@K vectors [N] for each K, named `mAP@K`, `Recall@K` and
    `mAP_pml@K`; emb already in the retrieval space (`retrieval_space`).

    For query q the gallery is every other test item, ranked by Euclidean distance to q;
    rel_q(k) = 1 when the k-th item shares q's label, R_q = relevant items in the gallery and
    P_q(k) = (1/k) sum_{i<=k} rel_q(i):
    * AP@K_q = 1/min(K, R_q) * sum_{k<=K} P_q(k) rel_q(k): normalised by the most hits possible in
      the top K, so a perfect ranking scores 1 for every K (pytorch-metric-learning's
      `mean_average_precision` divides by R_q instead). AP@1 equals precision@1.
    * Recall@K_q = 1 if any of the top K items is relevant, else 0 (the metric-learning Recall@K).
    * AP_pml@K_q = 1/H_q * sum_{k<=K} P_q(k) rel_q(k) with H_q = sum_{k<=K} rel_q(k) the hits in the
      top K, and 0 when H_q = 0: pytorch-metric-learning's `mean_average_precision` up to v1.6.0 (the
      seed's; v1.6.1 divides by R_q). A query with a single hit at rank k scores 1/k, one without hits 0,
      so it rises with K while Recall@K does (the seed's Table 1), and AP_pml@1 = AP@1.
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
    for k in ks:
        kk = min(k, rel.shape[1])
        out[f"{PML_MAP}@{k}"] = _ap_from_rel(rel[:, :kk], rel[:, :kk].sum(1))
    return out


def map_at_r_per_query(emb: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per-query AP@R_q = 1/R_q * sum_{k<=R_q} P_q(k) rel_q(k) [N] (PML's MAP@R), for cross-checks."""
    labels = labels.to(emb.device)
    r = num_relevant(labels)
    rmax = int(r.max().item())
    rel = _ranked_relevance(emb, labels, max(rmax, 1))
    mask = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)[None, :] <= r[:, None]
    return _ap_from_rel(rel * mask, r)
