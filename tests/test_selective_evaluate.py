"""evaluate() gives every (method, score) the selective metrics, computed from the saved score vector
and the per-query retrieval vectors, and keeps `error_AUROC` as an alias row of `R-AUROC`."""

import numpy as np
import pytest
import torch

from bench.config import preset_config
from bench.conventions import score_metric
from bench.data import Dataset, Split
from bench.evaluate import ALIASES, evaluate, score_metric_names, selective_losses
from bench.method import EmbeddingPrediction
from bench.metrics.selective import SELECTIVE_METRICS, selective_statistics


@pytest.fixture
def toy():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 4
    x = torch.randn(120, 2, generator=g) * 0.9 + torch.stack([y % 2, y // 2], 1).float() * 2
    data = Dataset(
        "toy", Split(x, y), Split(x, y), {"far": Split(torch.zeros(20, 2), torch.zeros(20, dtype=torch.long))}
    )
    cfg = preset_config("smoke").replace(
        bootstrap_resamples=50, ks=(1, 3), scores=("trace", "knn_disagreement")
    )
    return data, cfg, x


def test_losses():
    assert selective_losses((1, 3, 5, 7)) == ["mAP@1", "mAP@7"] and selective_losses((1,)) == ["mAP@1"]


def test_every_score_gets_the_selective_metrics_of_its_vector(toy):
    data, cfg, x = toy
    var = 0.05 + torch.rand(120, 2, generator=torch.Generator().manual_seed(1))
    ev = evaluate(
        EmbeddingPrediction(x, var=var),
        {"far": EmbeddingPrediction(torch.zeros(20, 2), var=var[:20])},
        data,
        cfg,
    )
    names = score_metric_names(["far"], cfg.ks)
    for score in ("trace", "knn_disagreement", "top1_flip"):
        u = ev.scores[("id", score)]
        want = selective_statistics(u, np.stack([1 - ev.per_query["mAP@1"], 1 - ev.per_query["mAP@3"]]))
        got = [
            ev.scalars[score_metric(m, score)]
            for m in (*SELECTIVE_METRICS, *(f"{m}(mAP@3)" for m in SELECTIVE_METRICS))
        ]
        np.testing.assert_allclose([v for v, _, _ in got], want, rtol=1e-12)
        assert all(lo <= v <= hi for v, lo, hi in got)
        for old, new in ALIASES.items():
            assert ev.scalars[score_metric(old, score)] == ev.scalars[score_metric(new, score)]
        assert all(score_metric(m, score) in ev.scalars for m in names)
    rows = [r["metric"] for r in ev.rows(cfg)]
    assert "AURC(mAP@3):trace" in rows and "error_AUROC:trace" in rows and "R-AUROC:trace" in rows


def test_a_deterministic_method_gets_nan_for_predictive_scores_only(toy):
    data, cfg, x = toy
    ev = evaluate(EmbeddingPrediction(x), {"far": EmbeddingPrediction(torch.zeros(20, 2))}, data, cfg)
    assert np.isnan(ev.scalars["AURC:trace"]).all() and np.isnan(ev.scalars["E-AURC(mAP@3):trace"]).all()
    assert np.isfinite(ev.scalars["AURC:knn_disagreement"]).all()
