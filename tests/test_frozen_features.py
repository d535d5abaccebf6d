"""A frozen trunk's features: computed once per split and cached (seeds, methods and reruns reuse
them, counted), standardised with the training split's statistics, the extraction charged once as
its own stage, and the raw features' retrieval recorded as the reference a trained head must beat;
`bench run --preset cub` runs end to end on a miniature CUB tree."""

from __future__ import annotations

import json

import pytest
import torch

from bench.config import apply_overrides, preset_config
from bench.errors import BenchError
from bench.features import FeatureCache, frozen_trunk, prepare_benchmark
from bench.run_folder import RunFolder
from bench.runner import run
from tests.fit_helpers import CPU
from tests.image_trees import cub_tree


def _cfg(tmp_path, **kw):
    return apply_overrides(
        preset_config("smoke"),
        {
            "dataset": "synthetic_color",
            "backbone": "convnet",
            "freeze_backbone": True,
            "n_train": 60,
            "n_test": 30,
            "embed_dim": 2,
            "data_workers": 0,
            "quiet": True,
            "report": False,
            "out": str(tmp_path / "runs"),
            **kw,
        },
    )


def test_features_are_extracted_once_and_reused(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, image_size=16)
    calls = []
    real = FeatureCache.get

    def counting(self, split, name):
        out = real(self, split, name)
        calls.append((name, self.extracted))
        return out

    monkeypatch.setattr(FeatureCache, "get", counting)
    data, info = prepare_benchmark(cfg, CPU, tmp_path / "cache")
    assert info["extracted"] == 1 + 1 + len(data.test_ood) and info["feature_dim"] == 64
    again, info2 = prepare_benchmark(
        cfg.replace(seed=3), CPU, tmp_path / "cache"
    )  # another seed: same features
    assert info2["extracted"] == 0 and info2["seconds"] == pytest.approx(info["seconds"])
    assert torch.equal(again.train_id.x, data.train_id.x)
    x = data.train_id.x
    assert torch.allclose(x.mean(0), torch.zeros(x.shape[1]), atol=1e-4)  # standardised with train statistics
    other, info3 = prepare_benchmark(
        cfg.replace(pooling="gem"), CPU, tmp_path / "cache"
    )  # another trunk: new key
    assert info3["extracted"] == info["extracted"]
    # the cached features are the trunk's features of the test-time inputs, standardised
    from bench.data import load_benchmark

    trunk = frozen_trunk(cfg, (3, 16, 16))
    images = load_benchmark(cfg)
    with torch.no_grad():
        f_train = trunk(images.train_id.inputs(torch.arange(len(images.train_id))))
        f_test = trunk(images.test_id.inputs(torch.arange(len(images.test_id))))
    sd = f_train.std(0)
    want = (f_test - f_train.mean(0)) / sd.clamp_min(0.1 * sd.mean())
    assert torch.allclose(data.test_id.x, want, atol=1e-4)
    ref = info["raw_features"]["mAP@1"]
    assert ref[1] <= ref[0] <= ref[2]


def test_run_charges_extraction_once_and_records_the_raw_reference(tmp_path):
    cfg = _cfg(tmp_path, methods=("plain", "diag_la", "deep_ensemble"), seeds=(0, 1), ensemble_size=2)
    folder = RunFolder(run(cfg, log=lambda *a: None))
    t = folder.timings
    ext = t[t["stage"] == "extract"]
    assert len(ext) == 1 and ext["method"].iloc[0] == "base"  # once per run, not per seed or method
    meta = folder.meta
    assert (
        meta["features"]["extracted"] == 4 and "M heads" in meta["features"]["note"]
    )  # train, test, heldout, noise
    assert set(meta["features"]["raw_features"]) >= {"mAP@1", "Recall@1"}
    rerun = RunFolder(run(cfg.replace(methods=("plain", "mc_dropout")), log=lambda *a: None))
    assert (
        rerun.meta["features"]["extracted"] == 0 and rerun.meta["models_trained"] == 2
    )  # MC dropout x 2 seeds


def test_freezing_needs_a_trunk(tmp_path):
    with pytest.raises(BenchError, match="no trunk"):
        frozen_trunk(_cfg(tmp_path, backbone="mlp"), (3, 16, 16))


def test_cub_preset_end_to_end_on_a_fake_tree(tmp_path, cli):
    pytest.importorskip("efficientnet_lite_pytorch")
    root = cub_tree(tmp_path / "data", per_class=1)
    code, out, err = cli(
        "run",
        "--preset",
        "cub",
        "--data-dir",
        str(root),
        "--epochs",
        "1",
        "--methods",
        "plain,mc_dropout",
        "--out",
        str(tmp_path / "runs"),
        "--quiet",
        "--no-report",
        "--set",
        "image_size=32",
        "--set",
        "embed_dim=4",
        "--set",
        "batch_size=16",
        "--set",
        "dropout_passes=3",
        "--set",
        "far_ood=synthetic_color_noise",
        "--set",
        "data_workers=0",
        "--set",
        "n_train=24",
        "--set",
        "n_test=20",
    )
    assert code == 0, err
    folder = RunFolder(next(p for p in (tmp_path / "runs").iterdir() if (p / "config.json").is_file()))
    assert folder.meta["data_label"] == "CUB-200-2011" and folder.meta["data"]["test_id"] == 20
    res = folder.results
    assert set(res["method"]) == {"plain", "mc_dropout"} and "AUROC[noise]" in set(res["metric"])
    assert json.loads((folder.path / "config.json").read_text())["config"]["protocol"] == "zero_shot"
