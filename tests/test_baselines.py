"""MC dropout and deep ensemble baselines: stochastic passes, member seeds and weights, Procrustes
alignment, cache reuse, determinism, and an end-to-end smoke run."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.alignment import Alignment, fit_procrustes
from bench.config import apply_overrides, preset_config
from bench.data import load_benchmark
from bench.errors import BenchError
from bench.method import EmbeddingPrediction, FitContext
from bench.model import build_model
from bench.model_cache import ModelCache
from bench.timing import StageTimer
from methods.deep_ensemble import DeepEnsemble, member_seed, member_seeds
from methods.mc_dropout import MASK_SEED_OFFSET, MCDropout, mc_samples, seeded_dropout
from tests.fit_helpers import CPU, fit_method, predict_on, run_device


def random_orthogonal(d: int, seed: int, det: float) -> torch.Tensor:
    """A random orthogonal d x d matrix with determinant `det` (+1 rotation, -1 reflection)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) * det < 0:
        q[:, 0] = -q[:, 0]
    return q


@pytest.fixture(scope="module")
def smoke():
    """(cfg, data) of the smoke preset on the synthetic dataset."""
    cfg = preset_config("smoke").replace(dataset="synthetic", quiet=True)
    return cfg, load_benchmark(cfg)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


# ---------------------------------------------------------------- MC dropout


class _ChunkedSplit:
    """A split read in chunks of `chunk` items (as an image split is), for `predict_split`."""

    in_memory = False

    def __init__(self, x: torch.Tensor, chunk: int) -> None:
        self.x, self.chunk = x, chunk

    def chunks(self):
        return iter(self.x.split(self.chunk))


def test_mc_dropout_chunked_query_set_draws_one_mask_stream(smoke, cache_root):
    """Read in chunks, a query set's items at the same offset of different chunks get independent masks
    (one stream across the chunks, not one re-seeded per chunk), deterministically; the first chunk's
    draws equal those of the query set predicted in one call."""
    from bench.runner import predict_split

    cfg, data = smoke
    m, _, _ = fit_method("mc_dropout", cfg, data, cache_root)
    x = data.test_id.x[:40]
    twice = torch.cat([x[:20], x[:20]])  # the same items at the same offsets of two chunks
    with torch.no_grad():
        p = predict_split(m, _ChunkedSplit(twice, 20), CPU)
        again = predict_split(m, _ChunkedSplit(twice, 20), CPU)
        whole = m.predict(x[:20])
    assert torch.equal(p.samples, again.samples)
    torch.testing.assert_close(p.samples[:, :20], whole.samples)
    assert not torch.allclose(p.samples[:, :20], p.samples[:, 20:])  # re-seeding per chunk made them equal
    assert m._stream is None  # the stream ends with the query set


def test_stochastic_passes_differ_when_active_and_match_eval_mode_otherwise():
    net = build_model(preset_config("smoke"), (8,), seed=3, dropout=0.2).eval()
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_on = mc_samples(net, x, 5, torch.Generator().manual_seed(11), active=True)
        z_off = mc_samples(net, x, 5, torch.Generator().manual_seed(11), active=False)
        net.eval()
        ref_eval = net(x)
        net.train()
        torch.manual_seed(0)
        a, b = net(x), net(x)  # nn.Dropout in train mode: two passes differ
        net.eval()
    assert z_on.shape == (5, 50, preset_config("smoke").embed_dim)
    for t in range(1, 5):
        assert not torch.allclose(z_on[0], z_on[t])  # train-mode passes differ
        assert torch.equal(z_off[0], z_off[t])  # eval-mode passes are identical
    assert torch.allclose(z_off[0], ref_eval)
    assert not torch.allclose(a, b)
    pred = EmbeddingPrediction.from_samples(z_off, with_cov=True)
    assert pred.var.abs().max() < 1e-12 and pred.cov.abs().max() < 1e-12  # zero up to rounding of the mean


def test_dropout_masks_drop_about_p_and_rescale():
    """Inverted dropout: about p of the units are zeroed and kept ones are scaled by 1/(1-p)."""
    p = 0.3
    drop = torch.nn.Dropout(p)
    x = torch.ones(2000, 64)
    with seeded_dropout(drop.eval(), torch.Generator().manual_seed(5)):
        out = drop(x)
    zero = (out == 0).float().mean().item()
    assert abs(zero - p) < 0.01
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p)))


