"""The uncertainty-score section of the report: names `<metric>:<score>` parsed everywhere, the score
tables equal results.csv, the best score per method, the method comparison, the per-score figure,
and per-score metrics kept out of the headline tables and the grid's headline metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.conventions import score_metric, split_score_metric
from bench.evaluate import score_metric_names
from bench.run_folder import RunFolder, RunWriter, score_array
from reports.grid_report import headline
from reports.render import render_report
from reports.scores import best_score_table, score_blocks, score_frame, score_summary
from reports.tables import base_metric, direction, metric_groups, ood_set
from tests.reports_fixture import OOD_SETS, make_run
from tests.test_reports import check_md_matches_csv, parse_md_tables

SCORES = ("trace", "top1_flip", "knn_disagreement")


def test_names_parse():
    assert split_score_metric("AUROC[heldout]:trace") == ("AUROC[heldout]", "trace")
    assert split_score_metric("AUSE") == ("AUSE", None)
    assert score_metric("Spearman_within", "dist_var") == "Spearman_within:dist_var"
    assert base_metric("AUROC[heldout]:trace") == "AUROC" and ood_set("FPR95[mnist]:top1_flip") == "mnist"
    assert (
        direction("AUSE:top1_flip") == -1
        and direction("AURG:trace") == 1
        and direction("Spearman_within:x") == -1
    )
    assert direction("error_AUROC:x") == 1
    assert metric_groups(["mAP@1", "AUSE", "AUSE:trace", "AUROC[a]:trace", "AUROC[a]"]) == [
        ("Retrieval", ["mAP@1"]),
        ("Calibration and sparsification", ["AUSE"]),
        ("OOD detection: a", ["AUROC[a]"]),
    ]
    assert headline(["mAP@1", "AUSE", "AUSE:trace", "AUROC[a]", "AUROC[a]:trace"]) == [
        "mAP@1",
        "AUSE",
        "AUROC[a]",
    ]


def _with_scores(root, seeds=(0,)) -> RunFolder:
    """The report fixture plus per-score rows (seeded values; trace made best for diag_la, top1_flip
    for mc_dropout; plain only has the predictive-free score) and their score vectors."""
    d = make_run(root, seeds=seeds)
    run = RunFolder(d)
    rng = np.random.default_rng(11)
    rows = []
    w = RunWriter(d)
    for s in seeds:
        for m in run.methods:
            arrs = run.perquery(m, s)
            n = len(arrs["pq_mAP@1"])
            for score in SCORES:
                avail = m != "plain" or score == "knn_disagreement"
                best = {"diag_la": "trace", "mc_dropout": "top1_flip", "plain": "knn_disagreement"}[
                    m
                ] == score
                for met in score_metric_names(list(OOD_SETS)):
                    v = (0.2 if best else 0.05) + 0.01 * rng.random() if met == "AURG" else rng.random()
                    v = v if avail else np.nan
                    rows.append(
                        {
                            "method": m,
                            "seed": s,
                            "metric": score_metric(met, score),
                            "value": v,
                            "ci_low": v - 0.02,
                            "ci_high": v + 0.02,
                        }
                    )
                if avail:
                    arrs[score_array("id", score)] = rng.random(n) - (arrs["pq_mAP@1"] if best else 0)
            w.save_method(m, s, arrs, [], [], {})
    res = pd.concat([run.results, pd.DataFrame(rows)], ignore_index=True)
    w.write_tables(res, run.timings, run.seed_table, run.paired)
    return RunFolder(d)


def test_score_section_numbers_equal_results_csv(tmp_path):
    run = _with_scores(tmp_path)
    render_report(run.path, ["md"])
    md = (run.path / "report.md").read_text()
    assert "## Uncertainty scores" in md
    check_md_matches_csv(run.path)
    tables = {t: (h, r) for t, h, r in parse_md_tables(md)}
    id_table = next(v for k, v in tables.items() if k.startswith("Uncertainty scores: do they"))
    shown = {r[0] for r in id_table[1]}
    assert "plain / knn_disagreement" in shown and "plain / trace" not in shown  # n/a rows left out
    assert "diag_la / top1_flip" in shown
    best = next(v for k, v in tables.items() if k.startswith("Best score per method"))
    picked = {r[0]: r[1] for r in best[1]}
    assert picked == {"plain": "knn_disagreement", "diag_la": "trace", "mc_dropout": "top1_flip"}
    assert {r[0]: r[5] for r in best[1]}["diag_la"] == "1/1"
    assert any(k.startswith("Which method predicts its own retrieval errors best") for k in tables)
    assert (run.path / "plots" / "sparsification_scores.png").is_file()


def test_several_seeds_summarise_across_seeds(tmp_path):
    run = _with_scores(tmp_path, seeds=(0, 1, 2))
    summ, how = score_summary(run)
    assert "3 seeds" in how and set(summ["n"]) <= {0, 3}
    frame = score_frame(run.results)
    got = summ[(summ.method == "diag_la") & (summ.score == "trace") & (summ.metric == "AURG")]["value"].item()
    want = frame[(frame.method == "diag_la") & (frame.score == "trace") & (frame.metric == "AURG")][
        "value"
    ].mean()
    assert got == pytest.approx(want)
    t = best_score_table(summ, run.methods, frame)
    assert {r[0].text: r[5].text for r in t.rows}["mc_dropout"] == "3/3"


def test_runs_without_scores_have_no_score_section(tmp_path):
    assert score_blocks(RunFolder(make_run(tmp_path))) == []
