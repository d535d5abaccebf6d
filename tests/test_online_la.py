"""Online Laplace (bench.la.online, methods/online_la.py) against the post-hoc family's curvature, the
posterior it samples from, PML's miner, and the runner's caching and timing (the resume after a kill:
tests/test_reliability.py)."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from backbones._cnn import EmbeddingHead
from bench.config import preset_config
from bench.data import Dataset, Split, load_benchmark
from bench.errors import BenchError
from bench.la import jacobians as jac
from bench.la.curvature import Curvature, DiagGGN, KronGGN, LastLayerGGN
from bench.la.online import OnlineLaplaceNet, OnlineSettings, sample_deviations, steps_per_epoch
from bench.la.online_batch import batch_curvature, cap_triplets
from bench.la.online_heads import (
    DiagonalPairs,
    LinearHeadLaplacianDiag,
    single_linear,
)
from bench.la.pairs import contrastive_pair_curvature, pair_hessians
from bench.la.posterior import DiagPosterior
from bench.la.prior import log_marglik
from bench.la.spectrum import exact_spectrum
from bench.la.structures import compute_curvature, get_structure, online_structures
from bench.la.subsets import la_head
from bench.loss import PairLoss, make_loss_and_miner, mined_pair_counts, mined_triplets
from bench.method import FitContext
from bench.model_cache import model_key
from bench.registry import METHODS
from bench.timing import StageTimer
from bench.train import train_net
from methods.online_la import OnlineStep
from tests.fit_helpers import fit_method, predict_on, run_device
from tests.laplace_helpers import TinyConvNet, tiny_data, tiny_net

CPU = torch.device("cpu")
B = 8  # mining batch = training batch


def _cfg(**kw):
    return preset_config("smoke").replace(**{"batch_size": B, "epochs": 1, "quiet": True, **kw})


def _online(settings: OnlineSettings, n: int, epochs: int = 1, seed: int = 0) -> OnlineLaplaceNet:
    return OnlineLaplaceNet(tiny_net(seed=seed), settings, epochs, n)


def _head_entries(model: OnlineLaplaceNet, H: torch.Tensor) -> torch.Tensor:
    """The head's block of a curvature over all weights of model.net (the head is the last layer)."""
    D = model.D
    return H[-D:] if H.dim() == 1 else H[-D:, -D:]