def test_moments_match_numpy():
    z = torch.randn(7, 20, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pred = EmbeddingPrediction.from_samples(z, with_cov=True)
    zn = z.numpy()
    np.testing.assert_allclose(pred.mean.numpy(), zn.mean(0))
    np.testing.assert_allclose(pred.var.numpy(), zn.var(0, ddof=1))
    np.testing.assert_allclose(pred.cov[4].numpy(), np.cov(zn[:, 4, :].T, ddof=1))


def test_mc_dropout_fit_predict_deterministic_and_cached(smoke, cache_root):
    cfg, data = smoke
    m1, cache1, timer1 = fit_method("mc_dropout", cfg, data, cache_root)
    assert [layer.p for layer in m1.model.modules() if isinstance(layer, torch.nn.Dropout)] == [
        MCDropout.option(cfg, "dropout")
    ] * len(cfg.hidden)
    x = data.test_id.x
    with torch.no_grad():
        p1, p1b = predict_on(m1, x), predict_on(m1, x)
        m2, cache2, timer2 = fit_method("mc_dropout", cfg, data, cache_root)
        p2 = predict_on(m2, x)
    assert cache2.trained == 0  # loaded, not retrained
    assert timer2.for_method("mc_dropout")["train"] == pytest.approx(timer1.for_method("mc_dropout")["train"])
    for a, b in ((p1, p1b), (p1, p2)):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)
    assert p1.var.shape == p1.mean.shape == (len(x), cfg.embed_dim)
    assert (p1.var > 0).all()
    assert p1.cov.shape == (len(x), cfg.embed_dim, cfg.embed_dim)
    assert torch.allclose(torch.diagonal(p1.cov, dim1=-2, dim2=-1), p1.var, atol=1e-6)
    # another run seed draws other masks
    assert m1.mask_seed == 0 * 1_000_003 + MASK_SEED_OFFSET
    with torch.no_grad():
        dev = run_device()
        other = mc_samples(
            m1.model,
            x.to(dev),
            MCDropout.option(cfg, "dropout_passes"),
            torch.Generator(device=dev).manual_seed(1_000_003 + MASK_SEED_OFFSET),
        ).cpu()
    assert not torch.equal(other.mean(0), p1.mean)


def test_mc_dropout_rejects_zero_rate(smoke, tmp_path):
    cfg, data = smoke
    with pytest.raises(BenchError, match=r"dropout in \(0, 1\)"):
        MCDropout.validate(apply_overrides(cfg, {"dropout": 0.0}))


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("det", [1.0, -1.0])
@pytest.mark.parametrize("d", [2, 5])
def test_procrustes_recovers_known_isometry(d, det):
    g = torch.Generator().manual_seed(d)
    src = torch.randn(200, d, generator=g, dtype=torch.float64) * 3
    q = random_orthogonal(d, seed=7 + d, det=det)
    t = torch.randn(d, generator=g, dtype=torch.float64) * 5
    tgt = src @ q + t
    a = fit_procrustes(src, tgt)
    # recovered map equals z -> z q + t on every point, including points not used to fit it
    new = torch.randn(30, d, generator=g, dtype=torch.float64)
    assert torch.allclose(a.apply(new), new @ q + t, atol=1e-9)
    assert torch.allclose(a.rotation, q, atol=1e-9)
    assert torch.det(a.rotation).item() == pytest.approx(det)
    assert a.residual < 1e-9 and a.relative_residual < 1e-9
    # with noise the fit stays close and the residual reports the noise level
    noisy = tgt + 0.05 * torch.randn(tgt.shape, generator=g, dtype=torch.float64)
    b = fit_procrustes(src, noisy)
    assert torch.allclose(b.rotation, q, atol=0.02)
    assert b.residual == pytest.approx(0.05 * math.sqrt(d), rel=0.2)


def test_procrustes_without_centering_and_bad_input():
    src = torch.randn(50, 3, generator=torch.Generator().manual_seed(2))
    q = random_orthogonal(3, seed=4, det=1.0).float()
    a = fit_procrustes(src, src @ q, center=False)
    assert torch.allclose(a.rotation, q, atol=1e-5) and torch.count_nonzero(a.source_mean) == 0
    with pytest.raises(BenchError, match=r"same shape, got \(50, 3\) and \(50, 2\)"):
        fit_procrustes(src, src[:, :2])
    with pytest.raises(BenchError, match="at least 2 paired points, got 1"):
        fit_procrustes(src[:1], src[:1])
    bad = src.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(BenchError, match="non-finite"):
        fit_procrustes(bad, src)
    ident = Alignment.identity(3)
    assert torch.equal(ident.apply(src), src)


def test_ensemble_alignment_removes_isometric_disagreement(smoke, cache_root):
    """A member that is an exact rotated/reflected/shifted copy of member 0 adds no variance after
    alignment (while its raw coordinates disagree wildly)."""
    cfg, data = smoke
    cfg = apply_overrides(cfg, {"ensemble_size": 3})
    cache = ModelCache(cache_root, cfg, data.train_id, CPU)
    base, _, _ = cache.get(0, 0.0)
    copies = [base]
    for k, det in ((1, -1.0), (2, 1.0)):
        q = random_orthogonal(cfg.embed_dim, seed=k, det=det).float()
        t = torch.full((cfg.embed_dim,), 3.0 * k)
        net = copy.deepcopy(base)
        last = net.net[-1]
        with torch.no_grad():  # z' = z q + t  <=>  W' = q^T W, b' = b q + t
            last.weight.copy_(q.T @ last.weight)
            last.bias.copy_(last.bias @ q + t)
        copies.append(net)
    nets = dict(zip(member_seeds(0, 3), copies))
    timer = StageTimer(CPU)
    ctx = FitContext(
        cfg=cfg,
        data=data,
        device=CPU,
        timer=timer,
        method="deep_ensemble",
        train_model=lambda seed, dropout=0.0, charge_to=None: nets[seed],
        seed=0,
    )
    ens = DeepEnsemble(cfg)
    ens.fit(ctx)
    x = data.test_id.x
    with torch.no_grad():
        raw = ens.member_embeddings(x, aligned=False)
        pred = ens.predict(x)
        ref = base(x)
    assert raw.var(0).mean() > 1.0
    assert torch.allclose(pred.mean, ref, atol=1e-4)
    assert pred.var.max() < 1e-8
    assert ens.diagnostics["align_det"][1] == pytest.approx(-1.0)
    assert max(ens.diagnostics["align_relative_rms"]) < 1e-5


