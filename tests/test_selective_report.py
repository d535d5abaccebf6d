"""The report's selective-retrieval section (reports/selective.py): tables from results.csv, the
risk-coverage figure from the saved score vectors, and R-AUROC named in the score tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.conventions import score_metric
from bench.metrics.selective import risk_coverage_curve, selective_metrics
from bench.run_folder import RESULT_COLUMNS, TIMING_COLUMNS, RunFolder, RunWriter, score_array
from reports.formats import Figure, Table
from reports.selective import risk_coverage_figure, selective_blocks
from reports.tables import fmt_ci


def _run(tmp_path, with_selective: bool = True):
    rng = np.random.default_rng(0)
    w = RunWriter.open(tmp_path, "t", "abc")
    rows, n = [], 80
    for m, predictive in (("plain", False), ("diag_la", True)):
        correct = (rng.random(n) < 0.7).astype(float)
        arrays = {"pq_mAP@1": correct, score_array("id", "knn_disagreement"): rng.random(n) + (1 - correct)}
        if predictive:
            arrays[score_array("id", "trace")] = rng.random(n)
        for s in ("knn_disagreement", "trace"):
            u = arrays.get(score_array("id", s))
            vals = (
                selective_metrics(u, {"mAP@1": 1 - correct}, n_resamples=50)
                if u is not None
                else {
                    k: (np.nan,) * 3
                    for k in selective_metrics(np.zeros(2), {"mAP@1": np.zeros(2)}, n_resamples=0)
                }
            )
            if with_selective:
                rows += [
                    {
                        "method": m,
                        "seed": 0,
                        "metric": score_metric(k, s),
                        "value": v,
                        "ci_low": lo,
                        "ci_high": hi,
                    }
                    for k, (v, lo, hi) in vals.items()
                ]
            rows.append(
                {
                    "method": m,
                    "seed": 0,
                    "metric": score_metric("R-AUROC", s),
                    "value": 0.6,
                    "ci_low": 0.5,
                    "ci_high": 0.7,
                }
            )
        rows.append(
            {"method": m, "seed": 0, "metric": "mAP@1", "value": correct.mean(), "ci_low": 0, "ci_high": 1}
        )
        w.save_method(m, 0, arrays, [], [], {})
    w.write_tables(
        pd.DataFrame(rows, columns=RESULT_COLUMNS),
        pd.DataFrame(columns=TIMING_COLUMNS),
        pd.DataFrame(columns=["method", "metric", "mean"]),
        None,
    )
    w.write_config(
        {"methods": ["plain", "diag_la"], "config": {"seed": 0}, "config_digest": "abc"}, "complete"
    )
    return RunFolder(w.path)


def test_tables_show_results_csv_and_leave_out_undefined_rows(tmp_path):
    run = _run(tmp_path)
    blocks = selective_blocks(run)
    (table,) = [b for b in blocks if isinstance(b, Table)]
    res = run.results.set_index("metric")
    got = {r[0].text: [c.text for c in r[1:]] for r in table.rows}
    assert set(got) == {"plain / knn_disagreement", "diag_la / knn_disagreement", "diag_la / trace"}
    d = run.results[(run.results["method"] == "diag_la") & (run.results["metric"] == "E-AURC:trace")].iloc[0]
    assert got["diag_la / trace"][1] == fmt_ci(d["value"], d["ci_low"], d["ci_high"])
    assert len(res) == len(run.results)
    (fig,) = [b for b in blocks if isinstance(b, Figure)]
    assert fig.name == "risk_coverage" and fig.png.startswith(b"\x89PNG")


def test_no_section_without_selective_metrics(tmp_path):
    assert selective_blocks(_run(tmp_path, with_selective=False)) == []


def test_figure_draws_each_methods_curve(tmp_path):
    run = _run(tmp_path)
    pq = {m: run.perquery(m, 0) for m in run.methods}
    fig = risk_coverage_figure(pq, ["knn_disagreement", "trace"])
    ax = fig.axes[0]
    a = pq["plain"]
    cov, risk, _ = risk_coverage_curve(a[score_array("id", "knn_disagreement")], 1 - a["pq_mAP@1"])
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "plain")
    np.testing.assert_allclose(line.get_xdata(), cov)
    np.testing.assert_allclose(line.get_ydata(), risk)
    assert [x.get_title() for x in fig.axes if x.get_visible()][:2] == ["knn_disagreement", "trace"]
    assert risk_coverage_figure(pq, ["dist_var"]) is None


def test_a_real_run_reports_selective_metrics_and_r_auroc(cli, tmp_path):
    out = tmp_path / "runs"
    code, _, err = cli(
        "run",
        "--preset",
        "smoke",
        "--dataset",
        "synthetic",
        "--methods",
        "plain",
        "--out",
        str(out),
        "--quiet",
        "--set",
        "bootstrap_resamples=50",
    )
    assert code == 0, err
    (d,) = [p for p in out.iterdir() if p.name != "cache"]
    res = pd.read_csv(d / "results.csv").set_index("metric")
    for m in ("AURC", "E-AURC", "AUGRC", "Risk@90Cov", "AURC(mAP@7)", "R-AUROC", "error_AUROC"):
        assert np.isfinite(res.loc[score_metric(m, "knn_disagreement"), "value"]), m
    assert res.loc["R-AUROC:knn_disagreement", "value"] == res.loc["error_AUROC:knn_disagreement", "value"]
    md = (d / "report.md").read_text()
    assert (
        "## Selective retrieval" in md
        and "plots/risk_coverage.png" in md
        and (d / "plots/risk_coverage.png").is_file()
    )
    assert "R-AUROC ↑" in md and "error_AUROC" not in md
    assert fmt_ci(*res.loc["AURC:knn_disagreement", ["value", "ci_low", "ci_high"]]) in md
