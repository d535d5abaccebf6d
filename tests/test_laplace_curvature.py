"""The Hessian hot path against brute force: explicit jacrev Jacobians and autograd Hessians of PML's
ContrastiveLoss, float64 on tiny nets; laplace-torch for the JtJ option."""

from __future__ import annotations

import pytest
import torch

from bench.config import preset_config
from bench.errors import BenchError
from bench.la import jacobians as jac
from bench.la.curvature import accumulate
from bench.la.memory import check_full_memory
from bench.la.pairs import clamped_laplacians, contrastive_pair_curvature, pair_hessians
from bench.la.rank_k import SymmetricAccumulator
from bench.la.structures import compute_curvature
from bench.loss import PairLoss, make_loss_and_miner, mined_pair_counts
from tests.laplace_helpers import (
    ExactGGN,
    LastLayerDiagGGN,
    autograd_output_hessian,
    brute_ggn,
    full_jacobian,
    rel_err,
    tiny_data,
    tiny_net,
)

M = 8  # mining batch


def _emb(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.6, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("miner_type", ["all", "hard", "semihard", "easy"])
def test_pair_counts_match_pml_miner(miner_type):
    F, y = _emb(14, seed=3)
    cfg = preset_config("smoke").replace(miner_type=miner_type)
    _, miner = make_loss_and_miner(cfg)
    a, p, n = miner(F, y)
    Cp, Cn = mined_pair_counts(F[None], y[None], cfg.miner_margin, miner_type)
    ref_p = torch.zeros(14, 14, dtype=torch.float64).index_put_(
        (a, p), torch.ones(len(a), dtype=torch.float64), accumulate=True
    )
    ref_n = torch.zeros(14, 14, dtype=torch.float64).index_put_(
        (a, n), torch.ones(len(a), dtype=torch.float64), accumulate=True
    )
    assert torch.equal(Cp[0], ref_p) and torch.equal(Cn[0], ref_n)


def test_a_batch_with_one_mined_triplet_has_no_curvature_like_pmls_zero_loss():
    F = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.1], [5.0, 5.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2])  # only (0, 1, 2) is within the margin; (1, 0, 2) is not
    _, miner = make_loss_and_miner(preset_config("smoke"))
    assert len(miner(F, y)[0]) == 1
    pc = contrastive_pair_curvature(F[None], y[None], pos_margin=0.0, neg_margin=1.0, miner_margin=0.2)
    assert pc.W_pos.abs().sum() == 0 and pc.W_neg.abs().sum() == 0
    assert autograd_output_hessian(F, y).abs().max() == 0


