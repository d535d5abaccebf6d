"""likelihood_scale: the curvature each setting gives (against brute-force autograd Hessians of the
correspondingly reduced PML loss), the tuned search (never on test data), and one factorisation serving
every (temperature, prior precision) exactly."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from pytorch_metric_learning.reducers import SumReducer

from bench.config import preset_config
from bench.data import load_benchmark
from bench.errors import BenchError
from bench.la.family import ScaledFamily
from bench.la.likelihood import check_scale, parse_scale
from bench.la.pairs import contrastive_pair_curvature
from bench.la.prior import item_groups, optimize_marglik
from bench.la.spectrum import exact_spectrum
from bench.la.structures import compute_curvature, make_posterior, scale_curvature, scaled_curvature
from bench.la.tuning import search
from bench.loss import PairLoss
from bench.method import FitContext
from bench.model import last_linear
from bench.registry import METHODS
from bench.timing import StageTimer
from bench.train import train_embedding
from tests.laplace_helpers import brute_ggn, full_jacobian, rel_err, tiny_data, tiny_net

M = 8  # mining batch
LA = ["full_la", "last_layer_la", "diag_la", "kfac_la"]


# -- definitions --------------------------------------------------------------------------------


def test_parse_and_refuse_in_one_line():
    assert parse_scale("batch") == parse_scale("1") and parse_scale("pair").reduction == "sum"
    assert parse_scale("2.5").temperature == 2.5 and parse_scale("tuned").tuned
    for bad in ("0", "-1", "often", "nan"):
        with pytest.raises(
            BenchError, match="likelihood_scale must be batch, pair, tuned or a positive number"
        ):
            parse_scale(bad)
    smoke = preset_config("smoke")
    with pytest.raises(BenchError, match="set --set val_items=N"):
        check_scale(smoke.replace(likelihood_scale="tuned"))
    with pytest.raises(BenchError, match="needs hessian=ggn"):
        check_scale(smoke.replace(likelihood_scale="pair", hessian="jtj"))
    for name in LA:  # the methods refuse before any data is loaded
        with pytest.raises(BenchError, match="val_items"):
            METHODS.get(name).validate(smoke.replace(likelihood_scale="tuned"))


@pytest.mark.parametrize("setting", ["batch", "pair", "7.5"])
def test_each_setting_gives_the_hessian_of_its_reduced_loss(setting):
    """batch: PML's AvgNonZeroReducer loss; pair: its SumReducer loss (every pair an observation);
    a number t: t times the batch one. Brute force: jacrev Jacobians and autograd Hessians (kept part)."""
    model, (x, y) = tiny_net(), tiny_data(21)
    scale = parse_scale(setting)
    curv = compute_curvature(
        model, x, y, structure="full", mining_batch=M, loss=PairLoss(reduction=scale.reduction)
    )
    scale_curvature(curv, scale.temperature)
    ref = scale.temperature * brute_ggn(
        model, x, y, M, part="pos", reducer=SumReducer() if setting == "pair" else None
    )
    assert rel_err(curv.H, ref) < 1e-5


def test_pair_with_cosine_distance_is_the_sum_reduced_loss_hessian():
    """distance=cosine: the exact (unclamped) GGN of the SumReducer loss (both pair kinds count)."""
    from bench.la.curvature import accumulate
    from tests.laplace_helpers import ExactGGN

    model, (x, y) = tiny_net(), tiny_data(21)
    curv = accumulate(
        ExactGGN(model),
        x,
        y,
        hessian="ggn",
        mining_batch=M,
        loss=PairLoss(distance="cosine", reduction="sum"),
    )
    ref = brute_ggn(
        model,
        x,
        y,
        M,
        part="all",
        cfg=preset_config("smoke").replace(distance="cosine"),
        reducer=SumReducer(),
    )
    assert rel_err(curv.H, ref) < 1e-8


def test_pair_multiplies_each_batch_by_its_active_pair_count():
    """One mining batch: H_pair = n_pos H_batch with n_pos the active positive pairs (with multiplicity),
    so with several batches pair is not a constant multiple of batch."""
    model, (x, y) = tiny_net(), tiny_data(21)
    hs = {}
    for red in ("mean", "sum"):
        hs[red] = [
            compute_curvature(
                model,
                x[s : s + M],
                y[s : s + M],
                structure="full",
                mining_batch=M,
                loss=PairLoss(reduction=red),
            ).H
            for s in (0, M)
        ]
    ratios = []
    for b, s in enumerate((0, M)):
        with torch.no_grad():
            F = model(x[s : s + M])
        pc = contrastive_pair_curvature(
            F[None], y[s : s + M][None], pos_margin=0.0, neg_margin=1.0, miner_margin=0.2, reduction="sum"
        )
        n_pos = float(pc.W_pos.sum())  # sum reduction: the weights are the counts
        assert n_pos > 1 and rel_err(hs["sum"][b], n_pos * hs["mean"][b]) < 1e-10
        ratios.append(n_pos)
    assert ratios[0] != ratios[1]


@pytest.fixture(scope="module")
def setup():
    cfg = preset_config("smoke").replace(
        dataset="synthetic", quiet=True, n_train=300, n_test=60, val_items=120, posterior_samples=6
    )
    data = load_benchmark(cfg)
    model, _ = train_embedding(cfg, data.train_id, torch.device("cpu"), seed=0)
    return cfg, data, model


def _fit(cfg, data, model, name, stage=None):
    ctx = FitContext(
        cfg=cfg,
        data=data,
        device=torch.device("cpu"),
        timer=StageTimer(),
        method=name,
        train_model=lambda seed, dropout: model,
        seed=0,
    )
    if stage is not None:
        ctx.stage = stage  # type: ignore[method-assign]
    method = METHODS.get(name)(cfg)
    method.fit(ctx)
    return method


def test_methods_scale_their_posterior_and_marglik_as_documented(setup):
    cfg, data, model = setup
    base = _fit(cfg.replace(prior_precision="2.0"), data, model, "last_layer_la")
    hot = _fit(cfg.replace(prior_precision="2.0", likelihood_scale="7.5"), data, model, "last_layer_la")
    pair = _fit(cfg.replace(prior_precision="2.0", likelihood_scale="pair"), data, model, "last_layer_la")
    H = base.posterior.curvature.H
    assert rel_err(hot.posterior.curvature.H, 7.5 * H) < 1e-6
    assert pair.diagnostics["likelihood_observations"] == "pair" and pair.diagnostics[
        "curvature_trace"
    ] > 5 * float(H.trace())
    ml = _fit(cfg.replace(likelihood_scale="7.5"), data, model, "last_layer_la")
    theta_sq = float(sum(p.detach().double().pow(2).sum() for p in last_linear(model).parameters()))
    ref, _ = optimize_marglik(exact_spectrum(torch.linalg.eigvalsh(7.5 * H.double())), theta_sq)
    assert ml.diagnostics["temperature"] == 7.5 and abs(ml.diagnostics["prior_precision"] / ref - 1) < 1e-4


# -- the search ---------------------------------------------------------------------------------


def test_search_refines_between_grid_points_and_reports_edges():
    score = lambda t, d: -((math.log(t) - math.log(37.0)) ** 2) - (d - 1.0) ** 2  # noqa: E731
    temps = tuple(10.0 ** (k / 2) for k in range(-2, 9))
    t, d, info = search(score, temps, 1.0)
    assert abs(t / 37.0 - 1) < 0.03 and d == 1.0 and info["refined"] and not info["at_edge"]
    t, d, info = search(score, temps, "grid")
    assert (t, d) == (max((x for x in temps), key=lambda x: -abs(math.log(x / 37))), 1.0) and not info[
        "refined"
    ]
    assert len(info["points"]) == len(temps) * 9
    _, _, info = search(lambda t, d: t, temps, 1.0)
    assert info["at_edge"]
    # points beyond the basis's bound are not scored; the best trusted one at that edge is flagged
    t, _, info = search(score, temps, 1.0, bound=lambda t, d: t / 10, max_bound=1.0)
    assert t <= 10 and info["trust_edge"] and sum(p["objective"] is None for p in info["points"]) == 6


class _Untouchable:
    """A test split that fails on any use: fit must not look at test data."""

    def __getattr__(self, name):
        raise AssertionError(f"fit touched test data ({name})")

    def __len__(self):
        raise AssertionError("fit touched test data (len)")


@pytest.mark.parametrize("name", LA)
def test_tuning_sees_only_the_validation_split(setup, name):
    """The tuned search scores val_id items only, and fit never touches a test split (they raise on use)."""
    from dataclasses import replace

    cfg, data, model = setup
    poisoned = replace(data, test_id=_Untouchable(), test_ood={k: _Untouchable() for k in data.test_ood})
    rows = {data.val_id.x[i].numpy().tobytes(): ("val", i) for i in range(len(data.val_id))}
    rows.update({data.train_id.x[i].numpy().tobytes(): ("train", i) for i in range(len(data.train_id))})
    test_rows = {
        s.x[i].numpy().tobytes() for s in (data.test_id, *data.test_ood.values()) for i in range(len(s))
    }
    seen: dict[str, list] = {"hessian": [], "prior": []}
    current = []

    @contextmanager
    def stage(which):
        current.append(which)
        try:
            yield
        finally:
            current.pop()

    def hook(_, args):
        if current:
            seen[current[-1]] += [args[0][i].detach().numpy().tobytes() for i in range(args[0].shape[0])]

    handle = model.register_forward_pre_hook(hook)
    try:
        method = _fit(cfg.replace(likelihood_scale="tuned"), poisoned, model, name, stage)
    finally:
        handle.remove()
    assert seen["prior"] and all(rows.get(r, ("?",))[0] == "val" for r in seen["prior"])
    assert (
        len({rows[r][1] for r in seen["prior"]}) == (len(data.val_id) // 16) * 16
    )  # whole groups of 16 scored
    assert not test_rows & set(seen["prior"] + seen["hessian"])
    tuning = method.diagnostics["tuning"]
    assert tuning["val_source"] == "val_id" and tuning["val_items"] == len(data.val_id)


# -- one factorisation, every (t, delta) -------------------------------------------------------------


@pytest.mark.parametrize("structure", ["full", "last_layer", "diag", "kron", "lowrank"])
def test_family_joint_covariance_is_the_direct_one_at_every_point(structure, monkeypatch):
    """The family's joint group covariance at (t, delta) equals J Sigma J^T of the posterior built directly
    at that point (dense Sigma = (t H + delta I)^-1; Kronecker: the block-diagonal G (x) A; a low-rank
    basis: its Sigma_k = U diag(1 / (t lam + delta)) U^T + (I - U U^T) / delta, within its bound of the
    exact)."""
    from bench.la import lowrank

    model, (x, y) = tiny_net(), tiny_data(40)
    kind = "full" if structure == "lowrank" else structure
    curv = compute_curvature(model, x, y, structure=kind, mining_batch=M)
    if structure == "lowrank":
        import bench.la.structures as structures

        monkeypatch.setattr(structures, "EXACT_EIG_MAX_D", 5)
        monkeypatch.setattr(lowrank, "MAX_RANK_FRACTION", 1.0)
    family = ScaledFamily.build(
        model, curv, lambda spectrum: 1.0, tol=0.5, generator=torch.Generator().manual_seed(0), max_rank=32
    )
    assert (family.basis is not None) == (structure == "lowrank")
    xv = tiny_data(24, seed=5)[0]
    groups = item_groups(24, 6, torch.Generator().manual_seed(1))
    proj = family.project(xv, groups)
    names = curv.names
    for t, delta in ((1.0, 0.5), (30.0, 2.0), (0.1, 0.05)):
        exact = torch.linalg.inv(_dense_precision(scaled_curvature(curv, t), delta))
        Sigma = exact
        if family.basis is not None:
            U, lam = family.basis.eigenvectors().double(), family.basis.lam * t
            Sigma = (U / (lam + delta)) @ U.T + (torch.eye(curv.D, dtype=torch.float64) - U @ U.T) / delta
        C = family.joint_cov(proj, t, delta)
        for g in range(groups.shape[0]):
            J = full_jacobian(model, xv[groups[g]], names if kind == "last_layer" else None)
            J = _kron_layout(J, model) if kind == "kron" else J
            assert rel_err(C[g], J @ Sigma @ J.T) < 1e-6
            if family.basis is not None:  # Sigma / (1 + nu / delta) <= Sigma_k <= (1 + bound) Sigma (Loewner)
                Ce, tiny = J @ exact @ J.T, -1e-9 * float(C[g].abs().max())
                assert torch.linalg.eigvalsh((1 + family.bound(t, delta)) * Ce - C[g]).min() > tiny
                assert torch.linalg.eigvalsh(C[g] - Ce / (1 + family.basis.nu * t / delta)).min() > tiny
        if family.basis is None:  # the posterior the family hands out is the structure's own at (t, delta)
            direct = make_posterior(model, scaled_curvature(curv, t), delta)
            assert (
                rel_err(family.posterior(t, delta).glm_cov(xv).double(), direct.glm_cov(xv).double()) < 1e-6
            )
        else:
            assert (
                rel_err(
                    family.posterior(t, delta).glm_cov(xv).double(),
                    torch.stack([C[g].reshape(6, 2, 6, 2)[i, :, i] for g in range(4) for i in range(6)])[
                        torch.argsort(groups.reshape(-1))
                    ],
                )
                < 1e-6
            )


def _kron_layout(J, model):
    """Columns of J [rows, D] (named_parameters order: W row-major, then b, per layer) in the Kronecker
    posterior's layout: per layer [W | b] row-major, i.e. [out, in + 1]."""
    out, i = [], 0
    for layer in [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
        o, n = layer.out_features, layer.in_features
        W = J[:, i : i + o * n].reshape(-1, o, n)
        b = J[:, i + o * n : i + o * n + o].reshape(-1, o, 1)
        out.append(torch.cat([W, b], -1).reshape(J.shape[0], -1))
        i += o * n + o
    return torch.cat(out, -1)


def _dense_precision(curv, delta):
    if curv.kron is not None:
        blocks = [torch.kron(k.G, k.A) for k in curv.kron]
        return torch.block_diag(*blocks).double() + delta * torch.eye(curv.D, dtype=torch.float64)
    H = torch.diag(curv.H) if curv.H.dim() == 1 else curv.H
    return H.double() + delta * torch.eye(curv.D, dtype=torch.float64)


@pytest.mark.parametrize("name", LA)
def test_the_tuned_posterior_is_the_direct_one_at_the_chosen_point(setup, name):
    """likelihood_scale=tuned gives the posterior (predictive moments and linearised draws) of a run with
    likelihood_scale=<t*> prior_precision=<delta*> set directly."""
    cfg, data, model = setup
    tuned = _fit(cfg.replace(likelihood_scale="tuned"), data, model, name)
    dg = tuned.diagnostics
    assert (
        dg["scale_method"] == "tuned"
        and dg["prior_method"] == "marglik"
        and len(dg["tuning"]["points"]) >= 11
    )
    assert dg["tuning"]["best"]["objective"] >= max(
        p["objective"] for p in dg["tuning"]["points"] if p["objective"] is not None
    )
    direct = _fit(
        cfg.replace(likelihood_scale=repr(dg["temperature"]), prior_precision=repr(dg["prior_precision"])),
        data,
        model,
        name,
    )
    x = data.test_id.x
    a, b = tuned.predict(x), direct.predict(x)
    assert torch.allclose(a.cov, b.cov, rtol=1e-4, atol=1e-7 * float(b.cov.abs().max()))
    assert torch.allclose(a.samples, b.samples, rtol=1e-3, atol=1e-4 * float(b.samples.abs().max()))


def test_tuned_full_posterior_above_the_exact_limit_uses_a_growing_basis(setup, monkeypatch):
    """Above EXACT_EIG_MAX_D the search scores only points its Krylov basis resolves within the tolerance,
    the basis doubling while the best point is at that edge; the posterior at the chosen point is within
    the same bound of the one fitted directly there (Cholesky)."""
    import bench.la.structures as structures
    import methods.laplace as la
    from bench.la import lowrank, posterior

    for mod in (posterior, structures):
        monkeypatch.setattr(mod, "EXACT_EIG_MAX_D", 10)
    monkeypatch.setattr(lowrank, "MAX_RANK_FRACTION", 1.0)
    monkeypatch.setattr(la, "MAX_RANK_FRACTION", 1.0)
    monkeypatch.setattr(la, "TUNE_START_RANK", 48)
    cfg, data, model = setup
    tuned = _fit(cfg.replace(likelihood_scale="tuned"), data, model, "full_la")
    dg = tuned.diagnostics
    ranks = dg["tuning"]["basis_ranks"]
    assert ranks and all(r is not None for r in ranks) and ranks == sorted(ranks)
    assert all(p["objective"] is None for p in dg["tuning"]["points"] if p["rank_bound"] > 0.2)
    assert dg["tuning"]["best"]["rank_bound"] <= 0.2
    exact = _fit(
        cfg.replace(
            likelihood_scale=repr(dg["temperature"]),
            prior_precision=repr(dg["prior_precision"]),
            method_options=(("posterior_rank_tol", 0.0),),
        ),
        data,
        model,
        "full_la",
    )
    a, b = tuned.predict(data.test_id.x).cov.double(), exact.predict(data.test_id.x).cov.double()
    L = torch.linalg.cholesky(b)
    M = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, a, upper=False).mT, upper=False)
    ratio = torch.linalg.eigvalsh((M + M.mT) / 2)
    assert ratio.min() > 1 - 1e-3 and ratio.max() <= 1.2 + 1e-3
