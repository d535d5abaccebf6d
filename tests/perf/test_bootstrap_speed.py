"""pytest-benchmark of the bootstrap CIs evaluation runs for every score, at the paper preset's sizes
(7,000 ID queries, 5,000 OOD queries, 1,000 resamples): the sort-once count bootstrap
(`bench.metrics.weighted`) next to its reference, scipy's resampling bootstrap that re-sorts every
resample. Run with `make perf` (excluded from the default test run)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.metrics.bootstrap import bootstrap_ci
from bench.metrics.ood import ood_metrics_ci, ood_statistics
from bench.metrics.ranking import ranking_metrics, ranking_statistics

RNG = np.random.default_rng(0)
A, B = RNG.normal(0, 1, 7000), RNG.normal(0.5, 1, 5000)
Y = RNG.integers(0, 7, 7000)
M = (RNG.random(7000) < 0.7).astype(float)
U = RNG.normal(0, 1, 7000) - M


def _ranking_reference():
    def stat(uu, mm, cc, axis=-1):
        return ranking_statistics(uu, mm, cc.astype(np.int64), axis)

    return bootstrap_ci((U, M, Y.astype(float)), stat, 1000, seed=0, paired=True)


PATHS = {
    "ood resampling (reference)": lambda: bootstrap_ci((A, B), ood_statistics, 1000, seed=0, paired=False),
    "ood count bootstrap": lambda: ood_metrics_ci(A, B, 1000, seed=0),
    "ranking resampling (reference)": _ranking_reference,
    "ranking count bootstrap": lambda: ranking_metrics(U, M, Y, 1000, seed=0),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_bench_bootstrap(benchmark, path):
    benchmark.pedantic(PATHS[path], rounds=3, iterations=1, warmup_rounds=1)
