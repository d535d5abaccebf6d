"""The report's online vs post-hoc Laplace section (reports/online_comparison.py) on a fixture run folder:
pairing by structure from the diagnostics, differences equal to the per-query vectors' own, the verdict
by the metric's direction, and the training-cost ratio from the timings."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from bench.run_folder import RunFolder, RunWriter
from reports.online_comparison import comparison_blocks, laplace_pairs, verdict
from reports.render import render_report
from tests.reports_fixture import make_run

METHODS = {"plain": False, "diag_la": True, "online_la": True}


def _with_online_facts(d, online_structure: str = "diag") -> None:
    """Record Laplace diagnostics and online_la's own training stages in the fixture's folder."""
    run = RunFolder(d)
    meta = {k: v for k, v in run.meta.items() if k not in ("format_version", "status")}
    meta["diagnostics"] = {}
    times = [run.timings]
    for s in run.seeds:
        meta["diagnostics"][f"diag_la-seed{s}"] = {"structure": "diag", "subset": "all", "D": 100}
        meta["diagnostics"][f"online_la-seed{s}"] = {
            "online": True,
            "structure": online_structure,
            "subset": "head",
            "D": 10,
            "prior_seconds_in_training": 0.5,
        }
        times.append(
            pd.DataFrame(
                [
                    {"method": "online_la", "seed": s, "stage": "train", "seconds": 5.0 + s},
                    {"method": "online_la", "seed": s, "stage": "hessian", "seconds": 2.0},
                ]
            )
        )
    writer = RunWriter(d)
    writer.write_config(meta, run.meta["status"])
    writer.write_tables(run.results, pd.concat(times, ignore_index=True), run.seed_table, run.paired)


@pytest.mark.parametrize("score_vectors", [False, True])
def test_online_vs_post_hoc_section(tmp_path, score_vectors):
    """With saved score vectors (every run since the score plugins) as without (older folders: tr Sigma from
    the variances), the section pairs mAP@1, AUSE, ECE and every OOD set's AUROC."""
    d = make_run(tmp_path, seeds=(0, 1), methods=METHODS, score_vectors=score_vectors)
    _with_online_facts(d)
    run = RunFolder(d)
    assert laplace_pairs(run) == [("online_la", "diag_la")]
    render_report(d, ["md"])
    md = (d / "report.md").read_text()
    start = md.index("## Online vs post-hoc Laplace")
    section = md[start : md.index("\n## ", start + 1)]
    for s in (0, 1):
        a, b = run.perquery("online_la", s)["pq_mAP@1"], run.perquery("diag_la", s)["pq_mAP@1"]
        assert f"| seed {s} " in section and f"{float(np.mean(a - b)):+.3f} [" in section
    assert "mean over seeds" in section and "by the t-interval over seeds" in section
    assert "online_la head (D = 10), diag_la all (D = 100) (different subsets" in section
    for col in ("AUSE", "AUROC[heldout]", "AUROC[noise]"):
        assert col in section
    # (online train + hessian + in-training marglik) / base train, per seed; base = 3 + seed in the fixture
    assert (
        re.search(r"\| online_la +\| 5\.50 ", section)
        and f"{(5 + 2 + 0.5) / 3:.2f}x, {(6 + 2 + 0.5) / 4:.2f}x" in section
    )
    assert f"share of online training: {100 * 2 / 7.5:.0f}%, {100 * 2 / 8.5:.0f}%" in section


def test_no_section_without_a_pair_of_the_same_structure(tmp_path):
    d = make_run(tmp_path / "a", methods=METHODS)
    assert comparison_blocks(RunFolder(d)) == []  # no diagnostics: nothing is known to be online
    _with_online_facts(d, online_structure="kron")
    assert laplace_pairs(RunFolder(d)) == [] and comparison_blocks(RunFolder(d)) == []


def test_verdict_follows_the_metric_direction():
    assert verdict("mAP@1", 0.01, 0.03) == "wins" and verdict("mAP@1", -0.03, -0.01) == "loses"
    assert verdict("ECE", 0.01, 0.03) == "loses" and verdict("AUSE", -0.03, -0.01) == "wins"
    assert verdict("AUROC[heldout]", -0.01, 0.02) == "ties" and verdict("mAP@1", float("nan"), 0.1) == "ties"
