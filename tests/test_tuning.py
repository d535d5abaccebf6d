"""recipe=tuned (bench.tuning): one budget for every method, validation items only, a search that
resumes after a kill, the objective against a direct computation, and a too-small split refused."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench import tuning
from bench.config import preset_config
from bench.data import DataSource, load_benchmark
from bench.errors import BenchError
from bench.method import EmbeddingPrediction
from bench.registry import DATASETS, METHODS, register_dataset, register_method
from bench.runner import run
from bench.triplet_objective import groups_of, triplet_loglik

INTERRUPT = "_interrupted_dropout"
INDEXED = "_indexed"
TEST_OFFSET = 100_000  # the index column of test items starts here (train items: 0 .. N-1)


def _cfg(out: Path, methods: tuple[str, ...], **kw):
    settings = dict(
        dataset="synthetic",
        quiet=True,
        report=False,
        methods=methods,
        out=str(out),
        bootstrap_resamples=20,
        far_ood=(),
        recipe="tuned",
        tune_trials=4,
        workers=1,
    )
    return preset_config("smoke").replace(**{**settings, **kw})


def _folder(out: Path) -> Path:
    (d,) = [d for d in out.iterdir() if d.is_dir() and d.name != "cache"]
    return d


def _complete_trials(folder: Path, method: str) -> pd.DataFrame:
    df = pd.read_csv(folder / "tuning" / f"{method}-seed0.csv")
    return df[df["state"] == "COMPLETE"]


def test_every_tunable_method_gets_the_same_budget(tmp_path):
    """A refit method (mc_dropout) and a cheap one (diag_la: one fit, then variants) both spend exactly
    tune_trials trials; plain records that it has nothing to tune; the search is charged to `tune`."""
    folder = run(_cfg(tmp_path, ("plain", "diag_la", "mc_dropout"), tune_trials=5), log=lambda *_: None)
    meta = json.loads((folder / "config.json").read_text())
    tuned = meta["tuning"]
    assert tuned["plain-seed0"]["status"] == "nothing to tune" and tuned["plain-seed0"]["trials"] == 0
    assert -math.log(4) <= tuned["plain-seed0"]["value"] <= -math.log(4 / 3), (
        "a step function: P is 1/4 or 3/4"
    )
    for m in ("diag_la", "mc_dropout"):
        assert tuned[f"{m}-seed0"]["trials"] == 5 == len(_complete_trials(folder, m))
        assert tuned[f"{m}-seed0"]["value"] == pytest.approx(
            _complete_trials(folder, m)["value"].max(), abs=1e-5
        )
        assert (folder / "tuning" / f"{m}-seed0.journal").exists()
    assert tuned["diag_la-seed0"]["trial_kind"].startswith("one fit")
    times = pd.read_csv(folder / "timings.csv")
    assert {"diag_la", "mc_dropout"} <= set(times[times["stage"] == tuning.TUNE_STAGE]["method"])
    # the chosen values are the ones the kept fit used
    diag = meta["diagnostics"]["diag_la-seed0"]
    assert diag["prior_precision"] == pytest.approx(tuned["diag_la-seed0"]["values"]["prior_precision"])


@pytest.fixture
def interrupted(tmp_path):
    """A test-only mc_dropout whose 3rd fit raises KeyboardInterrupt while the file `switch` exists."""
    from methods.mc_dropout import MCDropout

    switch, calls = tmp_path / "interrupt-now", {"n": 0}

    @register_method(INTERRUPT)
    class Interrupted(MCDropout):
        """MC dropout, killed in its third trial (a Ctrl-C, a lost node)."""

        def fit(self, ctx):
            calls["n"] += 1
            if switch.exists() and calls["n"] == 3:
                raise KeyboardInterrupt
            super().fit(ctx)

    try:
        yield switch
    finally:
        METHODS.remove(INTERRUPT)


def test_a_killed_search_resumes_to_the_budget_and_asks_what_it_would_have_asked(tmp_path, interrupted):
    interrupted.touch()
    cfg = _cfg(tmp_path / "runs", (INTERRUPT,))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, log=lambda *_: None)
    interrupted.unlink()
    folder = run(cfg, log=lambda *_: None)
    meta = json.loads((folder / "config.json").read_text())["tuning"][f"{INTERRUPT}-seed0"]
    assert meta["resumed_after"] == 2 and meta["trials"] == 4
    done = _complete_trials(folder, INTERRUPT)
    assert len(done) == 4, "the budget, not more: the killed trial is asked again, not added"
    again = run(_cfg(tmp_path / "fresh", (INTERRUPT,)), log=lambda *_: None)  # never interrupted
    assert done["params_dropout"].tolist() == pytest.approx(
        _complete_trials(again, INTERRUPT)["params_dropout"].tolist()
    )


@pytest.fixture
def indexed():
    """A 10-class feature dataset whose first column is the item's index: train i -> i, test i ->
    TEST_OFFSET + i (so any input a method sees names the item it came from)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1.5, size=(10, 8))

    def make(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, size=n)
        x = (centers[y] + rng.normal(0, 1, size=(n, 8))).astype(np.float32)
        x[:, 0] = offset + np.arange(n)
        return x, y.astype(np.int64)

    train, test = make(600, 0), make(300, TEST_OFFSET)

    @register_dataset(INDEXED)
    def load(cfg) -> DataSource:
        return DataSource(INDEXED, *train, *test, [f"c{i}" for i in range(10)])

    try:
        yield train[1]
    finally:
        DATASETS.remove(INDEXED)


