"""Choosing the likelihood temperature t and the prior precision delta of a Laplace posterior on a
validation split, by the log-likelihood of its triplet orderings under the joint predictive
(`bench.la.prior.triplet_log_score`), every point from one factorisation (`bench.la.family`).

Why this objective: marglik identifies delta at a given t but not t (`bench.la.likelihood`); the
validation items were never trained on, and "is the anchor closer to its positive than to the
negative" is the event retrieval depends on, so its held-out log-likelihood is a proper score of the
predictive's retrieval uncertainty. Joint, because the items of a triplet share the posterior's
weights: their embeddings are correlated, and the ordering depends on the difference.

Search: for each t on TEMPERATURES the prior is marglik's delta(t) (its spectrum scaled by t), a fixed
number, or every delta of DEFAULT_GRID (prior_precision=grid: a 2-d grid); with one delta per t the
best grid point is refined by a bounded Brent search on log t between its neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from scipy.optimize import minimize_scalar

from bench.la.prior import DEFAULT_GRID

# likelihood_scale=tuned: temperatures on the batch scale, 0.1 .. 1e4 in half decades (pair counts
# are 1e1..1e3 times the batch scale on Fashion-MNIST, so the range brackets both)
TEMPERATURES = tuple(10.0 ** (k / 2) for k in range(-2, 9))
REFINE_XATOL = 0.02  # Brent's tolerance on log t (2%)

Score = Callable[[float, float], float]  # (t, delta) -> validation objective (larger is better)
DeltaAt = Callable[[float], tuple[float, dict]]  # t -> (delta, info), e.g. marglik on the t-scaled spectrum


def candidates(
    temperatures: tuple[float, ...], prior: str | float, delta_at: DeltaAt | None
) -> list[tuple[float, float, dict]]:
    """(t, delta, info) to score: per t, marglik's delta(t) (prior "marglik"), every delta of DEFAULT_GRID
    ("grid") or the fixed number."""
    out = []
    for t in temperatures:
        if prior == "marglik":
            assert delta_at is not None
            delta, info = delta_at(t)
            out.append((t, delta, {"log_marglik": info.get("log_marglik")}))
        elif prior == "grid":
            out += [(t, d, {}) for d in DEFAULT_GRID]
        else:
            out.append((t, float(prior), {}))
    return out


def search(
    score: Score,
    temperatures: tuple[float, ...],
    prior: str | float,
    delta_at: DeltaAt | None = None,
    bound: Callable[[float, float], float] | None = None,
    max_bound: float = math.inf,
) -> tuple[float, float, dict]:
    """(t, delta, info) maximising `score` over the candidates whose covariance `bound` (a low-rank
    basis's relative error there) is at most max_bound; the others are recorded unscored (objective
    None). info holds every point (temperature, prior_precision, objective, rank_bound, log_marglik),
    the refinement, `at_edge` (the best t is an end of the range: the optimum may lie beyond it) and
    `trust_edge` (some points were beyond max_bound and the best is the scored point nearest them, the
    one with the largest bound: the optimum may lie there). Nothing within max_bound: (nan, nan) and
    best None."""
    bound = bound or (lambda t, d: 0.0)
    rows = []
    for t, d, extra in candidates(temperatures, prior, delta_at):
        b = bound(t, d)
        rows.append(
            {
                "temperature": t,
                "prior_precision": d,
                "objective": score(t, d) if b <= max_bound else None,
                "rank_bound": b,
                **{k: v for k, v in extra.items() if v is not None},
            }
        )
    finite = [r for r in rows if r["objective"] is not None and math.isfinite(r["objective"])]
    if not finite:  # nothing within max_bound (a caller may grow its basis): no best point
        return (
            math.nan,
            math.nan,
            {
                "objective": "val_triplet_loglik",
                "points": rows,
                "refined": False,
                "best": None,
                "at_edge": False,
                "trust_edge": True,
            },
        )
    best = max(finite, key=lambda r: r["objective"])
    trusted = sorted({r["temperature"] for r in finite})
    info = {"objective": "val_triplet_loglik", "points": rows, "refined": False}
    if prior != "grid" and len(trusted) > 1:
        best, info["refined"] = _refine(score, tuple(trusted), prior, delta_at, best, bound, max_bound), True
    info["best"] = best
    info["at_edge"] = len(temperatures) > 1 and best["temperature"] in (min(temperatures), max(temperatures))
    unscored = len(finite) < len(rows)
    info["trust_edge"] = unscored and best["rank_bound"] >= max(r["rank_bound"] for r in finite)
    return best["temperature"], best["prior_precision"], info


def _refine(
    score: Score,
    temperatures: tuple[float, ...],
    prior: str | float,
    delta_at: DeltaAt | None,
    best: dict,
    bound: Callable[[float, float], float],
    max_bound: float,
) -> dict:
    """Bounded Brent on log t between the best scored point's neighbours (one delta per t); a point
    beyond max_bound counts as worst."""
    ts = sorted(temperatures)
    i = ts.index(best["temperature"])
    lo, hi = math.log(ts[max(i - 1, 0)]), math.log(ts[min(i + 1, len(ts) - 1)])
    delta_of = (lambda t: delta_at(t)[0]) if prior == "marglik" else (lambda t: float(prior))  # type: ignore[misc]

    def loss(u: float) -> float:
        t = math.exp(u)
        d = delta_of(t)
        return -score(t, d) if bound(t, d) <= max_bound else 1e300

    res = minimize_scalar(
        loss, bounds=(lo, hi), method="bounded", options={"xatol": REFINE_XATOL, "maxiter": 25}
    )
    t = float(math.exp(res.x))
    if -res.fun <= best["objective"]:
        return best
    d = delta_of(t)
    return {
        "temperature": t,
        "prior_precision": d,
        "objective": float(-res.fun),
        "rank_bound": bound(t, d),
        "refine_evaluations": int(res.nfev),
    }