def test_analytic_pair_hessian_matches_autograd():
    F, _ = _emb(5, seed=1)
    A, _ = pair_hessians(F[None], +1.0)
    for i, j in [(0, 1), (2, 4), (3, 0)]:
        ref = torch.autograd.functional.hessian(lambda u: u.norm(), F[i] - F[j])
        assert torch.allclose(A[0, i, j], ref, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_laplacian_is_the_pml_loss_hessian(seed):
    """The exact L = kept + dropped equals autograd's Hessian of the PML batch loss, reducer included."""
    F, y = _emb(12, seed)
    pc = contrastive_pair_curvature(F[None], y[None], pos_margin=0.0, neg_margin=1.0, miner_margin=0.2)
    H = autograd_output_hessian(F, y)
    Lp, Ld = clamped_laplacians(pc)
    assert rel_err(Lp[0], autograd_output_hessian(F, y, "pos")) < 1e-12
    assert torch.linalg.eigvalsh(Lp[0]).min() > -1e-12  # kept part is PSD
    assert torch.linalg.eigvalsh(Ld[0]).max() < 1e-12  # dropped part is NSD
    assert rel_err(Lp[0] + Ld[0], H) < 1e-12
    kept, dropped = pc.output_traces()
    assert abs(kept - float(Lp[0].trace()) / 2) < 1e-12 * kept  # tr L = 2 sum w tr A (both ends of a pair)
    assert dropped > 0 and abs(dropped + float(Ld[0].trace()) / 2) < 1e-12 * dropped


@pytest.mark.parametrize("psd", ["none", "clamp"])
def test_full_ggn_matches_brute_force(psd):
    """The driver's chunks and Jacobians against brute force: the exact (indefinite) GGN through a
    test-only accumulator, and the clamped one the methods use."""
    model, (x, y) = tiny_net(), tiny_data(21)
    if psd == "none":
        curv = accumulate(ExactGGN(model), x, y, hessian="ggn", mining_batch=M)
    else:
        curv = compute_curvature(model, x, y, structure="full", hessian="ggn", mining_batch=M)
    ref = brute_ggn(model, x, y, M, part="all" if psd == "none" else "pos")
    assert rel_err(curv.H, ref) < 1e-5
    if psd == "clamp":
        assert torch.linalg.eigvalsh(curv.H).min() > -1e-10 * curv.H.abs().max()
        assert 0 < curv.stats["dropped_fraction_param"] < 1 and 0 < curv.stats["dropped_fraction_output"] < 1
        # parameter-space dropped share: tr(J^T L- J) of the brute-force exact minus kept
        exact = brute_ggn(model, x, y, M, part="all")
        dropped = float(ref.trace() - exact.trace())
        assert abs(curv.stats["param_dropped"] - dropped) < 1e-8 * abs(dropped)


def test_chunking_and_dtype_do_not_change_h():
    model, (x, y) = tiny_net(), tiny_data(40)
    a = compute_curvature(model, x, y, structure="full", mining_batch=M, chunk=M)
    b = compute_curvature(model, x, y, structure="full", mining_batch=M, chunk=1000)
    assert rel_err(a.H, b.H) < 1e-12
    m32 = tiny_net().float()
    c = compute_curvature(m32, x.float(), y, structure="full", mining_batch=M, dtype=torch.float64)
    assert c.H.dtype == torch.float64 and rel_err(c.H, a.H) < 1e-4


@pytest.mark.parametrize("hessian", ["ggn", "jtj"])
def test_diag_and_last_layer_are_blocks_of_full(hessian):
    model, (x, y) = tiny_net(), tiny_data(24)
    kw = dict(hessian=hessian, mining_batch=M)
    full = compute_curvature(model, x, y, structure="full", **kw).H
    diag = compute_curvature(model, x, y, structure="diag", **kw).H
    assert rel_err(diag, full.diagonal()) < 1e-12
    ll = compute_curvature(model, x, y, structure="last_layer", **kw)
    k = ll.D
    assert rel_err(ll.H, full[-k:, -k:]) < 1e-12  # last layer = the trailing (weight, bias) block
    lld = accumulate(LastLayerDiagGGN(model), x, y, **kw)
    assert rel_err(lld.H, ll.H.diagonal()) < 1e-12
    if hessian == "ggn":  # translation invariance: the last bias has no curvature
        assert ll.H[-2:, -2:].abs().max() < 1e-12


def test_last_layer_closed_form_jacobian():
    model, (x, _) = tiny_net(), tiny_data(6)
    names = jac.subset_names(model, "last_layer")
    ref = full_jacobian(model, x, names).reshape(6, 2, -1)
    assert rel_err(jac.last_layer_jacobian(model, x), ref) < 1e-12
    assert rel_err(jac.embedding_jacobian(model, x, names), ref) < 1e-12


def test_jtj_equals_laplace_torch_full_h():
    from laplace import Laplace

    model, (x, _) = tiny_net(), tiny_data(30)
    y = torch.zeros(30, dtype=torch.long)
    curv = compute_curvature(model, x, y, structure="full", hessian="jtj", mining_batch=M)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.zeros(30, 2, dtype=torch.float64)), batch_size=7
    )
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="full")
    la.fit(loader)
    assert rel_err(curv.H, la.H.double()) < 1e-6  # laplace-torch accumulates partly in float32