def test_the_tuner_touches_validation_items_only(tmp_path, indexed, monkeypatch):
    touched: list[torch.Tensor] = []
    real = tuning.predict_val

    def spy(fitter, method, split):
        touched.append(split.x[:, 0].clone())
        return real(fitter, method, split)

    monkeypatch.setattr(tuning, "predict_val", spy)
    cfg = _cfg(tmp_path, ("diag_la", "mc_dropout"), dataset=INDEXED, n_train=None, n_test=None)
    run(cfg, log=lambda *_: None)
    assert len(touched) == 2 * cfg.tune_trials  # one validation predictive per trial
    ids = set(torch.cat(touched).long().tolist())
    data = load_benchmark(cfg)  # the same split the run made
    val = set(data.val_id.x[:, 0].long().tolist())
    assert ids and ids <= val, "only val_id items"
    assert not ids & set(data.train_id.x[:, 0].long().tolist()), "never an item the base model trained on"
    tested = [data.test_id, *data.test_ood.values()]
    assert all(i < TEST_OFFSET for i in ids) and not ids & {
        int(i) for s in tested for i in s.x[:, 0].tolist()
    }, "never a test or OOD item"
    pool = int(np.isin(indexed, cfg.heldout_classes, invert=True).sum())
    assert len(val) == pool // 10, "recipe=tuned carved 10% of the ID training items"


def _brute_force(draws: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """The objective by loops: per group, per (a, p, n) with y_a = y_p, a != p, y_n != y_a, the draws
    with ||e_a - e_p|| < ||e_a - e_n||, Krichevsky-Trofimov, log, mean."""
    logs = []
    S = draws.shape[0]
    for g in groups:
        for a, p, n in itertools.product(g, g, g):
            if a == p or labels[a] != labels[p] or labels[n] == labels[a]:
                continue
            hits = sum(np.linalg.norm(d[a] - d[p]) < np.linalg.norm(d[a] - d[n]) for d in draws)
            logs.append(math.log((hits + 0.5) / (S + 1)))
    return float(np.mean(logs))


def test_objective_matches_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (40,), generator=g)
    mean = torch.randn(40, 2, generator=g) + labels[:, None].float()
    samples = mean + 0.7 * torch.randn(25, 40, 2, generator=g)
    groups, _ = groups_of(labels, seed=0)
    pred = EmbeddingPrediction.from_samples(samples)
    got = triplet_loglik(pred, labels, "euclidean", samples=100, seed=0)
    assert got == pytest.approx(_brute_force(samples.numpy(), labels.numpy(), groups.numpy()), abs=1e-12)
    # a deterministic prediction: the mean is the one draw, P is 3/4 (ordered right) or 1/4
    step = triplet_loglik(EmbeddingPrediction(mean=mean), labels, "euclidean", samples=100, seed=0)
    assert step == pytest.approx(_brute_force(mean[None].numpy(), labels.numpy(), groups.numpy()), abs=1e-12)


