"""Selective retrieval: answer only the queries the uncertainty score is surest of, abstain on the rest.
The risk-coverage curve, AURC and E-AURC (Geifman & El-Yaniv), AUGRC (Traub et al. 2024) and the
selective risk at fixed coverages, with bootstrap CIs over queries (docs/selective-risk.md).

Definitions, for N queries with uncertainty u (larger = less sure) and a per-query loss l in [0, 1]
(1 - precision@1, the retrieval error; or 1 - AP@K). Accept the k queries of smallest u (coverage
k/N), k = 1..N:
* selective risk  r_k = (1/k) sum_{i <= k} l_(i)          (the risk-coverage curve, at coverage k/N)
* generalised risk g_k = (1/N) sum_{i <= k} l_(i)          (accepted AND wrong, over all N queries)
* AURC   = (1/N) sum_k r_k       (the mean of the curve: Geifman & El-Yaniv's discretisation)
* E-AURC = AURC - AURC*, AURC* the AURC of the oracle order (losses ascending): what the score's
  ordering costs, with the error rate itself taken out
* AUGRC  = (1/N) sum_k g_k
* Risk@cCov = r_{k_c}, k_c = ceil(c N) (the smallest k whose coverage reaches c), c = 0.8, 0.9, 0.95.

Ties. Queries with equal u cannot be told apart by the score, so no order among them is right: every
value here is the expectation over all orders of tied queries (a random tie-break). Within a tie run
the expected cumulative loss grows linearly, by the run's mean loss per position, so the expectation
is exact and O(N): sum_k g_k and sum_k r_k over a run have closed forms (the latter through the
digamma function). The result does not depend on the order of the input, and a bootstrap resample,
where repeated queries are ties, is scored by the same rule (`SelectiveSort.weighted` equals the
statistic of the expanded resample exactly).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import digamma

from bench.metrics.bootstrap import count_bootstrap_ci
from bench.metrics.correlation import tie_runs
from bench.metrics.weighted import cumsum_rows

COVERAGES = (0.8, 0.9, 0.95)
AREA_METRICS = ("AURC", "E-AURC", "AUGRC")


def coverage_metric(c: float) -> str:
    """0.9 -> `Risk@90Cov` (TorchUncertainty's name for the selective risk at 90% coverage)."""
    return f"Risk@{round(100 * c):d}Cov"


SELECTIVE_METRICS = (*AREA_METRICS, *(coverage_metric(c) for c in COVERAGES))


def loss_suffix(loss: str) -> str:
    """The name suffix of a loss: '' for the headline loss (1 - precision@1), `(mAP@K)` for 1 - AP@K."""
    return "" if loss in ("", "mAP@1") else f"({loss})"


def selective_metric_names(losses: list[str]) -> list[str]:
    """`AURC`, `E-AURC`, `AUGRC`, `Risk@80Cov`, ... for each loss (suffixed by `loss_suffix`), in order."""
    return [f"{m}{loss_suffix(loss)}" for loss in losses for m in SELECTIVE_METRICS]


def coverage_count(n: int, c: float) -> int:
    """k_c = ceil(c n), at least 1: the number of accepted queries at coverage c (1e-9 guards against
    products like 0.9 * 150 = 135.00000000000003 rounding up a whole query)."""
    return max(1, min(n, math.ceil(c * n - 1e-9)))


class _Order:
    """Items sorted once by a key (ascending, stable) with their tie runs: one position per run
    (`first`, `last`) in sorted order."""

    def __init__(self, key: np.ndarray) -> None:
        self.order = np.argsort(key, kind="stable")
        start, end = tie_runs(key[self.order])
        self.first = np.flatnonzero(start == np.arange(key.shape[0]))
        self.last = end[self.first]


class _Runs:
    """Tie runs of rows of weights ws [B, n] in an order's sorted order: positions before each run Wb
    and its weight Wr, each [B, runs], and the harmonic sums of its positions (shared by every loss)."""

    def __init__(self, ws: np.ndarray, o: _Order) -> None:
        self.o = o
        self.Wr = np.add.reduceat(ws, o.first, axis=-1)
        self.Wb = cumsum_rows(self.Wr) - self.Wr
        self.ws = ws
        self._harmonic: np.ndarray | None = None

    def loss(self, ls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Lb, m) [B, runs] of losses ls [n] (sorted order): the loss before each run, its mean loss."""
        Lr = np.add.reduceat(self.ws * ls, self.o.first, axis=-1)
        m = np.divide(Lr, self.Wr, out=np.zeros_like(Lr), where=self.Wr > 0)
        return cumsum_rows(Lr) - Lr, m

    @property
    def harmonic(self) -> np.ndarray:
        """sum over the run's positions k = Wb + 1 .. Wb + Wr of 1 / k = psi(Wb + Wr + 1) - psi(Wb + 1)."""
        if self._harmonic is None:
            h = digamma(self.Wb + self.Wr + 1) - digamma(self.Wb + 1)
            self._harmonic = np.where(self.Wr > 0, h, 0.0)
        return self._harmonic

    def areas(self, Lb: np.ndarray, m: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(AURC, AUGRC) [B]: positions k = Wb + j (j = 1..Wr) of a run hold the expected cumulative
        loss CL = Lb + j m, so sum_j CL = Wr Lb + m Wr (Wr + 1) / 2 and
        sum_j CL / k = Wr m + (Lb - Wb m) (psi(Wb + Wr + 1) - psi(Wb + 1))."""
        Wb, Wr = self.Wb, self.Wr
        sum_cl = Wr * Lb + m * Wr * (Wr + 1) / 2
        sum_r = Wr * m + (Lb - Wb * m) * self.harmonic
        return sum_r.sum(-1) / n, sum_cl.sum(-1) / n**2


def _risk_at(Wb: np.ndarray, Lb: np.ndarray, Wr: np.ndarray, m: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Expected selective risk [B, len(ks)] at k accepted items: CL_k / k in the run holding position k."""
    rows, runs = Wb.shape
    end = Wb + Wr  # last position of each run, non-decreasing along a row
    off = (np.arange(rows) * (ks.max() + end[:, -1:].max() + 1.0))[:, None]
    flat = np.searchsorted((end + off).ravel(), (ks[None, :] + off).ravel(), side="left").reshape(rows, -1)
    r = np.minimum(flat - (np.arange(rows) * runs)[:, None], runs - 1)
    take = lambda a: np.take_along_axis(a, r, -1)  # noqa: E731
    return (take(Lb) + (ks - take(Wb)) * take(m)) / ks


class SelectiveSort:
    """Score u [n] and losses [L, n] sorted once (by u, and each loss by itself for its oracle);
    `weighted(w)` [6 L, batch] gives, per loss in order, AURC, E-AURC, AUGRC and the selective risk
    at each of COVERAGES of the resample with multiplicities w [batch, n] (the module docstring's
    definitions, ties as a random tie-break). weighted(ones) is the statistic of the data."""

    def __init__(self, u: np.ndarray, losses: np.ndarray) -> None:
        u = np.asarray(u, np.float64)
        self.losses = np.atleast_2d(np.asarray(losses, np.float64))
        if self.losses.shape[-1] != u.shape[0]:
            raise ValueError("every loss needs one value per query")
        self.n = u.shape[0]
        self.by_u = _Order(u)
        self.oracles = [_Order(loss) for loss in self.losses]
        self.ks = np.array([coverage_count(self.n, c) for c in COVERAGES], np.float64)

    def weighted(self, w: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(np.asarray(w, np.float64))
        out = []
        runs = _Runs(np.take(w, self.by_u.order, axis=-1), self.by_u)
        for loss, oracle in zip(self.losses, self.oracles):
            Lb, m = runs.loss(loss[self.by_u.order])
            aurc, augrc = runs.areas(Lb, m, self.n)
            best_runs = _Runs(np.take(w, oracle.order, axis=-1), oracle)
            best, _ = best_runs.areas(*best_runs.loss(loss[oracle.order]), self.n)
            out += [aurc, aurc - best, augrc, *_risk_at(runs.Wb, Lb, runs.Wr, m, self.ks).T]
        return np.stack(out)


def selective_statistics(u: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """[6 L]: AURC, E-AURC, AUGRC, Risk@80Cov, Risk@90Cov, Risk@95Cov of score u [n] per loss [L, n]."""
    return SelectiveSort(u, losses).weighted(np.ones((1, np.shape(u)[0])))[:, 0]


def risk_coverage_curve(u: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coverage k/N, selective risk r_k, generalised risk g_k), each [N], k = 1..N: the queries of
    smallest u accepted first, tied queries in expectation over their orders (the module docstring)."""
    u, loss = np.asarray(u, np.float64), np.asarray(loss, np.float64)
    n = u.shape[0]
    o = _Order(u)
    runs = _Runs(np.ones((1, n)), o)
    Lb, m = (a[0] for a in runs.loss(loss[o.order]))
    Wb, Wr = runs.Wb[0], runs.Wr[0]
    run_of = np.repeat(np.arange(len(o.first)), Wr.astype(np.int64))
    k = np.arange(1, n + 1, dtype=np.float64)
    cl = Lb[run_of] + (k - Wb[run_of]) * m[run_of]
    return k / n, cl / k, cl / n


def selective_metrics(
    u: np.ndarray, losses: dict[str, np.ndarray], n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """{metric name: (value, ci_low, ci_high)} for score u [N] and each named loss [N] (`mAP@1` ->
    AURC, ...; `mAP@K` -> AURC(mAP@K), ...: `selective_metric_names`), percentile bootstrap over
    queries with (u, every loss) resampled together, as multiplicities on the data sorted once."""
    names = selective_metric_names(list(losses))
    u = np.asarray(u, np.float64)
    if u.size == 0:
        return {m: (float("nan"),) * 3 for m in names}
    sort = SelectiveSort(u, np.stack([np.asarray(v, np.float64) for v in losses.values()]))
    ci = count_bootstrap_ci((u.shape[0],), sort.weighted, n_resamples, level, seed)
    return {m: ci.triple(i) for i, m in enumerate(names)}
