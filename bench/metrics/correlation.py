"""Confound diagnostics of an uncertainty score: its Spearman correlation with retrieval correctness
over all queries and averaged within each true class, vectorised so a bootstrap is one call.

A useful score is negatively correlated with correctness (more uncertain, less often right). A score
that correlates overall but not within a class ranks *classes* (e.g. by how far their cluster lies
from the origin), not the queries of a class. The query's class is used here only, never by a score.
"""

from __future__ import annotations

import numpy as np


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; NaN where either side is constant."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def tie_runs(v_sorted: np.ndarray, breaks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(start, end), shaped like v_sorted [..., n]: the first and last position of each position's run of
    equal values along the last axis of sorted v (a run also starts where `breaks` is True)."""
    n = v_sorted.shape[-1]
    first = np.ones(v_sorted.shape, dtype=bool)
    first[..., 1:] = v_sorted[..., 1:] != v_sorted[..., :-1]
    if breaks is not None:
        first |= breaks
    last = np.ones(v_sorted.shape, dtype=bool)
    last[..., :-1] = first[..., 1:]
    pos = np.arange(n)
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=-1)
    end = np.minimum.accumulate(np.where(last, pos, n - 1)[..., ::-1], axis=-1)[..., ::-1]
    return start, end


def _run_mean_ranks(v_sorted: np.ndarray, breaks: np.ndarray | None = None) -> np.ndarray:
    """1-based mean rank of each element's tie run along the last axis of sorted values (a run also
    ends where `breaks` is True: a new class begins), counted from the start of its class."""
    n = v_sorted.shape[-1]
    group_start = np.zeros(v_sorted.shape, dtype=np.int64)
    if breaks is not None:
        group_start = np.maximum.accumulate(np.where(breaks, np.arange(n), 0), axis=-1)
    start, end = tie_runs(v_sorted, breaks)
    return (start + end) / 2.0 + 1.0 - group_start


def _scatter(sorted_vals: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(sorted_vals)
    np.put_along_axis(out, order, sorted_vals, axis=-1)
    return out


def sorted_ranks(
    v: np.ndarray, classes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(order, ranks, within) along the last axis of v [..., n] from one stable float sort: the
    stable order of v (ties by position), the mean ranks of v (ties at their mean rank, as
    scipy.stats.rankdata) and, given integer classes [..., n] (small codes: a radix sort), each
    item's mean rank among the items of its class (None without classes)."""
    order = np.argsort(v, axis=-1, kind="stable")
    vs = np.take_along_axis(v, order, axis=-1)
    ranks = _scatter(_run_mean_ranks(vs), order)
    if classes is None:
        return order, ranks, None
    ys = np.take_along_axis(classes, order, axis=-1)
    o2 = np.argsort(ys, axis=-1, kind="stable")  # by class, then by v (stable)
    order2 = np.take_along_axis(order, o2, axis=-1)
    ys2 = np.take_along_axis(ys, o2, axis=-1)
    breaks = np.zeros(ys2.shape, dtype=bool)
    breaks[..., 0] = True
    breaks[..., 1:] = ys2[..., 1:] != ys2[..., :-1]
    within = _scatter(_run_mean_ranks(np.take_along_axis(vs, o2, axis=-1), breaks), order2)
    return order, ranks, within


def is_binary(c: np.ndarray) -> bool:
    """Ranks of a 0/1 vector are an affine map of it (also within any subset), and a Pearson
    correlation is invariant to affine maps: a binary side needs no ranking."""
    return bool(np.isin(c, (0.0, 1.0)).all())


def class_codes(y: np.ndarray) -> np.ndarray:
    """Labels as codes 0..C-1 in the smallest integer type (int16 for up to 32767 classes: radix sorts)."""
    _, codes = np.unique(np.asarray(y), return_inverse=True)
    codes = codes.reshape(np.shape(y))
    return codes.astype(np.int16) if codes.size == 0 or codes.max() < 2**15 else codes


def within_class_pearson(a: np.ndarray, b: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Mean over classes of the Pearson correlation of a and b within the class (rows [R, n]),
    classes with fewer than 2 items or a constant side skipped; NaN when none is left."""
    rows, n = a.shape
    k = int(codes.max()) + 1 if codes.size else 1
    flat = (codes.astype(np.int64) + (np.arange(rows) * k)[:, None]).ravel()
    s = lambda w: np.bincount(flat, w.ravel(), minlength=rows * k).reshape(rows, k)  # noqa: E731
    count = np.bincount(flat, minlength=rows * k).reshape(rows, k).astype(np.float64)
    return mean_class_pearson(count, s(a), s(b), s(a * b), s(a * a), s(b * b), is_binary(a), is_binary(b))


def mean_class_pearson(
    count: np.ndarray,
    sa: np.ndarray,
    sb: np.ndarray,
    sab: np.ndarray,
    saa: np.ndarray,
    sbb: np.ndarray,
    binary_a: bool = False,
    binary_b: bool = False,
) -> np.ndarray:
    """`within_class_pearson` from the per-class sums [R, K] (count, sum a, sum b, sum ab, sum a^2, sum b^2):
    classes with fewer than 2 items or a (numerically) constant side skipped; NaN when none is left."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ma, mb = sa / count, sb / count
        cov = sab / count - ma * mb
        va, vb = saa / count - ma**2, sbb / count - mb**2
        tol_a = 1e-9 * np.maximum(count, 1.0) ** 2 * (1e-3 if binary_a else 1.0)
        tol_b = 1e-9 * np.maximum(count, 1.0) ** 2 * (1e-3 if binary_b else 1.0)
        ok = (count >= 2) & (va > tol_a) & (vb > tol_b)
        rho = np.where(ok, cov / np.sqrt(np.where(ok, va * vb, 1.0)), np.nan)
        n_ok = ok.sum(1)
        return np.where(n_ok > 0, np.nansum(rho, axis=1) / np.maximum(n_ok, 1), np.nan)


def as_rows(*arrays: np.ndarray, axis: int) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """Arrays moved to [R, n] rows (broadcast to the first one's shape) and the leading shape."""
    first = np.moveaxis(np.asarray(arrays[0]), axis, -1)
    lead, n = first.shape[:-1], first.shape[-1]
    return lead, [
        np.broadcast_to(np.moveaxis(np.asarray(a), axis, -1), first.shape).reshape(-1, n) for a in arrays
    ]


def spearman(u: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho of u and c along `axis`: Pearson of their ranks, ties at their mean rank
    (as scipy.stats.spearmanr); NaN when either is constant."""
    lead, (u, c) = as_rows(np.asarray(u, np.float64), np.asarray(c, np.float64), axis=axis)
    rc = c if is_binary(c) else sorted_ranks(c)[1]
    return pearson_rows(sorted_ranks(u)[1], rc).reshape(lead)


def within_class_spearman(u: np.ndarray, c: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """(1/|C'|) sum_{k in C'} rho_k: the mean over classes k of Spearman's rho of u and c among the
    queries of class k (ties at their mean rank within the class); C' = the classes with a defined
    rho (at least 2 queries, u and c not constant within the class). NaN when C' is empty."""
    lead, (u, c, y) = as_rows(np.asarray(u, np.float64), np.asarray(c, np.float64), np.asarray(y), axis=axis)
    codes = class_codes(y)
    rc = c if is_binary(c) else sorted_ranks(c, codes)[2]
    return within_class_pearson(sorted_ranks(u, codes)[2], rc, codes).reshape(lead)
