"""Uncertainty scores (bench/scores/) against brute-force versions on tiny data, the closed form
against Monte Carlo, the candidate-set approximation, and the rule that a query's own label never
reaches a score."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.method import EmbeddingPrediction
from bench.metrics.uncertainty import (
    ScoreInputs,
    ScoreSettings,
    candidate_coverage,
    gaussian_draws,
    run_score,
    score_inputs,
)
from bench.registry import SCORES, register_score
from bench.scores.knn_disagreement import TOPK as KNN_K
from bench.scores.topk_entropy import TOPK as ENT_K

DISTANCES = ("euclidean", "cosine")


def _space(z: np.ndarray, distance: str) -> np.ndarray:
    return z / np.linalg.norm(z, axis=-1, keepdims=True) if distance == "cosine" else z


def _dist(a: np.ndarray, b: np.ndarray, distance: str) -> np.ndarray:
    return np.linalg.norm(_space(a, distance) - _space(b, distance), axis=-1)


@pytest.fixture
def tiny():
    """G = 14 gallery items (3 classes), 5 OOD queries, d = 2, S = 9 joint samples (a shared
    random linear 'weight' draw plus item noise, so items are correlated across the gallery)."""
    rng = np.random.default_rng(3)
    G, Q, S, d = 14, 5, 9, 2
    y = rng.integers(0, 3, G)
    mean = rng.normal(0, 1.5, (G, d)) + 2.0
    ood = rng.normal(0, 1.5, (Q, d)) - 1.0
    W = rng.normal(0, 0.4, (S, d, d))
    noise = lambda n: rng.normal(0, 0.3, (S, n, d))  # noqa: E731
    zg = mean[None] + np.einsum("nd,sde->sne", mean, W) + noise(G)
    zo = ood[None] + np.einsum("nd,sde->sne", ood, W) + noise(Q)
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    pg = EmbeddingPrediction.from_samples(t(zg))
    po = EmbeddingPrediction.from_samples(t(zo))
    return pg, po, torch.tensor(y)


def _inputs(pg, po, y, distance="euclidean", candidates=0, samples=50):
    st = ScoreSettings(distance=distance, candidates=candidates, samples=samples, seed=0)
    return score_inputs(pg, {"ood": po}, y, st)


def _brute(
    zq: np.ndarray, mq: np.ndarray, zg: np.ndarray, mg: np.ndarray, y: np.ndarray, loo: bool, distance: str
):
    """Every retrieval-level score by brute force over the whole gallery, in plain numpy."""
    S, N = zq.shape[:2]
    out = {
        k: np.zeros(N)
        for k in ("top1_flip", "dist_var", "topk_entropy", "knn_disagreement", "dist_var_delta")
    }
    for q in range(N):
        keep = np.array([g for g in range(len(mg)) if not (loo and g == q)])
        dm = _dist(mq[q], mg[keep], distance)
        order = keep[np.argsort(dm, kind="stable")]
        n1 = order[0]
        out["knn_disagreement"][q] = np.mean(y[order[1:KNN_K]] != y[n1])
        ds = np.stack([_dist(zq[s, q], zg[s, keep], distance) for s in range(S)])  # [S, |keep|]
        top1 = keep[ds.argmin(1)]
        out["top1_flip"][q] = np.mean(y[top1] != y[n1])
        dn = np.array([_dist(zq[s, q], zg[s, n1], distance) for s in range(S)])
        out["dist_var"][q] = dn.var(ddof=1)
        hist = {}
        for s in range(S):
            for g in keep[np.argsort(ds[s], kind="stable")[:ENT_K]]:
                hist[y[g]] = hist.get(y[g], 0) + 1
        p = np.array(list(hist.values()), float) / (S * ENT_K)
        out["topk_entropy"][q] = -(p * np.log(p)).sum()
        # delta method with the sample joint covariance; gradients by central differences
        eps = 1e-6
        f = lambda a, b: _dist(a, b, distance)  # noqa: E731
        gq = np.array(
            [(f(mq[q] + eps * e, mg[n1]) - f(mq[q] - eps * e, mg[n1])) / (2 * eps) for e in np.eye(2)]
        )
        gn = np.array(
            [(f(mq[q], mg[n1] + eps * e) - f(mq[q], mg[n1] - eps * e)) / (2 * eps) for e in np.eye(2)]
        )
        joint = np.concatenate([zq[:, q], zg[:, n1]], axis=1)  # [S, 2d]
        cov = np.cov(joint, rowvar=False)
        g = np.concatenate([gq, gn])
        out["dist_var_delta"][q] = g @ cov @ g
    return out


@pytest.mark.parametrize("distance", DISTANCES)
def test_scores_equal_brute_force_over_the_whole_gallery(tiny, distance):
    pg, po, y = tiny
    inp_id, inp_ood = _inputs(pg, po, y, distance)
    zg, mg = pg.samples.double().numpy(), pg.mean.double().numpy()
    for inp, zq, mq, loo in [
        (inp_id, zg, mg, True),
        (inp_ood["ood"], po.samples.double().numpy(), po.mean.double().numpy(), False),
    ]:
        ref = _brute(zq, mq, zg, mg, y.numpy(), loo, distance)
        for name, want in ref.items():
            got = run_score(name, inp)
            np.testing.assert_allclose(
                got, want, rtol=2e-4, atol=1e-6, err_msg=f"{name} ({distance}, loo={loo})"
            )
        assert run_score("trace", inp) == pytest.approx(zq.var(0, ddof=1).sum(-1), rel=1e-4)


def test_candidate_set_search_is_the_brute_force_over_the_candidates(tiny):
    """With K_c < G (`score_candidates`), top1_flip is the brute force restricted to each query's K_c
    nearest items under the mean (the documented approximation); candidate_coverage counts the draws
    it gets exactly right, and the default K_c = 0 searches the whole gallery (coverage 1)."""
    pg, po, y = tiny
    K = 4
    inp, _ = _inputs(pg, po, y, candidates=K)
    z, m, lab = pg.samples.numpy(), pg.mean.numpy(), y.numpy()
    want, exact_hits = np.zeros(len(m)), 0
    for q in range(len(m)):
        others = np.array([g for g in range(len(m)) if g != q])
        cand = others[np.argsort(np.linalg.norm(m[others] - m[q], axis=1), kind="stable")[:K]]
        assert torch.equal(inp.neighbours.index[q, :K], torch.tensor(cand))
        top_c = cand[np.linalg.norm(z[:, q, None] - z[:, cand], axis=-1).argmin(1)]
        top_all = others[np.linalg.norm(z[:, q, None] - z[:, others], axis=-1).argmin(1)]
        want[q] = np.mean(lab[top_c] != lab[cand[0]])
        exact_hits += int(np.isin(top_all, cand).sum())
    np.testing.assert_allclose(run_score("top1_flip", inp), want)
    assert candidate_coverage(inp) == pytest.approx(exact_hits / (len(m) * z.shape[0]))
    assert candidate_coverage(_inputs(pg, po, y, candidates=0)[0]) == 1.0


def test_delta_method_matches_monte_carlo_for_a_joint_gaussian():
    """Var ||z_q - z_n|| for (z_q, z_n) jointly Gaussian with a cross-covariance: the closed form with
    the exact joint covariance, the closed form from joint samples (dist_var_delta) and the Monte
    Carlo variance (dist_var) agree when the spread is small against the distance."""
    rng = np.random.default_rng(0)
    mq, mn = np.array([0.0, 0.0]), np.array([3.0, 1.0])
    A = rng.normal(0, 0.15, (4, 4))
    cov = A @ A.T + 0.01 * np.eye(4)  # joint [z_q, z_n] covariance with cross blocks
    u = (mq - mn) / np.linalg.norm(mq - mn)
    g = np.concatenate([u, -u])
    exact = g @ cov @ g
    S = 200_000
    z = rng.multivariate_normal(np.concatenate([mq, mn]), cov, size=S)
    q = EmbeddingPrediction.from_samples(torch.tensor(z[:, None, :2]), with_cov=False)
    gal = EmbeddingPrediction.from_samples(torch.tensor(z[:, None, 2:]), with_cov=False)
    q.mean, gal.mean = torch.tensor(mq[None]), torch.tensor(mn[None])
    inp = score_inputs(gal, {"q": q}, torch.tensor([0]), ScoreSettings(candidates=0))[1]["q"]
    assert run_score("dist_var_delta", inp)[0] == pytest.approx(exact, rel=0.02)
    assert run_score("dist_var", inp)[0] == pytest.approx(exact, rel=0.05)
    assert abs(cov[:2, 2:]).max() > 0.01  # the cross-covariance matters here:
    assert abs(exact - (u @ cov[:2, :2] @ u + u @ cov[2:, 2:] @ u)) > 0.05 * exact


def test_delta_method_without_samples_is_the_independent_closed_form():
    """Independent Gaussian items (PFE-like: cov, no samples): dist_var_delta = g_q^T S_q g_q + g_n^T S_n g_n,
    and the Monte Carlo dist_var from score_samples independent draws approaches it."""
    mean = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    cov = torch.stack(
        [torch.tensor([[0.02, 0.01], [0.01, 0.03]]), torch.tensor([[0.04, 0.0], [0.0, 0.01]]), torch.eye(2)]
    )
    p = EmbeddingPrediction(mean=mean, cov=cov)
    inp, _ = score_inputs(p, {}, torch.tensor([0, 1, 0]), ScoreSettings(candidates=0, samples=40_000, seed=1))
    got = run_score("dist_var_delta", inp)
    assert got[0] == pytest.approx(0.02 + 0.04) and got[1] == pytest.approx(0.04 + 0.02)
    assert run_score("dist_var", inp)[:2] == pytest.approx(got[:2], rel=0.05)


def test_gaussian_draws_have_the_predicted_moments_and_are_seeded():
    cov = torch.tensor([[[1.0, 0.6], [0.6, 0.5]], [[0.2, 0.0], [0.0, 0.0]]])  # the second one singular
    p = EmbeddingPrediction(mean=torch.tensor([[1.0, -1.0], [0.0, 2.0]]), cov=cov)
    z = gaussian_draws(p, 50_000, torch.Generator().manual_seed(0))
    assert z.mean(0) == pytest.approx(p.mean, abs=0.02)
    emp = torch.einsum("sni,snj->nij", z - z.mean(0), z - z.mean(0)) / (z.shape[0] - 1)
    assert torch.allclose(emp, cov, atol=0.02)
    assert torch.equal(z, gaussian_draws(p, 50_000, torch.Generator().manual_seed(0)))
    d = gaussian_draws(
        EmbeddingPrediction(mean=p.mean, var=torch.tensor([[4.0, 0.0], [1.0, 1.0]])),
        20_000,
        torch.Generator().manual_seed(1),
    )
    assert d.var(0) == pytest.approx(torch.tensor([[4.0, 0.0], [1.0, 1.0]]), abs=0.1)


@pytest.mark.parametrize("name", SCORES.names())
def test_a_query_label_never_reaches_its_score(tiny, name):
    """Structurally: ScoreInputs holds no labels but the candidates', and a query is never its own
    candidate. Behaviourally: changing the label of gallery item i changes no score of query i."""
    pg, po, y = tiny
    # the one label path: the framework's closure over the gallery labels, used for retrieved items
    assert [f.name for f in dataclasses.fields(ScoreInputs) if "label" in f.name] == ["_labels_of"]
    inp, _ = _inputs(pg, po, y, candidates=6)
    me = torch.arange(len(y))
    assert not (inp.neighbours.index == me[:, None]).any()
    assert not (inp.sampled().index == me[None, :, None]).any()
    base = run_score(name, inp)
    for i in range(len(y)):
        y2 = y.clone()
        y2[i] = 99
        assert run_score(name, _inputs(pg, po, y2, candidates=6)[0])[i] == base[i]
    assert "label" not in inspect.signature(SCORES.get(name)).parameters


def test_deterministic_method_gets_only_predictive_free_scores(tiny):
    pg, po, y = tiny
    inp, _ = _inputs(EmbeddingPrediction(mean=pg.mean), EmbeddingPrediction(mean=po.mean), y)
    for name in SCORES.names():
        got = run_score(name, inp)
        assert (got is None) == SCORES.meta(name)["predictive"], name
    with pytest.raises(BenchError, match="deterministic"):
        inp.draws()


def test_a_new_score_plugin_is_one_registration(tiny):
    @register_score("test_negmean")
    def negmean(inputs):
        """A throw-away score."""
        return -inputs.query.mean[:, 0].double().numpy()

    try:
        pg, po, y = tiny
        assert run_score("test_negmean", _inputs(pg, po, y)[0]) == pytest.approx(-pg.mean[:, 0].numpy())
    finally:
        SCORES.remove("test_negmean")


def test_bad_score_output_is_a_clear_error(tiny):
    @register_score("test_bad")
    def bad(inputs):
        return np.full(inputs.n, np.nan)

    try:
        pg, po, y = tiny
        with pytest.raises(BenchError, match="score test_bad: non-finite value for 14 of 14"):
            run_score("test_bad", _inputs(pg, po, y)[0])
    finally:
        SCORES.remove("test_bad")
    with pytest.raises(BenchError, match="unknown score 'nope'"):
        SCORES.get("nope")


def test_mismatched_sample_counts_are_refused(tiny):
    pg, po, y = tiny
    po.samples = po.samples[:3]
    _, ood = _inputs(pg, po, y)
    with pytest.raises(BenchError, match="same draws to every query set"):
        run_score("top1_flip", ood["ood"])


def test_retrieval_space_and_nearest():
    from bench.loss import retrieval_space, space_distance
    from bench.metrics.retrieval import nearest

    z = torch.tensor([[3.0, 4.0], [0.0, 2.0], [-1.0, 0.0]])
    assert torch.equal(retrieval_space(z, "euclidean"), z)
    assert torch.allclose(retrieval_space(z, "cosine"), z / z.norm(dim=1, keepdim=True))
    cos = torch.nn.functional.cosine_similarity(z[:, None], z[None], dim=-1)
    assert torch.allclose(space_distance(z[:, None], z[None], "cosine") ** 2, 2 - 2 * cos, atol=1e-6)
    idx, dist = nearest(z, z, 5, "euclidean", exclude_self=True)
    assert idx.shape == (3, 2) and idx[2].tolist() == [1, 0]  # capped at N - 1, nearest first, never itself
    assert dist[2].tolist() == pytest.approx([5**0.5, 32**0.5])
    with pytest.raises(BenchError, match="distance must be one of euclidean, cosine, got 'manhattan'"):
        retrieval_space(z, "manhattan")