def _with_head(net: torch.nn.Module, theta: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = copy.deepcopy(net)
    with torch.no_grad():
        for n, p in la_head(net).named_parameters():
            p.copy_(theta[n])
    return net


@pytest.mark.parametrize(
    "structure, distance", [("diag", "euclidean"), ("last_layer", "euclidean"), ("diag", "cosine")]
)
def test_accumulated_curvature_is_the_post_hoc_ggn_of_the_same_weights_and_batches(structure, distance):
    """Zero learning rate, memory 1, a tiny posterior spread (samples = weights): after one epoch of the real
    training loop the online H is diag_la's / last_layer_la's GGN over the same batches (the training order;
    44 items, so the last batch has 4), restricted to the head."""
    x, y = tiny_data(n=44)
    cfg = _cfg(lr=1e-30, distance=distance)
    s = OnlineSettings(
        structure=structure, memory=1.0, prior=1e16, marglik_every=0, dtype="float64", distance=distance
    )
    model = _online(s, len(y))
    before = copy.deepcopy(model.net)
    train_net(model, OnlineStep(cfg, s, len(y), seed=3), cfg, Split(x, y), CPU, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(before.parameters(), model.net.parameters()))
    H = model.curvature(steps_per_epoch(len(y), B)).H
    ref = compute_curvature(
        before,
        x,
        y,
        structure="diag" if structure == "diag" else "full",
        mining_batch=B,
        chunk=64,
        generator=torch.Generator().manual_seed(5),
        loss=PairLoss.from_config(cfg),
    )
    expected = _head_entries(model, ref.H)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(H, expected, rtol=1e-6, atol=1e-12)


def test_accumulated_kronecker_factors_are_the_post_hoc_factors_of_the_same_batches():
    """As above for kron: G = n_b x the mean of the batches' G (= their sum, the post-hoc G), A = the mean of
    the
    batches' (pair-normalised) A, each batch's factors from kfac_la's accumulator on the training batches."""
    x, y = tiny_data(n=44)
    cfg = _cfg(lr=1e-30)
    s = OnlineSettings(structure="kron", memory=1.0, prior=1e16, marglik_every=0, dtype="float64")
    model = _online(s, len(y))
    before = copy.deepcopy(model.net)
    train_net(model, OnlineStep(cfg, s, len(y), seed=3), cfg, Split(x, y), CPU, seed=5)
    (f,) = model.curvature(steps_per_epoch(len(y), B)).kron
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(5))
    per_batch = [
        compute_curvature(before, x[i], y[i], structure="kron", mining_batch=B).kron[-1]
        for i in perm.split(B)
    ]
    torch.testing.assert_close(f.G, sum(k.G for k in per_batch), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(f.A, sum(k.A for k in per_batch) / len(per_batch), rtol=1e-6, atol=1e-12)


def _pml_lam_factor(F: torch.Tensor, y: torch.Tensor, n_train: int) -> float:
    """LAM's N^2 / P times the number of active positive pairs, from PML's miner (P = 2 per triplet)."""
    _, miner = make_loss_and_miner(_cfg())
    a, p, _ = miner(F, y)
    if len(a) <= 1:  # PML's zero loss: no curvature
        return 0.0
    active = int(((F[a] - F[p]).norm(dim=1) > 0).sum())
    return active * n_train**2 / (2 * len(a))


@pytest.mark.parametrize("scaling", ["gibbs", "lam"])
def test_running_curvature_weights_each_batch_ggn_at_its_sample_by_the_memory_factor(scaling):
    """Steps without an optimiser (zero learning rate), a real posterior spread: H is the memory-weighted
    combination of the post-hoc GGN of each batch at that step's sampled head weights:
    gibbs n_b sum_t m^(T-t) h_t / sum_t m^(T-t); lam m^T N + sum_t m^(T-t) (n_pos N^2 / P)_t h_t."""
    x, y = tiny_data(n=40)
    n, m = len(y), 0.8
    s = OnlineSettings(memory=m, prior=4.0, marglik_every=0, scaling=scaling, dtype="float64")
    model = _online(s, n)
    step = OnlineStep(_cfg(), s, n, seed=0)
    terms, at_mu = [], []
    for b in range(n // B):
        xb, yb = x[b * B : (b + 1) * B], y[b * B : (b + 1) * B]
        step(model, xb, yb)
        probe = _with_head(model.net, {k: v[0] for k, v in step.last_samples.items()})
        h = _head_entries(model, compute_curvature(probe, xb, yb, structure="diag", mining_batch=B).H)
        c = 1.0 if scaling == "gibbs" else _pml_lam_factor(probe(xb).detach(), yb, n)
        terms.append(c * h)
        at_mu.append(
            c * _head_entries(model, compute_curvature(model.net, xb, yb, structure="diag", mining_batch=B).H)
        )
    T = len(terms)
    w = torch.tensor([m ** (T - 1 - t) for t in range(T)], dtype=torch.float64)
    combine = lambda hs: (  # noqa: E731
        steps_per_epoch(n, B) * sum(wt * h for wt, h in zip(w, hs)) / w.sum()
        if scaling == "gibbs"
        else m**T * n + sum(wt * h for wt, h in zip(w, hs))
    )
    H = model.curvature(steps_per_epoch(n, B)).H
    torch.testing.assert_close(H, combine(terms), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(H, combine(at_mu), rtol=1e-3), "the curvature must be taken at the samples"


def _flat_kron_layout(theta: dict[str, torch.Tensor]) -> torch.Tensor:
    """[S, out*(in+1)]: a Linear head's (weight, bias) in the Kronecker layout [W | b] row-major."""
    return torch.cat([theta["weight"], theta["bias"][..., None]], dim=-1).flatten(-2)


def _hand_precision(model: OnlineLaplaceNet, n_batches: int, delta: float) -> torch.Tensor:
    """(H + delta I) from the buffers by hand: H = n_b S / Z (gibbs), Kronecker G (x) A with A = S_A / Z."""
    st, z = model.state, float(model.state.weight)
    if model.settings.structure == "kron":
        H = torch.kron(n_batches * st.G0 / z, st.A0 / z)
    else:
        H = n_batches * st.S / z
        H = torch.diag(H) if H.dim() == 1 else H
    return H + delta * torch.eye(H.shape[0], dtype=H.dtype)


@pytest.mark.parametrize("structure", online_structures())
def test_sampling_uses_the_current_posterior(structure):
    """A step's draw is the current posterior's (same generator state), and that posterior's draws have
    mean mu and covariance (H + delta I)^-1 with H rebuilt by hand from the accumulated buffers."""
    x, y = tiny_data(n=40)
    s = OnlineSettings(structure=structure, memory=0.9, prior=2.0, marglik_every=0, dtype="float64")
    model = _online(s, len(y))
    step = OnlineStep(_cfg(), s, len(y), seed=1)
    nb = steps_per_epoch(len(y), B)
    for b in range(3):
        step(model, x[b * B : (b + 1) * B], y[b * B : (b + 1) * B])
    g = torch.Generator().set_state(step.generator.get_state())
    expected = model.posterior(nb).sample_params(1, g)
    step(model, x[3 * B : 4 * B], y[3 * B : 4 * B])
    for k, v in expected.items():
        torch.testing.assert_close(step.last_samples[k], v, rtol=0, atol=1e-15)

    S = 40000
    eps = sample_deviations(model.posterior(nb), S, torch.Generator().manual_seed(7))
    flat = _flat_kron_layout(eps)  # the same parameters in every structure, in one layout
    cov_ref = torch.linalg.inv(_hand_precision(model, nb, s.prior))
    if structure != "kron":  # flat layouts are (weight, bias): permute to [W | b]
        head = la_head(model.net)
        idx = _flat_kron_layout(
            {
                "weight": torch.arange(head.weight.numel()).reshape(head.weight.shape),
                "bias": head.weight.numel() + torch.arange(head.bias.numel()),
            }
        )
        cov_ref = cov_ref[idx][:, idx]
    emp = torch.cov(flat.T)
    sd = cov_ref.diagonal().sqrt()
    assert (flat.mean(0).abs() < 5 * sd / S**0.5).all()
    assert ((emp - cov_ref).abs() / torch.outer(sd, sd)).max() < 0.05  # correlation-scale error, ~4 sigma


def test_training_is_deterministic_under_a_seed():
    x, y = tiny_data(n=40)
    cfg = _cfg(epochs=2)
    s = OnlineSettings(dtype="float64")

    def trained(step_seed: int) -> dict:
        model = _online(s, len(y), epochs=2)
        train_net(model, OnlineStep(cfg, s, len(y), step_seed), cfg, Split(x, y), CPU, seed=2)
        return model.state_dict()

    a, b, c = trained(0), trained(0), trained(1)
    assert a.keys() == b.keys()
    for k in a:
        if k != "state.seconds":  # wall times
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert not torch.equal(a["state.S"], c["state.S"])  # another draw stream, another run


def test_marglik_retunes_the_prior_during_and_after_training(smoke_cfg, tmp_path):
    cfg = smoke_cfg.replace(epochs=3, method_options=(("online_marglik_every", 1),))
    data = load_benchmark(cfg)
    method, cache, _ = fit_method("online_la", cfg, data, tmp_path / "models")
    d = method.diagnostics
    assert len(d["prior_history_in_training"]) == 2  # after epochs 1 and 2; the final one is fit's
    assert d["prior_precision"] == method.posterior.delta
    lml = lambda delta: log_marglik(  # noqa: E731
        delta,
        exact_spectrum(method.posterior.curvature.H),
        float(method.posterior.theta.double().pow(2).sum()),
    )
    best = d["prior_precision"]
    assert lml(best) >= max(lml(best * 1.05), lml(best / 1.05))  # the maximiser at the trained weights


def test_steps_per_epoch_is_what_train_net_runs():
    for n in (32, 33, 34, 47):
        calls = []

        def loss(model, xb, yb, calls=calls):
            calls.append(len(yb))
            return model(xb).sum() * 0

        net = tiny_net()
        x, y = tiny_data(n=n)
        train_net(net, loss, _cfg(), Split(x, y), CPU, seed=0)
        assert len(calls) == steps_per_epoch(n, B), n


def test_pair_cap_keeps_a_seeded_uniform_subset_of_the_mined_triplets():
    x, y = tiny_data(n=12)
    F = tiny_net()(x).detach()[None]
    trip = mined_triplets(F, y[None], 0.2)
    n = int(trip.sum())
    assert n > 10
    assert torch.equal(cap_triplets(trip, 2 * n, torch.Generator()), trip)  # not binding: unchanged
    kept = [cap_triplets(trip, 10, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert int(kept[0].sum()) == 5 and bool((kept[0] <= trip).all())
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])
    model = _online(OnlineSettings(dtype="float64"), 12)
    head = la_head(model.net)
    acc = get_structure("diag").online_accumulator(head)(copy.deepcopy(head), torch.float64)
    phi = model.net.net[:-1](x)
    full = batch_curvature(acc, phi.detach(), y, PairLoss(), pair_cap=5000)
    assert full.pairs == 2 * n
    ref = _head_entries(model, compute_curvature(model.net, x, y, structure="diag", mining_batch=12).H)
    torch.testing.assert_close(full.curvature.H, ref)


def test_head_predictive_on_features_is_the_full_net_glm_over_the_head(smoke_cfg, tmp_path):
    data = load_benchmark(smoke_cfg)
    method, _, _ = fit_method("online_la", smoke_cfg, data, tmp_path / "models")
    post = method.posterior
    names = [n for n, p in method.net.named_parameters() if any(p is q for q in method.model.parameters())]
    full = DiagPosterior(
        method.net, Curvature("diag", "all", names, post.curvature.D, H=post.curvature.H), post.delta
    )
    x = data.test_id.x[:20].to(run_device())
    with torch.no_grad():
        pred = method.predict(x)
        torch.testing.assert_close(pred.mean, method.net(x))
    torch.testing.assert_close(pred.cov, full.glm_cov(x).to(pred.cov.dtype), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "options",
    [
        (("online_structure", "kron"),),
        (("online_structure", "last_layer"), ("predictive", "mc")),
        (("online_subset", "all"),),
        (("online_scaling", "lam"), ("online_marglik_every", 0), ("online_train_samples", 2)),
    ],
)
def test_every_structure_subset_and_scaling_fits_and_predicts(smoke_cfg, tmp_path, options):
    opts = dict(options)
    cfg = smoke_cfg.replace(
        predictive=opts.pop("predictive", "glm"), method_options=tuple(sorted(opts.items()))
    )
    METHODS.get("online_la").validate(cfg)
    data = load_benchmark(cfg)
    method, _, _ = fit_method("online_la", cfg, data, tmp_path / "models")
    with torch.no_grad():
        pred = predict_on(method, data.test_id.x)
    assert torch.isfinite(pred.mean).all() and torch.isfinite(pred.var).all() and (pred.var > 0).all()
    assert method.diagnostics["structure"] == opts.get("online_structure", "diag")


def test_training_time_is_split_into_train_hessian_and_prior_and_cached(smoke_cfg, tmp_path):
    data = load_benchmark(smoke_cfg)
    method, cache, timer = fit_method("online_la", smoke_cfg, data, tmp_path / "models")
    info = next(iter(cache.used.values()))
    rec = timer.for_method("online_la")
    assert rec["hessian"] > 0 and rec["train"] > 0
    assert rec["hessian"] == info["stages"]["hessian"]
    assert rec["train"] + info["stages"]["hessian"] + info["stages"]["prior"] == pytest.approx(
        info["seconds"]
    )
    again, cache2, timer2 = fit_method("online_la", smoke_cfg, data, tmp_path / "models")
    assert cache2.trained == 0 and timer2.for_method("online_la")["hessian"] == rec["hessian"]


@pytest.mark.parametrize("structure", ["diag", "last_layer"])
def test_pair_form_head_curvature_equals_the_jacobian_rows(structure):
    """The closed form from the pairs (online steps, Euclidean GGN) against the rows M = V^T J path."""
    x, y = tiny_data(n=16)
    model = _online(OnlineSettings(dtype="float64"), 16)
    head = la_head(model.net)
    phi = model.net.net[:-1](x).detach()
    got = [
        batch_curvature(
            get_structure(structure).online_accumulator(head, pair_form)(head, torch.float64),
            phi,
            y,
            PairLoss(),
        )
        for pair_form in (True, False)
    ]
    assert got[1].curvature.H.abs().sum() > 0
    torch.testing.assert_close(got[0].curvature.H, got[1].curvature.H, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("hessian,distance", [("ggn", "cosine"), ("jtj", "cosine"), ("jtj", "euclidean")])
def test_laplacian_form_head_diagonal_equals_the_jacobian_rows(hessian, distance, bias):
    """The head diagonal from the kept block Laplacian (online diag steps off the Euclidean GGN: LAM's
    cosine recipe, jtj) against the rows M = V^T J of torch.func Jacobians, with and without the head's
    bias, pairs capped."""
    phi, y = (
        torch.randn(24, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
        torch.arange(24) % 4,
    )
    head = torch.nn.Linear(12, 5, bias=bias).double()
    assert get_structure("diag").online_accumulator(head, pair_form=False) is LinearHeadLaplacianDiag
    loss = PairLoss(distance=distance)
    got, ref = (
        batch_curvature(
            c(head, torch.float64),
            phi,
            y,
            loss,
            hessian=hessian,
            pair_cap=40,
            generator=torch.Generator().manual_seed(0),
        )
        for c in (LinearHeadLaplacianDiag, lambda m, dt: DiagGGN(m, dt, subset="all"))
    )
    assert ref.curvature.H.shape == (5 * 12 + 5 * bias,) and ref.curvature.H.abs().sum() > 0
    # rtol 1e-6: the rows drop the Laplacian's eigenvalues below 1e-7 of its largest (`laplacian_factor`)
    torch.testing.assert_close(got.curvature.H, ref.curvature.H, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("structure", ["diag", "last_layer", "kron"])
def test_a_cnn_head_of_one_linear_takes_the_closed_form_and_matches_the_generic_accumulator(structure):
    """A CNN backbone's EmbeddingHead without whitening / hidden layers / L2 is one Linear: online steps take
    the pair-form (diag, last_layer) or closed-form (kron) accumulator, equal to the generic Jacobian path."""
    head = EmbeddingHead(12, 3, dropout=0.1).eval()
    assert single_linear(head) and not single_linear(EmbeddingHead(12, 3, whiten_dim=4))
    assert not single_linear(EmbeddingHead(12, 3, l2=True))
    cls = get_structure(structure).online_accumulator(head, pair_form=True)
    generic = {"diag": DiagGGN, "last_layer": LastLayerGGN, "kron": KronGGN}[structure]
    assert cls is not generic  # the closed form, not torch.func Jacobian rows
    head = head.double()
    phi, y = (
        torch.randn(16, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
        torch.arange(16) % 4,
    )
    subset = "all" if structure != "last_layer" else "last_layer"
    got, ref = (
        batch_curvature(c(head, torch.float64, **kw), phi, y, PairLoss()).curvature
        for c, kw in ((cls, {}), (generic, {"subset": subset}))
    )
    assert got.names == ref.names == [n for n, _ in head.named_parameters()]
    if structure == "kron":
        for a, b in zip(got.kron, ref.kron):
            torch.testing.assert_close(torch.kron(a.G, a.A), torch.kron(b.G, b.A), rtol=1e-9, atol=1e-12)
    else:
        assert ref.H.abs().sum() > 0
        torch.testing.assert_close(got.H, ref.H, rtol=1e-10, atol=1e-12)


def test_diagonal_pairs_equal_the_full_pair_curvature_s_diagonals_and_traces():
    """The online diag step's light pair terms (`DiagonalPairs`) against `contrastive_pair_curvature`: the
    same reducer weights, the diagonals of the same blocks, the same output-space traces; an exact
    duplicate item (distance 0) included."""
    g = torch.Generator().manual_seed(3)
    F = torch.randn(1, 12, 3, generator=g, dtype=torch.float64)
    F[0, 5] = F[0, 4]
    y = (torch.arange(12) % 3)[None]
    loss = PairLoss()
    counts = mined_pair_counts(F, y, loss.miner_margin)
    full = contrastive_pair_curvature(
        F,
        y,
        pos_margin=loss.pos_margin,
        neg_margin=loss.neg_margin,
        miner_margin=loss.miner_margin,
        counts=counts,
    )
    light = DiagonalPairs.of(F, counts, loss)
    torch.testing.assert_close(light.W_pos, full.W_pos)
    torch.testing.assert_close(light.W_neg, full.W_neg)
    A, _ = pair_hessians(
        F, 1.0
    )  # every pair's block, the duplicate pair (4, 5) (d = 0: a zero block) included
    n, a, b = torch.ones_like(full.W_pos, dtype=torch.bool).nonzero(as_tuple=True)
    torch.testing.assert_close(light.diagonals(n, a, b), A[n, a, b].diagonal(dim1=-2, dim2=-1))
    assert float(light.diagonals(*(torch.tensor([i]) for i in (0, 4, 5))).abs().sum()) == 0.0
    assert light.output_traces() == pytest.approx(full.output_traces(), rel=1e-12)
    assert full.output_traces()[0] > 0 and full.output_traces()[1] > 0


def test_a_head_registered_under_two_names_keeps_its_parameters():
    """The CNN heads register `last_linear` twice (attribute and inside `net`); the sampled forward must
    leave the module's own parameters in place (torch's tied functional_call does not) and train them."""
    net = EmbeddingHead(6, 2, whiten_dim=4)
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    s = OnlineSettings()
    model = OnlineLaplaceNet(net, s, 1, 16)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    loss = OnlineStep(_cfg(), s, 16, seed=0)(model, x, y)
    assert all(
        isinstance(p, torch.nn.Parameter) and p.is_leaf
        for _, p in net.named_parameters(remove_duplicate=False)
    )
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    shared = EmbeddingHead(6, 2, whiten_dim=6)
    shared.net[0].weight = shared.last_linear.weight = torch.nn.Parameter(torch.randn(2, 6))
    with pytest.raises(BenchError, match="shared by two submodules"):
        OnlineStep(_cfg(), s, 16, seed=0)(OnlineLaplaceNet(shared, s, 1, 16), x, y)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_a_net_whose_embedding_is_not_the_heads_output_is_refused():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_net()

        def forward(self, x):
            return 2 * self.inner(x)

    x, y = tiny_data(n=16)
    s = OnlineSettings(dtype="float64")
    model = OnlineLaplaceNet(Scaled(), s, 1, 16)
    with pytest.raises(BenchError, match="the embedding must be the head's output"):
        OnlineStep(_cfg(), s, 16, seed=0)(model, x[:B], y[:B])


@pytest.mark.parametrize("subset", ["head", "all"])
def test_online_la_on_a_cnn_with_a_head(subset):
    """A CNN with the backbone contract (`trunk`, `head`, BatchNorm: batch statistics in training, running
    ones for the curvature's copy and at test time): it trains, and its head predictive is the full net's
    GLM over the head's parameters (subset head), or it fits over all weights."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(80) % 4
    x = (torch.randn(80, 2, 5, 5, generator=g) + y[:, None, None, None] * 0.5).float()
    data = Dataset("tiny_images", Split(x[:64], y[:64]), Split(x[64:], y[64:]))
    cfg = preset_config("smoke").replace(
        quiet=True,
        batch_size=16,
        epochs=2,
        jacobian_chunk=32,
        posterior_samples=8,
        method_options=(("online_subset", subset),),
    )
    cpu = torch.device("cpu")

    def train_model(seed, recipe, dropout=0.0):  # the recipe's training, on the CNN instead of the MLP
        settings = METHODS.get("online_la").settings(cfg)
        model = OnlineLaplaceNet(TinyConvNet().float(), settings, cfg.epochs, len(data.train_id))
        train_net(model, recipe.loss(cfg), cfg, data.train_id, cpu, seed)
        return model

    method = METHODS.get("online_la")(cfg)
    method.fit(
        FitContext(
            cfg=cfg,
            data=data,
            device=cpu,
            timer=StageTimer(),
            method="online_la",
            train_model=train_model,
            seed=0,
        )
    )
    net = method.net
    assert not net.training and net.trunk[1].num_batches_tracked > 0  # BatchNorm trained, then eval
    with torch.no_grad():
        pred = method.predict(data.test_id.x)
        torch.testing.assert_close(pred.mean, net(data.test_id.x))
    assert (pred.var > 0).all() and torch.isfinite(pred.cov).all()
    post = method.posterior
    if subset == "head":
        assert post.model is net.head and post.curvature.D == 4 * 2 + 2
        names = jac.subset_names(net, "head")
        full = DiagPosterior(
            net, Curvature("diag", "head", names, post.curvature.D, H=post.curvature.H), post.delta
        )
        torch.testing.assert_close(pred.cov, full.glm_cov(data.test_id.x), rtol=1e-4, atol=1e-7)
    else:
        assert post.curvature.D == sum(p.numel() for p in net.parameters())


def test_the_model_cache_key_covers_the_online_training_code(smoke_cfg):
    """The recipe names the bench.la modules its training runs, so a change there retrains cached nets."""
    x, y = tiny_data(n=16)
    ctx = SimpleNamespace(data=SimpleNamespace(train_id=Split(x, y)), seed_for=lambda offset: offset)
    recipe = METHODS.get("online_la")(smoke_cfg).recipe(ctx)
    assert "bench.la.online" in recipe.modules
    key = lambda r: model_key(smoke_cfg, (5,), 16, 0, 0.0, r)["code"]  # noqa: E731
    assert key(recipe) != key(dataclasses.replace(recipe, modules=()))


@pytest.mark.parametrize(
    "options, message",
    [
        ((("online_structure", "kron"), ("online_subset", "all")), "eigendecomposition"),
        ((("online_structure", "last_layer"), ("online_subset", "all")), "online_subset=head"),
        ((("online_memory", 1.5),), "online_memory"),
        ((("online_prior", 0.0),), "online_prior"),
        ((("online_scaling", "bogus"),), "online_scaling"),
        ((("online_structure", "kron"), ("distance", "cosine")), "distance=euclidean"),
    ],
)
def test_bad_options_are_one_line(options, message):
    fields = {k: v for k, v in options if k == "distance"}
    cfg = preset_config("smoke").replace(
        method_options=tuple(o for o in options if o[0] != "distance"), **fields
    )
    with pytest.raises(BenchError, match=message):
        METHODS.get("online_la").validate(cfg)
    with pytest.raises(BenchError, match="hessian=ggn"):
        METHODS.get("online_la").validate(
            preset_config("smoke").replace(hessian="jtj", method_options=(("online_scaling", "lam"),))
        )
