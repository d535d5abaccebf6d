"""The report's Findings (reports/findings.py, reports/criteria.py, reports/rank_tests.py): paired
differences against direct computations, tie / worse verdicts, the Pareto front, the grid rank test
against scikit-posthocs, the terminal summary's width, the size of report.html, results pages and
`bench report`'s text output and bad-flag message."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from bench.run_folder import RunFolder, RunWriter, score_array
from reports.criteria import Criterion, criteria, paired_difference
from reports.findings import decide, pareto_front, summary_text
from reports.rank_tests import friedman_nemenyi
from reports.render import render_report, summary
from tests.reports_fixture import make_run


def _rewrite(d, method: str, **arrays: np.ndarray) -> None:
    """Replace arrays of a (method, seed 0) per-query file."""
    f = d / "perquery" / f"{method}-seed0.npz"
    with np.load(f) as z:
        a = {k: z[k] for k in z.files}
    a.update(arrays)

    def write(path):
        with open(path, "wb") as fh:
            np.savez(fh, **a)

    RunWriter(d).manifest.write({f"perquery/{f.name}": write})  # recorded, as the run itself writes it


def _set_result(d, method: str, metric: str, value: float) -> None:
    r = pd.read_csv(d / "results.csv")
    r.loc[(r["method"] == method) & (r["metric"] == metric), "value"] = value
    RunWriter(d).manifest.write({"results.csv": lambda path: r.to_csv(path, index=False)})


def test_paired_difference_equals_the_direct_difference(tmp_path):
    d = make_run(tmp_path, score_vectors=True, n=80)
    run = RunFolder(d)
    a, b = run.perquery("diag_la", 0), run.perquery("mc_dropout", 0)
    retrieval = next(c for c in criteria(run) if c.key == "retrieval")
    diff, lo, hi = paired_difference(run, retrieval, "diag_la", "mc_dropout", 300)
    assert diff == pytest.approx(np.mean(a["pq_mAP@1"] - b["pq_mAP@1"]))
    assert lo <= diff <= hi
    near = Criterion("n", "near", "?", "AUROC[heldout]", True, "n", "ood", "trace", "heldout")
    diff, lo, hi = paired_difference(run, near, "diag_la", "mc_dropout", 300)

    def auc(x):
        return roc_auc_score(
            np.r_[np.zeros(80), np.ones(40)],
            np.r_[x[score_array("id", "trace")], x[score_array("heldout", "trace")]],
        )

    assert diff == pytest.approx(auc(a) - auc(b))
    assert lo < diff < hi
    err = Criterion("e", "errors", "?", "R-AUROC:top1_flip", True, "e", "ranking", "top1_flip")
    diff, _, _ = paired_difference(run, err, "diag_la", "mc_dropout", 300)
    e = lambda x: roc_auc_score(1 - x["pq_mAP@1"], x[score_array("id", "top1_flip")])  # noqa: E731
    assert diff == pytest.approx(e(a) - e(b))
    assert np.isnan(paired_difference(run, near, "plain", "diag_la", 100)[0])  # plain has no score vectors


def test_ties_and_significant_differences(tmp_path):
    d = make_run(tmp_path, n=400, methods={"plain": False, "diag_la": True, "mc_dropout": True})
    ref = RunFolder(d).perquery("plain", 0)["pq_mAP@1"].copy()
    ref[:] = (np.arange(ref.size) % 2).astype(float)  # plain: right on every other query (0.5)
    close = ref.copy()
    close[0] = 1.0  # one more right query: not a significant difference
    _rewrite(d, "plain", **{"pq_mAP@1": ref})
    _rewrite(d, "mc_dropout", **{"pq_mAP@1": close})
    _rewrite(d, "diag_la", **{"pq_mAP@1": np.zeros_like(ref)})  # never right: significantly worse
    for m, v in (("plain", ref), ("mc_dropout", close), ("diag_la", np.zeros_like(ref))):
        _set_result(d, m, "mAP@1", float(v.mean()))
    run = RunFolder(d)
    f = decide(run, next(c for c in criteria(run) if c.key == "retrieval"), n_resamples=300)
    assert f.best == "mc_dropout" and f.co_best == ["mc_dropout"]
    assert f.tied == ["plain"] and f.worse == ["diag_la"]
    # an uncertainty criterion: plain has no value
    cal = decide(run, next(c for c in criteria(run) if c.key == "calibration"), n_resamples=100)
    assert cal.missing == ["plain"] and cal.best == "diag_la"  # fixture: diag_la has the lower ECE


def test_pareto_front():
    cost = np.array([1.0, 2.0, 3.0, 4.0, 2.0, np.nan])
    quality = np.array([0.5, 0.7, 0.6, 0.9, 0.4, 1.0])
    assert pareto_front(cost, quality).tolist() == [0, 1, 3]  # 2 and 4 dominated, 5 has no cost
    assert pareto_front(cost, -quality, higher=False).tolist() == [0, 1, 3]  # lower-is-better mirrored
    assert pareto_front(np.array([1.0, 1.0]), np.array([0.5, 0.5])).tolist() == [
        0,
        1,
    ]  # equal points both kept


def test_friedman_nemenyi_agrees_with_scikit_posthocs():
    sp = pytest.importorskip("scikit_posthocs")
    rng = np.random.default_rng(0)
    for shift in ([0, 0.3, 1.0, 1.5], [0, 0.2, 0.4, 0.6, 2.0]):
        x = pd.DataFrame(
            rng.normal(size=(15, len(shift))) + np.array(shift), columns=[f"m{i}" for i in range(len(shift))]
        )
        v = friedman_nemenyi(x, higher=True)
        p = pd.DataFrame(
            sp.posthoc_nemenyi_friedman(x.to_numpy()).to_numpy(), index=x.columns, columns=x.columns
        )
        assert v.best == x.columns[-1]
        assert v.p < 0.05
        assert sorted(v.tied) == sorted(m for m in x.columns if m != v.best and p.loc[v.best, m] >= 0.05)
        assert v.mean_ranks.to_dict() == pytest.approx((-x).rank(axis=1).mean().to_dict())
    same = pd.DataFrame(rng.normal(size=(6, 3)), columns=["a", "b", "c"])
    v = friedman_nemenyi(same, higher=False)
    assert v.p >= 0.05 and sorted(v.tied + [v.best]) == ["a", "b", "c"]  # no omnibus difference: all tied


def test_cd_diagram_pairs_are_scikit_posthocs_nemenyi_decisions():
    """Every pair the critical-difference diagram joins (or separates) is scikit-posthocs' Nemenyi
    decision (p >= 0.05 or < 0.05) after a significant Friedman test; the diagram draws."""
    from reports.rank_tests import cd_diagram, significance_matrix

    sp = pytest.importorskip("scikit_posthocs")
    rng = np.random.default_rng(3)
    shift = [0, 0.1, 0.8, 1.2, 2.5]
    x = pd.DataFrame(rng.normal(size=(20, 5)) + np.array(shift), columns=[f"m{i}" for i in range(5)])
    v = friedman_nemenyi(x, higher=True)
    assert v.p < 0.05
    p = pd.DataFrame(sp.posthoc_nemenyi_friedman(x.to_numpy()).to_numpy(), index=x.columns, columns=x.columns)
    sig = significance_matrix(v).loc[x.columns, x.columns]
    assert ((sig.to_numpy() == 0) == (p.to_numpy() < 0.05)).all()
    assert 0 < (sig.to_numpy() == 0).sum() < 20  # some pairs differ, some do not: the test can tell
    assert cd_diagram(v, "Retrieval") is not None


def test_summary_is_one_table_within_100_columns(tmp_path, monkeypatch):
    methods = {f"a_rather_long_method_name_{i}": i > 0 for i in range(9)}
    d = make_run(tmp_path / "runs", methods=methods, score_vectors=True)
    monkeypatch.chdir(tmp_path)
    text = summary(d, d / "report.html")
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100, text
    assert lines[-1] == "report: runs/20260101-000000-fixture/report.html"
    head = lines[0].split()
    assert head[:2] == ["method", "mAP@1"] and head[-1] == "seconds" and "ECE" in head
    assert sum(1 for x in lines if x.startswith("a_rather_long")) == 9
    assert summary_text(RunFolder(d)).count("*") >= 3  # the best per column is marked


@pytest.mark.slow
def test_report_size_and_one_embedding_per_distinct_mean(tmp_path):
    """A 12-method run of 2000 queries: post-hoc methods sharing plain's mean get one figure, and
    report.html stays under 3 MB."""
    methods = {
        "plain": False,
        **{f"post_hoc_{i}": True for i in range(6)},
        **{f"trained_{i}": True for i in range(5)},
    }
    d = make_run(tmp_path, methods=methods, n=2000, embed_dim=8, score_vectors=True)
    base = RunFolder(d).perquery("plain", 0)
    for i in range(6):
        _rewrite(d, f"post_hoc_{i}", **{k: v for k, v in base.items() if k.endswith("_mean")})
    render_report(d, ["html"])
    assert (d / "report.html").stat().st_size <= 3_000_000
    emb = sorted(p.stem for p in (d / "plots").glob("embedding_*.png"))
    assert emb == ["embedding_plain"] + [f"embedding_trained_{i}" for i in range(5)]


@pytest.mark.slow
def test_bench_report_text_page_and_bad_flag(tmp_path, cli):
    d = make_run(tmp_path / "runs", score_vectors=True)
    code, out, err = cli("report", str(d), "--format", "text")
    assert code == 0, err
    assert (
        "Retrieval (seed 0)" in out and "Best method per criterion" in out and not (d / "report.md").exists()
    )
    page = tmp_path / "results" / "fixture.md"
    code, out, err = cli("report", str(d), "--format", "md", "--page", str(page))
    assert code == 0, err
    text = page.read_text()
    top = text[: text.index("## Findings")]
    assert "python -m bench run" in top and "0123456789abcdef" in top and "cpu (fixture)" in top
    assert "![" not in text  # no figures on a page
    code, out, err = cli("report", str(d), "--bogus")
    assert code == 2 and "bench bench" not in err and re.search(r"`python -m bench (report )?--help`", err), (
        err
    )


@pytest.mark.slow
def test_grid_findings_summary_and_page(tmp_path, monkeypatch, capsys):
    """A small real grid: its report opens with Findings from the rank tests, its terminal summary fits
    100 columns, and `bench report GRID --page` writes a page with the command on top."""
    from bench.cli import main

    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "grid",
                "--preset",
                "smoke",
                "--datasets",
                "synthetic",
                "--methods",
                "plain,diag_la,mc_dropout",
                "--seeds",
                "0-2",
                "--out",
                "g",
                "--quiet",
                "--jobs",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    summary_lines = out[out.index("== synthetic") :].splitlines()
    assert max(map(len, summary_lines)) <= 100 and summary_lines[-1].startswith("report: g/")
    (grid,) = (tmp_path / "g").iterdir()
    md = (grid / "report.md").read_text()
    assert re.findall(r"^## .*$", md, re.M)[0] == "## Findings"
    assert "Best method per criterion across the grid" in md and "over 3 dataset x seed blocks" in md
    assert main(["report", str(grid), "--format", "md", "--page", "results/grid.md"]) == 0
    page = (tmp_path / "results" / "grid.md").read_text()
    assert page.index("bench grid") < page.index("## Findings")
    machine = re.search(r"\*\*machine\*\*: (.*)", page).group(1)
    assert "cores" in machine and "executor local" in machine  # from a finished cell, not "unknown"


@pytest.mark.slow
def test_a_real_tiny_run_prints_at_most_100_columns_and_a_small_report(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(
        "run",
        "--preset",
        "smoke",
        "--dataset",
        "synthetic",
        "--methods",
        "plain,diag_la,mc_dropout",
        "--out",
        "runs",
        "--quiet",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert max(map(len, lines)) <= 100, out
    assert lines[-1].startswith("report: runs/") and lines[-1].endswith("report.html")
    assert (tmp_path / lines[-1].removeprefix("report: ")).stat().st_size <= 3_000_000


def test_near_ood_sets_declared_by_the_dataset_are_near():
    """A run that records the dataset's near-OOD sets (e.g. the other fine-grained set) files them under
    near-OOD; a folder without the record keeps only the held-out classes as near."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = make_run(tmp, n=40)
        titles = {c.key: c.title for c in criteria(RunFolder(d))}
        assert titles["ood_heldout"].startswith("Near") and titles["ood_noise"].startswith("Far")
        meta = json.loads((d / "config.json").read_text())
        meta["near_ood_sets"] = ["heldout", "noise"]
        RunWriter(d).write_config({k: v for k, v in meta.items() if k != "status"}, meta["status"])
        titles = {c.key: c.title for c in criteria(RunFolder(d))}
        assert titles["ood_noise"] == "Near-OOD detection (noise)"


