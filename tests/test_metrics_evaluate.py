"""evaluate(): uncertainty metrics for methods with a variance, NaN (n/a) for deterministic ones,
and the end-to-end smoke run writing them to results.csv and the per-query files."""

import numpy as np
import pandas as pd
import pytest
import torch

from bench.config import preset_config
from bench.conventions import score_metric
from bench.data import Dataset, Split
from bench.errors import BenchError
from bench.evaluate import evaluate, resolve_scores, score_metric_names, uncertainty_metric_names
from bench.method import EmbeddingPrediction
from bench.registry import SCORES

EXTRAS = {
    "reliability_conf",
    "reliability_acc",
    "reliability_count",
    "confidence",
    "sparsification_frac",
    "sparsification_curve",
    "sparsification_oracle",
    "sparsification_random",
}


@pytest.fixture
def toy():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 4
    x = torch.randn(120, 2, generator=g) * 0.6 + torch.stack([y % 2, y // 2], 1).float() * 2
    data = Dataset(
        "toy",
        Split(x, y),
        Split(x, y),
        {
            "far": Split(torch.zeros(50, 2), torch.zeros(50, dtype=torch.long)),
            "near": Split(torch.zeros(30, 2), torch.zeros(30, dtype=torch.long)),
        },
    )
    cfg = preset_config("smoke").replace(bootstrap_resamples=100, ks=(1, 3))
    return data, cfg, x


def test_deterministic_method_gets_nan_uncertainty_metrics(toy):
    data, cfg, x = toy
    ev = evaluate(
        EmbeddingPrediction(x), {k: EmbeddingPrediction(s.x) for k, s in data.test_ood.items()}, data, cfg
    )
    names = uncertainty_metric_names(["far", "near"])
    assert list(ev.scalars)[: len(names)] == names
    assert all(np.isnan(ev.scalars[n]).all() for n in names)
    for score in SCORES.names():  # predictive scores are n/a, the predictive-free baseline is not
        vals = [ev.scalars[score_metric(m, score)] for m in score_metric_names(["far", "near"], cfg.ks)]
        assert np.isnan(vals).all() == SCORES.meta(score)["predictive"], score
    assert not ev.extras
    rows = {r["metric"]: r for r in ev.rows(cfg)}
    assert np.isfinite(rows["mAP@1"]["value"]) and np.isnan(rows["AUROC[far]"]["value"])


def test_uncertain_method_gets_every_metric(toy):
    data, cfg, x = toy
    pred_id = EmbeddingPrediction(
        x,
        var=torch.full((120, 2), 0.1) + torch.rand(120, 2, generator=torch.Generator().manual_seed(1)) * 0.01,
    )
    pred_ood = {
        "far": EmbeddingPrediction(
            torch.zeros(50, 2), var=torch.full((50, 2), 5.0)
        ),  # far above every ID variance
        "near": EmbeddingPrediction(torch.zeros(30, 2), var=torch.full((30, 2), 0.105)),
    }  # inside the ID range
    ev = evaluate(pred_id, pred_ood, data, cfg)
    assert list(ev.scalars)[:8] == uncertainty_metric_names(["far", "near"])[:8]
    assert ev.scalars["AUROC[far]"] == (1.0, 1.0, 1.0) and ev.scalars["FPR95[far]"][0] == 0.0
    assert ev.scalars["var_ratio[far]"][0] == pytest.approx(10.0 / pred_id.var.sum(1).mean().item())
    assert 0.2 < ev.scalars["AUROC[near]"][0] < 0.8
    for name in ("ECE", "AUSE"):
        v, lo, hi = ev.scalars[name]
        assert np.isfinite([v, lo, hi]).all() and lo <= hi and v >= 0
    assert set(ev.extras) == EXTRAS
    assert ev.extras["sparsification_curve"][0] == pytest.approx(ev.per_query["mAP@1"].mean())


def test_non_finite_variance_is_an_error(toy):
    data, cfg, x = toy
    var = torch.ones(120, 2)
    var[3, 1] = float("nan")
    with pytest.raises(BenchError, match="non-finite predicted variance for 1 of 120"):
        evaluate(EmbeddingPrediction(x, var=var), {}, data, cfg)


def test_smoke_run_plain_writes_nan_uncertainty_rows(cli, tmp_path):
    code, out, err = cli(
        "run",
        "--preset",
        "smoke",
        "--dataset",
        "synthetic",
        "--quiet",
        "--no-report",
        "--methods",
        "plain",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    run = next(d for d in tmp_path.iterdir() if d.name != "cache")
    res = pd.read_csv(run / "results.csv")
    got = dict(zip(res["metric"], res["value"]))
    for name in uncertainty_metric_names(["heldout", "noise"]):
        assert name in got and np.isnan(got[name])
    assert np.isfinite(got["mAP@1"]) and np.isfinite(res.loc[res["metric"] == "mAP@1", "ci_low"]).all()
    with np.load(run / "perquery" / "plain-seed0.npz") as z:
        assert "pq_mAP@1" in z.files and not any(k.startswith("extra_") for k in z.files)


def test_headline_metrics_are_the_default_scores_and_diagnostics_match_scipy(toy):
    from scipy import stats

    data, cfg, x = toy
    g = torch.Generator().manual_seed(2)
    pred_id = EmbeddingPrediction(x, var=0.05 + torch.rand(120, 2, generator=g) * 0.3)
    pred_ood = {
        "far": EmbeddingPrediction(torch.zeros(50, 2) + 5, var=torch.full((50, 2), 1.0)),
        "near": EmbeddingPrediction(torch.zeros(30, 2), var=torch.full((30, 2), 0.2)),
    }
    cfg = cfg.replace(id_score="dist_var", ood_score="top1_flip", scores=("trace",))
    assert resolve_scores(cfg) == ["trace", "dist_var", "top1_flip"]
    ev = evaluate(pred_id, pred_ood, data, cfg)
    for m in ("ECE", "AUSE", "AURG"):
        assert ev.scalars[m] == ev.scalars[score_metric(m, "dist_var")]
    for m in ("AUROC[far]", "FPR95[near]", "var_ratio[far]"):
        assert ev.scalars[m] == ev.scalars[score_metric(m, "top1_flip")]
    assert not any(k.endswith(":knn_disagreement") for k in ev.scalars)  # not asked for
    assert set(ev.scores) == {
        (s, n) for s in ("id", "far", "near") for n in ("trace", "dist_var", "top1_flip")
    }
    u, c, y = ev.scores[("id", "trace")], ev.per_query["mAP@1"], data.test_id.y.numpy()
    rho, lo, hi = ev.scalars["Spearman:trace"]
    assert rho == pytest.approx(stats.spearmanr(u, c).statistic) and lo <= rho <= hi
    within = np.nanmean([stats.spearmanr(u[y == k], c[y == k]).statistic for k in np.unique(y)])
    assert ev.scalars["Spearman_within:trace"][0] == pytest.approx(within)
    cover = ev.diagnostics["score_candidate_coverage"]
    assert set(cover) == {"id", "far", "near"} and all(0.0 <= v <= 1.0 for v in cover.values())