def test_symmetric_update_paths_equal_gemm():
    g = torch.Generator().manual_seed(0)
    Ms = [torch.randn(k, 37, generator=g, dtype=torch.float64) for k in (5, 11, 3)]
    ref = sum(m.T @ m for m in Ms)
    for use_blas in (True, False):
        acc = SymmetricAccumulator(37, torch.float64, torch.device("cpu"), block=8, use_blas=use_blas)
        for m in Ms:
            acc.update(m)
        assert rel_err(acc.result(), ref) < 1e-13


def test_memory_refusal_is_one_clear_line():
    with pytest.raises(BenchError, match="last_layer_la, diag_la or kfac_la") as e:
        check_full_memory(200_000, torch.float32, torch.device("cpu"))
    assert "GiB" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BenchError, match=r"full 1000x1000 float64 posterior .* only 0\.0 GiB is free"):
        check_full_memory(1000, torch.float64, torch.device("cpu"), available=10_000_000)
    check_full_memory(1000, torch.float64, torch.device("cpu"), available=10**9)


def test_non_finite_hessian_refused():
    model, (x, y) = tiny_net(), tiny_data(16)
    x[3, 0] = float("nan")
    with pytest.raises(BenchError, match="non-finite"):
        compute_curvature(model, x, y, structure="diag", hessian="jtj", mining_batch=M)


def test_near_duplicate_pairs_have_bounded_curvature():
    from bench.la.pairs import DIST_FLOOR

    F = torch.tensor([[[0.0, 0.0], [1e-7, 0.0], [3.0, 4.0]]], dtype=torch.float64)
    A, dist = pair_hessians(F, +1.0)
    assert float(A.abs().max()) <= 1.0 / DIST_FLOOR + 1e-9
    # far pairs keep the exact (I - u u^T / d^2) / d
    u = F[0, 0] - F[0, 2]
    exact = (torch.eye(2, dtype=torch.float64) - torch.outer(u, u) / 25.0) / 5.0
    assert torch.allclose(A[0, 0, 2], exact)


@pytest.mark.parametrize("smooth", [False, True])
def test_linear_closed_form_jacobian_matches_jacrev(smooth):
    model, (x, _) = tiny_net(smooth=smooth), tiny_data(6)
    names = jac.subset_names(model, "all")
    for sub in (names, names[2:5]):  # all weights, and a subset cutting across layers
        ref = full_jacobian(model, x, sub).reshape(6, 2, -1)
        assert rel_err(jac.linear_jacobian(model, x, sub), ref) < 1e-12
        assert rel_err(jac.subset_jacobian(model, x, "all", sub), ref) < 1e-12


def test_linear_closed_form_jacobian_declines_what_it_cannot_do():
    x, _ = tiny_data(6)
    shared = torch.nn.Linear(5, 5).double()  # a layer run twice per forward
    model = torch.nn.Sequential(shared, torch.nn.Tanh(), shared, torch.nn.Linear(5, 2).double())
    names = jac.subset_names(model, "all")
    assert jac.linear_jacobian(model, x, names) is None
    ref = full_jacobian(model, x, names).reshape(6, 2, -1)
    assert rel_err(jac.subset_jacobian(model, x, "all", names), ref) < 1e-12  # falls back to jacrev
    bn = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4, affine=False), torch.nn.Linear(4, 2)
    )
    bn = bn.double()
    assert jac.linear_jacobian(bn, x, jac.subset_names(bn, "all")) is None  # items coupled in train mode
    assert jac.linear_jacobian(bn.eval(), x, jac.subset_names(bn, "all")) is not None


# --- distance=cosine: the pair loss of L2-normalised embeddings ------------------------------------

COSINE = preset_config("smoke").replace(distance="cosine")