def test_too_small_a_validation_split_is_one_line_and_exit_2(cli, tmp_path):
    argv = "run --preset smoke --dataset synthetic --methods diag_la --set recipe=tuned --set val_items=10"
    code, _, err = cli(*argv.split(), "--out", str(tmp_path), "--quiet", "--no-report")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "at least 20 items" in err
    assert not any(p.is_dir() and p.name != "cache" for p in tmp_path.iterdir()), "no run folder"
    one_class = type("V", (), {"y": torch.zeros(50, dtype=torch.long), "__len__": lambda self: 50})()
    with pytest.raises(BenchError, match="of 1 classes"):
        tuning.check_val(one_class)


def test_the_kept_laplace_variant_equals_a_refit_at_the_chosen_values(tmp_path):
    """diag_la's trials are copies of one fit (`Method.variants`); the one kept must be the method a plain
    fit at the chosen (prior precision, temperature) gives."""
    tuned = run(_cfg(tmp_path / "tuned", ("diag_la",), val_items=40), log=lambda *_: None)
    outcome = json.loads((tuned / "config.json").read_text())["tuning"]["diag_la-seed0"]
    values = outcome["values"]
    assert outcome["best_trial"] > 0, "the kept method is a variant, not the one fit (trial 0's values)"
    refit = run(
        _cfg(tmp_path / "refit", ("diag_la",), val_items=40, recipe="paper").replace(
            prior_precision=repr(values["prior_precision"]), likelihood_scale=repr(values["likelihood_scale"])
        ),
        log=lambda *_: None,
    )
    a, b = (np.load(f / "perquery" / "diag_la-seed0.npz") for f in (tuned, refit))
    # the paper recipe's predictive is mc (100 sampled networks): sample means agree up to float rounding
    np.testing.assert_allclose(a["id_mean"], b["id_mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["id_var"], b["id_var"], rtol=1e-4)


def test_a_trial_the_method_refuses_fails_and_counts_against_the_budget(tmp_path):
    """A setting the method cannot fit with (BenchError in its fit) is a failed trial of the same budget,
    its error in the CSV; the search goes on and keeps the best completed trial."""
    from methods.mc_dropout import MCDropout

    @register_method(INTERRUPT)
    class Picky(MCDropout):
        """MC dropout that refuses dropout rates above 0.3."""

        def fit(self, ctx):
            if self.option(self.cfg, "dropout") > 0.3:
                raise BenchError("dropout above 0.3 refused (test)")
            super().fit(ctx)

    try:
        folder = run(_cfg(tmp_path, (INTERRUPT,)), log=lambda *_: None)
    finally:
        METHODS.remove(INTERRUPT)
    outcome = json.loads((folder / "config.json").read_text())["tuning"][f"{INTERRUPT}-seed0"]
    df = pd.read_csv(folder / "tuning" / f"{INTERRUPT}-seed0.csv")
    failed = df[df["state"] == "FAIL"]
    assert outcome["trials"] == 4 == len(df) and outcome["failed_trials"] == len(failed) >= 1
    assert (failed["params_dropout"] > 0.3).all() and failed["user_attrs_error"].str.contains("refused").all()
    assert outcome["values"]["dropout"] <= 0.3
