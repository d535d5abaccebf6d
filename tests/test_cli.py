"""End-to-end: the CLI on the smoke preset, the run folder it writes, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from bench.conventions import score_metric
from bench.evaluate import score_metric_names
from bench.registry import METHODS, SCORES
from bench.run_folder import RunFolder, score_array


def _run_dir(out):
    dirs = [d for d in out.iterdir() if d.is_dir() and d.name != "cache"]
    assert len(dirs) == 1
    return dirs[0]


def test_smoke_run_writes_a_complete_run_folder(cli, tmp_path):
    out = tmp_path / "runs"
    code, stdout, err = cli(
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
        "--no-report",
    )
    assert code == 0, err
    assert "mAP@1" in stdout and "plain" in stdout
    d = _run_dir(out)
    meta = json.loads((d / "config.json").read_text())
    assert meta["status"] == "complete" and meta["config"]["dataset"] == "synthetic"
    assert meta["packages"]["torch"] and meta["device"] == "cpu" and "git_commit" in meta
    res = pd.read_csv(d / "results.csv")
    assert list(res.columns) == ["method", "seed", "metric", "value", "ci_low", "ci_high"]
    assert {"mAP@1", "mAP@7", "Recall@5"} <= set(res["metric"])
    row = res[res.metric == "mAP@1"].iloc[0]
    assert row.ci_low <= row.value <= row.ci_high
    tim = pd.read_csv(d / "timings.csv")
    assert {"train", "predict", "evaluate"} <= set(tim["stage"])
    arrs = RunFolder(d).perquery("plain", 0)
    assert arrs["id_mean"].shape[1] == 2 and "pq_mAP@1" in arrs and "ood_noise_mean" in arrs
    assert "id_var" not in arrs  # plain has no uncertainty


def test_second_run_reuses_the_cached_model(cli, tmp_path):
    out = tmp_path / "runs"
    args = (
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
        "--no-report",
    )
    assert cli(*args)[0] == 0
    assert cli(*args, "--name", "again")[0] == 0
    runs = sorted(d for d in out.iterdir() if d.name != "cache")
    trained = [json.loads((d / "config.json").read_text())["models_trained"] for d in runs]
    assert sorted(trained) == [0, 1]
    a, b = (pd.read_csv(d / "results.csv") for d in runs)
    pd.testing.assert_frame_equal(a, b)


def test_unknown_method_is_one_line_and_exit_2():
    p = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--methods", "nope"], capture_output=True, text=True
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "known methods:" in lines[0] and "plain" in lines[0]
    assert "Traceback" not in p.stderr


def test_bad_flag_is_one_line(cli):
    code, _, err = cli("run", "--no-such-flag")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_list_shows_methods_datasets_presets(cli):
    code, out, _ = cli("list")
    assert code == 0
    for word in [
        *METHODS.names(),
        *SCORES.names(),
        "fashion_mnist",
        "mnist_ood",
        "synthetic",
        "smoke",
        "paper",
    ]:
        assert word in out


def test_cuda_without_cuda_is_a_clear_error(cli, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    code, _, err = cli(
        "run", "--preset", "smoke", "--dataset", "synthetic", "--device", "cuda", "--out", str(tmp_path)
    )
    assert code == 2 and "CUDA is not available" in err


@pytest.mark.parametrize("method", METHODS.names())
def test_every_registered_method_runs_the_smoke_preset(cli, tmp_path, method):
    """... and gets every score's metrics (`<metric>:<score>`, finite where the score applies: a
    method with a predictive gets every score, a deterministic one only the predictive-free ones),
    with the score vectors saved per query set."""
    out = tmp_path / "runs"
    code, stdout, err = cli(
        "run",
        "--preset",
        "smoke",
        "--dataset",
        "synthetic",
        "--methods",
        method,
        "--out",
        str(out),
        "--quiet",
        "--no-report",
    )
    assert code == 0, err
    run = _run_dir(out)
    meta = json.loads((run / "config.json").read_text())
    assert meta["status"] == "complete", meta["failures"]
    res = pd.read_csv(run / "results.csv").set_index("metric")["value"]
    with np.load(run / "perquery" / f"{method}-seed0.npz") as z:
        arrays = {k: z[k] for k in z.files}
    predictive = "id_var" in arrays
    for score in SCORES.names():
        applies = predictive or not SCORES.meta(score)["predictive"]
        vals = {m: res[score_metric(m, score)] for m in score_metric_names(["heldout", "noise"])}
        if applies:  # always defined (a Spearman is NaN for a constant score, var_ratio for a zero mean)
            assert all(
                np.isfinite(vals[m]) for m in ("ECE", "AUSE", "AURG", "AUROC[heldout]", "AUROC[noise]")
            ), score
        else:
            assert all(np.isnan(v) for v in vals.values()), score
        assert all((score_array(s, score) in arrays) == applies for s in ("id", "heldout", "noise")), score


def test_several_seeds_print_the_across_seed_mean_and_each_seed(cli, tmp_path):
    code, out, err = cli(
        "run",
        "--preset",
        "smoke",
        "--dataset",
        "synthetic",
        "--methods",
        "plain",
        "--seeds",
        "0,1",
        "--out",
        str(tmp_path),
        "--quiet",
        "--no-report",
    )
    assert code == 0, err
    assert "Mean over 2 seeds." in out  # the summary's one table holds the means over seeds
    seeds = pd.read_csv(_run_dir(tmp_path) / "seeds.csv")
    row = seeds[(seeds.method == "plain") & (seeds.metric == "mAP@1")].iloc[0]
    assert row.n_seeds == 2 and np.isnan(row.t_low) and np.isnan(row.t_high)  # too few seeds: no interval
    (plain,) = [x for x in out.splitlines() if x.startswith("plain ")]
    assert plain.split()[1].rstrip("*") == f"{row['mean']:.3f}"


def test_unknown_backbone_fails_before_any_run_folder(cli, tmp_path):
    code, _, err = cli("run", "--preset", "smoke", "--set", "backbone=nope", "--out", str(tmp_path / "runs"))
    assert code == 2 and "unknown backbone 'nope'; known backbones: " in err and "mlp" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
