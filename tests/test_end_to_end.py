"""End-to-end wiring: a real tiny run's results.csv, recomputed from the per-query arrays it saved
(embeddings, labels, score vectors) with independent code: sklearn's NearestNeighbors and ranking
metrics, scipy's Spearman and pytorch-metric-learning's AccuracyCalculator. A runner -> evaluate ->
run-folder wiring bug (a score of one query set under another's name, arrays of one method saved under
another, rows shifted between metrics) breaks it even where each metric alone is right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from sklearn.neighbors import NearestNeighbors

from bench.config import preset_config
from bench.run_folder import RunFolder
from bench.runner import run

KS = (1, 3, 5, 7)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> RunFolder:
    cfg = preset_config("smoke").replace(
        dataset="synthetic",
        methods=("plain", "diag_la"),
        quiet=True,
        report=False,
        out=str(tmp_path_factory.mktemp("runs")),
        bootstrap_resamples=50,
        ks=KS,
    )
    return RunFolder(run(cfg, log=lambda *_: None))


def _value(rf: RunFolder, method: str, metric: str) -> float:
    row = rf.results[(rf.results["method"] == method) & (rf.results["metric"] == metric)]
    assert len(row) == 1, (method, metric)
    return float(row["value"].iloc[0])


def _close(saved: float, ref: float) -> bool:
    return bool(np.isclose(saved, ref, rtol=1e-5, atol=2e-6))  # results.csv keeps 6 significant digits


def _relevance(emb: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """rel [N, k] of each query's k nearest other items (leave-one-out), by sklearn."""
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(emb).kneighbors(emb)
    own = idx == np.arange(len(emb))[:, None]
    idx = np.array([row[~mask][:k] for row, mask in zip(idx, own)])
    return (labels[idx] == labels[:, None]).astype(float)


@pytest.mark.parametrize("method", ["plain", "diag_la"])
def test_retrieval_rows_recomputed_from_the_saved_embeddings(tiny_run, method):
    a = tiny_run.perquery(method, 0)
    emb, labels = a["id_mean"].astype(np.float64), a["id_labels"]
    rel = _relevance(emb, labels, max(KS))
    relevant = np.bincount(labels)[labels] - 1
    prec = rel.cumsum(1) / np.arange(1, max(KS) + 1)
    for k in KS:
        hits = (prec[:, :k] * rel[:, :k]).sum(1)
        assert _close(_value(tiny_run, method, f"Recall@{k}"), (rel[:, :k].sum(1) > 0).mean()), k
        assert _close(
            _value(tiny_run, method, f"mAP@{k}"), (hits / np.maximum(np.minimum(relevant, k), 1)).mean()
        ), k
        pml = np.divide(hits, rel[:, :k].sum(1), out=np.zeros(len(hits)), where=rel[:, :k].sum(1) > 0)
        assert _close(_value(tiny_run, method, f"mAP_pml@{k}"), pml.mean()), k
    calc = AccuracyCalculator(
        include=("precision_at_1",), knn_func=CustomKNN(LpDistance(normalize_embeddings=False))
    )
    ref = calc.get_accuracy(torch.from_numpy(a["id_mean"]), torch.from_numpy(labels), ref_includes_query=True)
    assert _close(_value(tiny_run, method, "mAP@1"), ref["precision_at_1"])


def test_uncertainty_rows_recomputed_from_the_saved_score_vectors(tiny_run):
    a = tiny_run.perquery("diag_la", 0)
    rel = _relevance(a["id_mean"].astype(np.float64), a["id_labels"], 1)[:, 0]  # correct at rank 1
    scores = sorted({k.split("__")[2] for k in a if k.startswith("score__")})
    assert {"trace", "top1_flip"} <= set(scores)
    checked = 0
    for s in scores:
        sid = a[f"score__id__{s}"]
        assert _close(_value(tiny_run, "diag_la", f"error_AUROC:{s}"), roc_auc_score(1 - rel, sid)), s
        assert _close(_value(tiny_run, "diag_la", f"Spearman:{s}"), spearmanr(sid, rel).statistic), s
        for ood in ("heldout", "noise"):
            sood = a[f"score__{ood}__{s}"]
            y, x = np.r_[np.zeros(len(sid)), np.ones(len(sood))], np.r_[sid, sood]
            fpr, tpr, _ = roc_curve(y, x)
            for metric, ref in (
                (f"AUROC[{ood}]", roc_auc_score(y, x)),
                (f"AUPR[{ood}]", average_precision_score(y, x)),
                (f"FPR95[{ood}]", fpr[np.argmax(tpr >= 0.95)]),
                (f"var_ratio[{ood}]", sood.mean() / sid.mean()),
            ):
                assert _close(_value(tiny_run, "diag_la", f"{metric}:{s}"), ref), (metric, s)
                checked += 1
    assert checked == 8 * len(scores)
    # the headline (unsuffixed) OOD rows are the configured ood_score's, the ID rows the id_score's
    cfg = tiny_run.config
    for metric in ("AUROC[heldout]", "AUPR[noise]", "FPR95[heldout]"):
        assert _value(tiny_run, "diag_la", metric) == _value(
            tiny_run, "diag_la", f"{metric}:{cfg['ood_score']}"
        )
    for metric in ("ECE", "AUSE", "AURG"):
        assert _value(tiny_run, "diag_la", metric) == _value(
            tiny_run, "diag_la", f"{metric}:{cfg['id_score']}"
        )
    # the embeddings saved for each OOD set are that set's: as many rows as its labels and score vectors
    for ood in ("heldout", "noise"):
        assert len(a[f"ood_{ood}_mean"]) == len(a[f"ood_{ood}_labels"]) == len(a[f"score__{ood}__trace"])
