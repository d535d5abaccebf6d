"""The sensitivity sweep: Laplace variants from one factorisation equal direct fits at the same settings;
the runner writes sensitivity.csv through the run folder, the report draws it, a resumed run keeps it."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from bench import sensitivity
from bench.config import preset_config
from bench.data import load_benchmark
from bench.registry import METHODS
from bench.run_folder import RunFolder, RunWriter
from bench.runner import run
from reports.render import render_report
from tests.fit_helpers import fit_method, predict_on


def test_points_cover_the_grid_and_empty_axes_hold_the_fitted_value():
    cfg = preset_config("smoke").replace(sensitivity_priors=(0.1, 1.0), sensitivity_scales=(1.0, 10.0, 100.0))
    pts = sensitivity.points(cfg)
    assert len(pts) == 6 and {(p["prior_precision"], p["likelihood_scale"]) for p in pts} == {
        (a, b) for a in (0.1, 1.0) for b in (1.0, 10.0, 100.0)
    }
    assert sensitivity.points(cfg.replace(sensitivity_scales=())) == [
        {"prior_precision": 0.1, "likelihood_scale": None},
        {"prior_precision": 1.0, "likelihood_scale": None},
    ]
    assert not preset_config("smoke").sensitivity_requested() and cfg.sensitivity_requested()
    assert sensitivity.offered(METHODS.get("diag_la")(cfg)) and not sensitivity.offered(
        METHODS.get("plain")(cfg)
    )


@pytest.mark.parametrize("name", ["full_la", "kfac_la"])
def test_a_variant_is_the_direct_fit_at_its_settings(tmp_path, name):
    cfg = preset_config("smoke").replace(dataset="synthetic", quiet=True, posterior_samples=8)
    data = load_benchmark(cfg)
    fitted, _, _ = fit_method(name, cfg, data, tmp_path)
    delta, t = fitted.diagnostics["prior_precision"], fitted.diagnostics["temperature"]
    x = data.test_id.x[:40]
    (same, v0), (other, v1) = list(
        fitted.variants([{}, {"prior_precision": 2 * delta, "likelihood_scale": 3.0}])
    )
    assert same == {"prior_precision": delta, "likelihood_scale": t, "rank_bound": 0.0}
    a, b = predict_on(v0, x), predict_on(fitted, x)
    assert torch.allclose(a.cov, b.cov, rtol=1e-5) and torch.allclose(
        a.samples, b.samples, rtol=1e-4, atol=1e-6
    )
    direct, _, _ = fit_method(
        name, cfg.replace(prior_precision=repr(2 * delta), likelihood_scale="3.0"), data, tmp_path
    )
    a, b = predict_on(v1, x), predict_on(direct, x)
    assert torch.allclose(a.cov, b.cov, rtol=1e-4, atol=1e-8) and torch.allclose(
        a.samples, b.samples, rtol=1e-3, atol=1e-5
    )


def test_the_runner_writes_the_sweep_and_the_report_draws_it(tmp_path):
    cfg = preset_config("smoke").replace(
        dataset="synthetic",
        quiet=True,
        methods=("plain", "diag_la"),
        out=str(tmp_path),
        sensitivity_priors=(0.1, 10.0),
        bootstrap_resamples=50,
        report=False,
    )
    folder = run(cfg, log=lambda *_: None)
    rf = RunFolder(folder)
    df = rf.sensitivity
    metrics = set(sensitivity.headline_metrics(["heldout", "noise"]))
    assert set(df["method"]) == {"diag_la"} and set(df["metric"]) == metrics and len(df) == 2 * len(metrics)
    assert (df["ci_low"] <= df["value"] + 1e-12).all() and (df["value"] <= df["ci_high"] + 1e-12).all()
    stages = rf.timings[rf.timings["stage"] == "sensitivity"]
    assert list(stages["method"]) == ["diag_la"]
    assert rf.meta["diagnostics"]["diag_la-seed0"]["temperature"] == 1.0
    render_report(folder, ["md"])
    md = (folder / "report.md").read_text()
    assert (
        "Sensitivity to the prior precision" in md
        and (folder / "plots" / "sensitivity_diag_la_seed0.png").is_file()
    )
    # a resumed run keeps the rows it saved with the method: the run killed before its final tables
    # (status still "running", no sensitivity.csv) is reopened and diag_la is reused, not refitted
    meta = json.loads((folder / "config.json").read_text())
    writer = RunWriter(folder, resumed=True)  # through the run folder, so its checksum manifest agrees
    writer.write_config({k: v for k, v in meta.items() if k != "status"}, "running")
    writer.manifest.remove(["sensitivity.csv", "results.csv"])
    lines: list[str] = []
    again = run(cfg, log=lines.append)
    assert again == folder and "(resuming)" in lines[0]
    assert "  diag_la (seed 0): done earlier, reused" in lines
    pd.testing.assert_frame_equal(RunFolder(again).sensitivity, df)
