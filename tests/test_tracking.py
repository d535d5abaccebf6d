"""`--log mlflow` (bench/tracking.py), against a real local MLflow store read back through MLflow's own
client: every metric with its CI bounds and every stage timing equals results.csv / timings.csv, one
nested run per (method, seed), the report as an artifact; a grid logs each cell; without MLflow the flag
is one line before any work."""

from __future__ import annotations

import math
import sys

import pandas as pd
import pytest

from bench.cli import main
from bench.run_folder import RunFolder
from bench.tracking import RUN_DIR_TAG, default_uri, log_run, metric_key

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

SMOKE = ["--preset", "smoke", "--dataset", "synthetic", "--quiet", "--workers", "1"]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _children(client, parent_id: str):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A smoke run of two methods and two seeds, with its report, logged through the CLI."""
    out = tmp_path_factory.mktemp("runs")
    assert (
        main(
            [
                "run",
                *SMOKE,
                "--methods",
                "plain,diag_la",
                "--seeds",
                "0,1",
                "--out",
                str(out),
                "--log",
                "mlflow",
            ]
        )
        == 0
    )
    run_dir = next(p for p in out.iterdir() if (p / "config.json").is_file())
    client = MlflowClient(tracking_uri=default_uri(out))
    parent = client.search_runs(
        [client.get_experiment_by_name("bench").experiment_id], filter_string="tags.`bench.kind` = 'run'"
    )
    assert len(parent) == 1
    return RunFolder(run_dir), client, parent[0]


@pytest.mark.slow  # the fixture: a smoke run of 2 methods x 2 seeds and its report (~25 s loaded)
def test_every_metric_ci_and_timing_equals_the_run_folder(logged):
    run, client, parent = logged
    children = _children(client, parent.info.run_id)
    assert sorted((c.data.params["method"], int(c.data.params["seed"])) for c in children) == [
        ("diag_la", 0),
        ("diag_la", 1),
        ("plain", 0),
        ("plain", 1),
    ]
    res, tim = run.results, run.timings
    for c in children:
        m, s = c.data.params["method"], int(c.data.params["seed"])
        got = c.data.metrics
        rows = res[(res["method"] == m) & (res["seed"] == s)]
        assert len(rows) > 50
        for r in rows.itertuples(index=False):
            key = metric_key(r.metric)
            for suffix, want in (("", r.value), (".ci_low", r.ci_low), (".ci_high", r.ci_high)):
                assert _same(got[key + suffix], want), (m, s, r.metric, suffix)
        for r in tim[(tim["method"] == m) & (tim["seed"] == s)].itertuples(index=False):
            assert got[f"time/{r.stage}"] == r.seconds
        assert len(got) == 3 * len(rows) + ((tim["method"] == m) & (tim["seed"] == s)).sum()
    assert (
        "fit.prior_precision" in next(c for c in children if c.data.params["method"] == "diag_la").data.params
    )


@pytest.mark.slow
def test_parent_holds_config_timings_and_the_report(logged):
    run, client, parent = logged
    assert parent.data.params["dataset"] == "synthetic" and parent.data.params["epochs"] == "1"
    assert parent.data.tags[RUN_DIR_TAG] == str(run.path.resolve())
    base = run.timings[run.timings["method"] == "base"]
    assert len(base) == 2 and all(
        parent.data.metrics[f"time/base/seed{r.seed}/{r.stage}"] == r.seconds
        for r in base.itertuples(index=False)
    )
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.html", "results.csv", "config.json", "plots"} <= names
    local = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id,
        artifact_path="results.csv",
        tracking_uri=client._tracking_client.tracking_uri,
    )
    pd.testing.assert_frame_equal(pd.read_csv(local), run.results)


@pytest.mark.slow
def test_logging_again_adds_nothing(logged):
    run, client, parent = logged
    assert log_run(run.path, default_uri(run.path.parent)) == parent.info.run_id
    assert len(_children(client, parent.info.run_id)) == 4


def test_metric_keys_are_valid_and_distinct():
    from mlflow.utils.validation import _validate_metric_name

    from bench.evaluate import score_metric_names, uncertainty_metric_names

    names = [
        "mAP@1",
        "mAP@5",
        "R@1",
        "precision@1",
        *uncertainty_metric_names(["noise", "heldout"]),
        *(f"{m}:{s}" for m in score_metric_names(["noise", "heldout"]) for s in ("trace", "top1_flip")),
    ]
    keys = [metric_key(n) for n in names]
    assert len(set(keys)) == len(names)
    for k in keys:
        _validate_metric_name(k)
    assert metric_key("AUROC[noise]:trace") == "AUROC/noise:trace" and metric_key("mAP@5") == "mAP_at_5"


def test_without_mlflow_the_flag_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    assert main(["run", *SMOKE, "--methods", "plain", "--out", str(tmp_path), "--log", "mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "error: --log mlflow needs MLflow, an optional extra: pip install 'bench[tracking]' "
        "(or: pip install mlflow)"
    )
    assert not any(tmp_path.iterdir())  # nothing ran
    assert main(["run", *SMOKE, "--methods", "plain", "--out", str(tmp_path), "--log", "wandb"]) == 2
    assert "unknown tracker 'wandb'" in capsys.readouterr().err


@pytest.mark.slow
def test_grid_logs_each_cell(tmp_path):
    assert (
        main(
            [
                "grid",
                "--datasets",
                "synthetic",
                "--methods",
                "plain,diag_la",
                "--seeds",
                "0",
                "--preset",
                "smoke",
                "--out",
                str(tmp_path),
                "--jobs",
                "1",
                "--quiet",
                "--no-report",
                "--log",
                "mlflow",
            ]
        )
        == 0
    )
    client = MlflowClient(tracking_uri=default_uri(tmp_path))
    exp = client.get_experiment_by_name("bench").experiment_id
    (grid_run,) = client.search_runs([exp], filter_string="tags.`bench.kind` = 'grid'")
    cells = _children(client, grid_run.info.run_id)
    assert {"grid.json", "results.csv"} <= {a.path for a in client.list_artifacts(grid_run.info.run_id)}
    assert sorted(c.data.params["method"] for c in cells) == ["diag_la", "plain"]
    merged = pd.read_csv(next(p for p in tmp_path.iterdir() if (p / "grid.json").is_file()) / "results.csv")
    for c in cells:
        rows = merged[merged["method"] == c.data.params["method"]]
        assert c.data.params["cell.dataset"] == "synthetic"
        for r in rows.itertuples(index=False):
            assert _same(c.data.metrics[metric_key(r.metric)], r.value)
