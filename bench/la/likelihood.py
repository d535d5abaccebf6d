"""The likelihood scale of a Laplace posterior on a pair loss: what one observation of the Gibbs
likelihood is (`batch` or `pair`) and a temperature t; one importable place for every Laplace
method (post hoc here, online Laplace later).

The training objective read as a tempered Gibbs likelihood over the mining batches b,

    p_t(D | theta) ∝ exp(-t sum_b l_b(theta)),    l_b = sum_{k in pos, neg} sum_{(a, c) active of kind k}
    w_ac l_ac,

with l_ac the pair loss (positive: relu(d - m_pos), negative: relu(m_neg - d)) and count_ac how often
the miner yields the ordered pair (PML's `convert_to_pairs`, duplicates included). The posterior
precision is t H + delta I with the GGN H = sum_b J_b^T L_b(w) J_b (`bench.la.pairs`):

* `batch` (t = 1): w_ac = count_ac / n_k(b), PML's AvgNonZeroReducer, n_k(b) the active pairs of
  kind k in batch b counted with multiplicity: the loss exactly as trained, one observation per
  mining batch. Each batch's weights sum to 1 per kind, so H_batch ~ (N / m) x the mean pair
  curvature: the mining batch size m sets the posterior's temperature (tr(H) m is constant in m).
* `pair` (t = 1): w_ac = count_ac, PML's SumReducer: every mined active pair occurrence is one
  observation, i.e. batch b's positive weights are multiplied by n_pos(b) and its negative ones by
  n_neg(b): H_pair = sum_b J_b^T (n_pos(b) L_pos,b + n_neg(b) L_neg,b) J_b (only the PSD part is kept,
  so with plain distances only positive pairs count). Not a constant multiple of H_batch.
* a positive number t: the temperature on the batch-scale likelihood, H = t H_batch.
* `tuned`: t (and, with prior_precision=marglik | grid, delta) chosen on `Dataset.val_id` by the
  log-likelihood of validation triplet orderings under the joint predictive (`bench.la.tuning`).

Marginal likelihood at temperature t (Laplace at theta_MAP, prior N(0, delta^-1 I)):

    log p_t(D | delta) ~= -t sum_b l_b(theta_MAP) - delta/2 ||theta_MAP||^2 + D/2 log delta
                          - 1/2 log det(t H + delta I) + log c(t),

c(t) the unknown normaliser of the Gibbs likelihood (exp(-t l) is not a density over data), so marglik
identifies delta at a given t (the spectrum of H scaled by t, `bench.la.prior.optimize_marglik`) but
not t itself: t needs held-out data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.errors import BenchError, require

OBSERVATIONS = {"batch": "mean", "pair": "sum"}  # observation unit -> the pair-loss reduction it implies
TUNED = "tuned"


@dataclass(frozen=True)
class LikelihoodScale:
    """A parsed `likelihood_scale`: the observation unit (batch | pair) of the accumulated curvature
    and the temperature multiplying it (None: tuned on the validation split)."""

    observations: str
    temperature: float | None

    @property
    def reduction(self) -> str:
        """The pair-loss reduction (`bench.la.pairs.reducer_weights`): mean (batch) or sum (pair)."""
        return OBSERVATIONS[self.observations]

    @property
    def tuned(self) -> bool:
        return self.temperature is None


def parse_scale(text: str) -> LikelihoodScale:
    """`batch` | `pair` | a positive number (temperature on the batch scale) | `tuned`."""
    text = str(text).strip()
    if text in OBSERVATIONS:
        return LikelihoodScale(text, 1.0)
    if text == TUNED:
        return LikelihoodScale("batch", None)
    try:
        t = float(text)
    except ValueError:
        t = float("nan")
    if not (math.isfinite(t) and t > 0):
        raise BenchError(f"likelihood_scale must be batch, pair, tuned or a positive number, got {text!r}")
    return LikelihoodScale("batch", t)


def check_scale(cfg) -> LikelihoodScale:
    """The config's scale, with the combinations that cannot run refused in one line."""
    scale = parse_scale(cfg.likelihood_scale)
    require(
        not (scale.observations == "pair" and cfg.hessian != "ggn"),
        "likelihood_scale=pair needs hessian=ggn (the J^T J proxy has no pairs)",
    )
    require(
        not (scale.tuned and cfg.val_items <= 0),
        "likelihood_scale=tuned needs a validation split: set --set val_items=N (e.g. 2000)",
    )
    return scale