def test_results_page_states_the_raw_feature_reference():
    """A frozen-trunk run's results page states its raw features' mAP@1 and Recall@1 with their CIs."""
    from reports.page import _raw_reference

    meta = {"features": {"raw_features": {"mAP@1": [0.662, 0.631, 0.691], "Recall@1": [0.662, 0.631, 0.691]}}}
    assert _raw_reference(meta) == "mAP@1 0.662 [0.631, 0.691], Recall@1 0.662 [0.631, 0.691]"
    assert _raw_reference({}) is None  # not a frozen-trunk run: no line


def test_cd_diagram_labels_fit_in_the_figure():
    """Long method names (a grid axis appends "[recipe=tuned]") stay inside the figure, not cut off."""
    pytest.importorskip("scikit_posthocs")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from reports.rank_tests import cd_diagram

    rng = np.random.default_rng(0)
    names = [f"laplace_torch_{i} [recipe=tuned]" for i in range(12)]
    x = pd.DataFrame(rng.normal(size=(6, 12)) + np.arange(12) * 0.3, columns=names)
    fig = cd_diagram(friedman_nemenyi(x, higher=True), "Near-OOD detection (heldout)")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    r = canvas.get_renderer()
    width = fig.get_size_inches()[0] * fig.dpi
    labels = [t for t in fig.axes[0].texts if "recipe" in t.get_text()]
    assert len(labels) == 12
    for t in labels:
        box = t.get_window_extent(r)
        assert box.x0 >= 0 and box.x1 <= width, (t.get_text(), box.x0, box.x1, width)