# ---------------------------------------------------------------- deep ensemble


def test_member_seeds_deterministic_and_distinct():
    s = member_seeds(0, 5)
    assert s[0] == 0 and len(set(s)) == 5 and s == member_seeds(0, 5)
    assert member_seeds(3, 3)[0] == 3
    firsts = {member_seed(seed, m) for seed in range(20) for m in range(1, 6)}
    assert len(firsts) == 100 and not firsts & set(range(20))  # no collisions with small run seeds
    assert all(0 <= v < 2**31 for v in firsts)


def test_ensemble_members_differ_reuse_cache_and_predict_deterministically(smoke, cache_root):
    cfg, data = smoke
    e1, cache1, timer1 = fit_method("deep_ensemble", cfg, data, cache_root)
    assert len(e1.members) == DeepEnsemble.option(cfg, "ensemble_size")
    sd = [m.state_dict() for m in e1.members]
    for other in sd[1:]:
        assert list(other) == list(sd[0])  # same architecture
        assert all(other[k].shape == sd[0][k].shape for k in sd[0])
        assert any(not torch.equal(other[k], sd[0][k]) for k in sd[0])  # different weights
    assert not any(isinstance(layer, torch.nn.Dropout) for m in e1.members for layer in m.modules())
    # member 0 is the base model: same cache entry as plain's base
    base, _, _ = ModelCache(cache_root, cfg, data.train_id, run_device()).get(cfg.seed, 0.0)
    assert all(torch.equal(base.state_dict()[k], sd[0][k]) for k in sd[0])
    seconds = [
        info["seconds"]
        for info in cache1.used.values()
        if info["key"]["dropout"] == 0.0 and info["key"]["seed"] in e1.seeds
    ]
    assert len(seconds) == DeepEnsemble.option(cfg, "ensemble_size")
    assert timer1.for_method("deep_ensemble")["train"] >= sum(seconds)  # sum of members (+ alignment)

    x = data.test_id.x
    with torch.no_grad():
        p1 = predict_on(e1, x)
        e2, cache2, timer2 = fit_method("deep_ensemble", cfg, data, cache_root)
        p2 = predict_on(e2, x)
    assert cache2.trained == 0  # every member loaded from the cache, none retrained
    assert timer2.for_method("deep_ensemble")["train"] >= sum(seconds)  # cost still charged
    assert torch.equal(p1.mean, p2.mean) and torch.equal(p1.var, p2.var)
    assert p1.var.shape == (len(x), cfg.embed_dim) and (p1.var > 0).all()
    # mean and variance are those of the aligned member embeddings
    with torch.no_grad():
        z = e1.member_embeddings(x.to(run_device())).cpu()
    assert torch.allclose(p1.mean, z.mean(0), atol=1e-6)
    assert torch.allclose(p1.var, z.var(0), atol=1e-6)


# ---------------------------------------------------------------- end to end


def test_cli_smoke_run_plain_mc_dropout_deep_ensemble(tmp_path, capsys):
    from bench.cli import main

    out = tmp_path / "runs"
    rc = main(
        [
            "run",
            "--preset",
            "smoke",
            "--dataset",
            "synthetic",
            "--methods",
            "plain,mc_dropout,deep_ensemble",
            "--out",
            str(out),
            "--no-report",
            "--quiet",
        ]
    )
    assert rc == 0
    (run_dir,) = [d for d in out.iterdir() if d.is_dir() and d.name != "cache"]
    res = pd.read_csv(run_dir / "results.csv")
    assert set(res["method"]) == {"plain", "mc_dropout", "deep_ensemble"}
    tim = pd.read_csv(run_dir / "timings.csv")
    stages = {(m, s) for m, s in zip(tim["method"], tim["stage"])}
    assert {
        ("mc_dropout", "train"),
        ("mc_dropout", "predict"),
        ("deep_ensemble", "train"),
        ("deep_ensemble", "predict"),
        ("base", "train"),
    } <= stages
    for name in ("mc_dropout", "deep_ensemble"):
        npz = np.load(run_dir / "perquery" / f"{name}-seed0.npz")
        assert npz["id_var"].shape == npz["id_mean"].shape
        assert all(f"ood_{k}_var" in npz for k in ("heldout", "noise"))
    # base + dropout net + the ensemble's members (trained side by side, member 0 as the base's twin)
    import json

    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["failures"] == [] and meta["models_trained"] == 1 + 1 + DeepEnsemble.option(
        preset_config("smoke"), "ensemble_size"
    )
