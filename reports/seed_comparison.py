"""The seed paper's Table 1 (mAP@K without and with LA, Fashion-MNIST) beside this run's numbers with
their CIs, in both AP@K definitions: the seed's hits-normalised mAP_pml@K and the headline mAP@K."""

from __future__ import annotations

import pandas as pd

from bench.conventions import REFERENCE_METHOD
from bench.metrics.retrieval import PML_MAP
from bench.run_folder import RunFolder
from reports.formats import Block, Cell, Heading, Para, Table
from reports.tables import fmt_ci, run_seed_summary

SEED_KS = (1, 3, 5, 7)
METHODS_PER_TABLE = 3
# Table 1 of the seed (Mikkelsen, Illum, Olsen: Uncertainty in image retrieval with Laplace approximation)
SEED_TABLE1 = {
    "ML without LA": (0.5337, 0.6832, 0.7002, 0.7015),
    "ML with LA": (0.5683, 0.7020, 0.7103, 0.6987),
}
SEED_NOTE = (
    "Seed: its Table 1 (no interval given; pytorch-metric-learning's `mean_average_precision`, which up to "
    "v1.6.0 divides by the hits in the top K, hence `mAP_pml@K`). "
    "Ours: value [95% bootstrap CI over queries] "
    "(several seeds: mean [interval across seeds, in range, none below 3 seeds]); "
    "`mAP@K` divides by min(K, R) (the headline). "
    "Retrieval is leave-one-out on the ID test set, in the run's distance."
)


def _values(run: RunFolder) -> pd.DataFrame:
    """method, metric, value, lo, hi: one seed's bootstrap CIs, or the across-seed interval."""
    if len(run.seeds) > 1:
        s, _ = run_seed_summary(run)
        return s.rename(columns={"mean": "value", "t_low": "lo", "t_high": "hi"})[
            ["method", "metric", "value", "lo", "hi"]
        ]
    r = run.results[run.results["seed"] == run.seeds[0]]
    return r.rename(columns={"ci_low": "lo", "ci_high": "hi"})[["method", "metric", "value", "lo", "hi"]]


def seed_comparison_table(values: pd.DataFrame, methods: list[str]) -> Table | None:
    """Rows K = 1, 3, 5, 7; columns the seed's two and, per method, mAP_pml@K then mAP@K; None when
    the results lack mAP_pml@K at the seed's K."""
    need = {f"{PML_MAP}@{k}" for k in SEED_KS}
    if not need <= set(values["metric"]):
        return None
    methods = [
        m
        for m in ([REFERENCE_METHOD] + [m for m in methods if m != REFERENCE_METHOD])
        if m in set(values["method"])
    ]
    cell = {(r.method, r.metric): fmt_ci(r.value, r.lo, r.hi) for r in values.itertuples()}
    headers = ["K", *(f"seed: {name}" for name in SEED_TABLE1)]
    headers += [f"{m} {stem}@K" for m in methods for stem in (PML_MAP, "mAP")]
    rows = []
    for i, k in enumerate(SEED_KS):
        row = [Cell(str(k)), *(Cell(f"{v[i]:.4f}") for v in SEED_TABLE1.values())]
        row += [Cell(cell.get((m, f"{stem}@{k}"), "n/a")) for m in methods for stem in (PML_MAP, "mAP")]
        rows.append(row)
    return Table(
        "Seed comparison: mAP@K of the seed's Table 1 and this run", headers, rows, notes=[SEED_NOTE]
    )


def seed_comparison_blocks(run: RunFolder) -> list[Block]:
    """The section, for Fashion-MNIST runs that carry mAP_pml@1,3,5,7 (e.g. `--preset seed`); else nothing."""
    if run.results.empty or run.config.get("dataset") != "fashion_mnist":
        return []
    values = _values(run)
    methods = [
        m
        for m in ([REFERENCE_METHOD] + [m for m in run.methods if m != REFERENCE_METHOD])
        if m in set(values["method"])
    ]
    tables = [
        seed_comparison_table(values, methods[i : i + METHODS_PER_TABLE])
        for i in range(0, len(methods), METHODS_PER_TABLE)
    ]  # <= 9 columns a table
    tables = [t for t in tables if t is not None]
    if not tables:
        return []
    cfg = run.config
    facts = (
        f"This run: distance={cfg.get('distance', 'euclidean')}, hessian={cfg.get('hessian')}, "
        f"predictive={cfg.get('predictive')}, prior_precision={cfg.get('prior_precision')}, "
        f"{cfg.get('epochs')} epochs, batch {cfg.get('batch_size')}."
    )
    for t in tables[1:]:
        t.notes = []
    tables[-1].notes = [SEED_NOTE]
    tables[0].notes = []
    return [Heading("Seed comparison"), Para(facts, note=True), *tables]