def test_normalised_pair_hessian_matches_autograd():
    from bench.la.pairs import normalised_pair_hessians

    F, _ = _emb(6, seed=4)
    pairs = [(0, 1), (2, 5), (3, 0), (4, 2)]
    H = normalised_pair_hessians(F[[i for i, _ in pairs]], F[[j for _, j in pairs]])
    for k, (i, j) in enumerate(pairs):

        def dist(z):
            a, b = z[:2], z[2:]
            return (a / a.norm() - b / b.norm()).norm()

        ref = torch.autograd.functional.hessian(dist, torch.cat([F[i], F[j]]))
        assert torch.allclose(H[k], ref, atol=1e-10)
    assert torch.linalg.eigvalsh(H).min() < -1e-6  # indefinite even as a positive pair's block


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_block_laplacian_is_the_pml_loss_hessian(seed):
    """Kept + dropped (per-pair PSD / NSD parts of the 2d x 2d blocks) equals autograd's Hessian of
    PML's batch loss with its default (normalised) LpDistance; the kept part is PSD."""
    F, y = _emb(12, seed)
    pc = contrastive_pair_curvature(
        F[None], y[None], pos_margin=0.0, neg_margin=1.0, miner_margin=0.2, distance="cosine"
    )
    Lp, Ld = clamped_laplacians(pc)
    H = autograd_output_hessian(F, y, cfg=COSINE)
    assert H.abs().max() > 0
    assert rel_err(Lp[0] + Ld[0], H) < 1e-10
    assert torch.linalg.eigvalsh(Lp[0]).min() > -1e-10 and torch.linalg.eigvalsh(Ld[0]).max() < 1e-10
    kept, dropped = pc.output_traces()
    assert kept == pytest.approx(float(Lp[0].trace()) / 2) and dropped == pytest.approx(
        -float(Ld[0].trace()) / 2
    )
    # each pair's own kept block is the PSD part of s w hess d: check one pair against eigh of autograd's
    bi, ai, bj = (t[0] for t in pc.pair_index)
    w = float(pc.W_pos[bi, ai, bj] - pc.W_neg[bi, ai, bj])  # signed weight
    z = torch.cat([F[ai], F[bj]])
    ref = w * torch.autograd.functional.hessian(
        lambda v: (v[:2] / v[:2].norm() - v[2:] / v[2:].norm()).norm(), z
    )
    ev, V = torch.linalg.eigh(ref)
    assert torch.allclose(pc.B_kept[0], (V * ev.clamp_min(0)) @ V.T, atol=1e-10)


def test_cosine_ggn_matches_brute_force():
    """The exact (unclamped) cosine GGN through the driver against jacrev Jacobians and autograd
    Hessians of PML's loss; diag and last layer stay blocks of the clamped full GGN."""
    model, (x, y) = tiny_net(), tiny_data(21)
    loss = PairLoss(distance="cosine")
    curv = accumulate(ExactGGN(model), x, y, hessian="ggn", mining_batch=M, loss=loss)
    assert rel_err(curv.H, brute_ggn(model, x, y, M, part="all", cfg=COSINE)) < 1e-8
    full = compute_curvature(model, x, y, structure="full", mining_batch=M, loss=loss)
    assert torch.linalg.eigvalsh(full.H).min() > -1e-10 * full.H.abs().max()
    assert 0 < full.stats["dropped_fraction_output"] < 1
    diag = compute_curvature(model, x, y, structure="diag", mining_batch=M, loss=loss).H
    assert rel_err(diag, full.H.diagonal()) < 1e-12
    ll = compute_curvature(model, x, y, structure="last_layer", mining_batch=M, loss=loss)
    assert rel_err(ll.H, full.H[-ll.D :, -ll.D :]) < 1e-12


def test_kron_refuses_the_cosine_ggn_in_one_line():
    model, (x, y) = tiny_net(), tiny_data(16)
    with pytest.raises(BenchError, match="distance=euclidean") as e:
        compute_curvature(model, x, y, structure="kron", mining_batch=M, loss=PairLoss(distance="cosine"))
    assert "\n" not in str(e.value)
    compute_curvature(
        model, x, y, structure="kron", hessian="jtj", mining_batch=M, loss=PairLoss(distance="cosine")
    )
