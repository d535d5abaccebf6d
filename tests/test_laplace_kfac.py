"""Kronecker-factored curvature (KronGGN) on Linear and Conv2d layers: the layer quantities against jacrev,
exactness where KFAC is exact (one item at one location; KFAC-reduce on a linear tail), curvlinops' KFAC
where the conventions agree, the pair formula against an explicit loop over pairs, and the last layer's
factors against the exact GGN block with many pairs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.errors import BenchError
from bench.la import jacobians as jac
from bench.la.curvature import KronGGN, accumulate
from bench.la.pairs import clamped_laplacians, contrastive_pair_curvature
from bench.la.structures import compute_curvature
from bench.loss import PairLoss
from tests.laplace_helpers import (
    TinyConvNet,
    UniformKronGGN,
    full_jacobian,
    kron_to_flat,
    rel_err,
    tiny_data,
    tiny_images,
    tiny_net,
)

M = 8  # mining batch


def _layer_mask(model, curv):
    layers = jac.kron_layers(model, curv.names)
    sizes = [sum(p.numel() for p in layer.parameters(recurse=False)) for layer in layers]
    return torch.block_diag(*[torch.ones(b, b, dtype=torch.float64) for b in sizes])


@pytest.mark.parametrize(
    "kw",
    [
        dict(padding=1),
        dict(stride=2),
        dict(padding="same", dilation=2),
        dict(padding="same", kernel_size=2),
        dict(padding=(0, 1), stride=(1, 2)),
    ],
)
def test_conv_patches_reproduce_the_convolution(kw):
    kw = {"kernel_size": 3, **kw}
    conv = nn.Conv2d(2, 3, **kw).double()
    x = torch.randn(4, 2, 6, 7, dtype=torch.float64)
    U = jac.conv_patches(conv, x)  # [n, L, in']
    out = U @ conv.weight.reshape(3, -1).T + conv.bias
    ref = conv(x)
    assert torch.allclose(out.transpose(1, 2).reshape(ref.shape), ref, atol=1e-12)


def test_layer_quantities_give_each_layers_exact_jacobian():
    """sum_s B_s (x) U_s^T over the locations equals jacrev's Jacobian for every Conv2d and Linear."""
    model, (x, _) = TinyConvNet(), tiny_images(4)
    layers = jac.kron_layers(model, jac.subset_names(model, "all"))
    assert [type(layer) for layer in layers] == [nn.Conv2d, nn.Conv2d, nn.Linear]
    _, qs = jac.layer_quantities(model, x, layers)
    for layer, (U, B) in zip(layers, qs):
        assert U.shape[1] == B.shape[1] == {0: 25, 1: 4, 2: 1}[layers.index(layer)]
        Jl = torch.einsum("nsko,nsi->nkoi", B, U)  # [n, d, out, in']
        k = layer.weight[0].numel()
        J = Jl[..., :k].reshape(4, 2, -1)
        if layer.bias is not None:
            J = torch.cat([J, Jl[..., k]], dim=-1)
        ref = full_jacobian(model, x, jac.kron_names(model, [layer])).reshape(4, 2, -1)
        assert rel_err(J, ref) < 1e-12


def _jtj_of_one_item(model, x1):
    x2 = x1.repeat(2, *[1] * (x1.dim() - 1))  # one item, twice (a mining batch needs two)
    J = full_jacobian(model, x2)
    return x2, J.T @ J


def test_kron_is_exact_for_one_item_jtj_mlp():
    """KFAC of J^T J is exact for a single item (G = B^T B, A = a a^T), block-diagonal over layers."""
    model, (x, _) = tiny_net(), tiny_data(1)
    x2, ref = _jtj_of_one_item(model, x)
    kr = compute_curvature(
        model, x2, torch.zeros(2, dtype=torch.long), structure="kron", hessian="jtj", mining_batch=2
    )
    assert rel_err(kron_to_flat(model, kr), ref * _layer_mask(model, kr)) < 1e-10


def test_kron_is_exact_for_one_item_at_one_location_conv():
    """A Conv2d whose output has one location (kernel = input size): KFC is exact for one item."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 2)).double().eval()
    x2, ref = _jtj_of_one_item(model, torch.randn(1, 2, 3, 3, dtype=torch.float64))
    kr = compute_curvature(
        model, x2, torch.zeros(2, dtype=torch.long), structure="kron", hessian="jtj", mining_batch=2
    )
    assert rel_err(kron_to_flat(model, kr), ref * _layer_mask(model, kr)) < 1e-10


def test_kfac_reduce_is_exact_for_one_item_on_a_linear_tail():
    """Conv2d -> average pool -> Linear: B_s is the same at every location, J = (sum_s B_s) (x) mean_s U_s,
    so KFAC-reduce is exact for one item (Eschenhagen et al. 2023) while KFC-expand is not."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
        .double()
        .eval()
    )
    x2, ref = _jtj_of_one_item(model, torch.randn(1, 2, 4, 4, dtype=torch.float64))
    y2 = torch.zeros(2, dtype=torch.long)
    reduce = compute_curvature(
        model, x2, y2, structure="kron", hessian="jtj", mining_batch=2, accumulator_options={"reduce": True}
    )
    mask = _layer_mask(model, reduce)
    assert rel_err(kron_to_flat(model, reduce), ref * mask) < 1e-10
    expand = compute_curvature(model, x2, y2, structure="kron", hessian="jtj", mining_batch=2)
    assert rel_err(kron_to_flat(model, expand), ref * mask) > 1e-2


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_uniform_weights_equal_curvlinops_kfac(approx):
    """With standard KFAC's weights (every item and location alike) the factors of J^T J are curvlinops'
    KFAC of MSELoss(sum) (type-2 Fisher = 2 J^T J, so its G is twice ours), on a CNN with BatchNorm."""
    from curvlinops import FisherType, KFACLinearOperator, KFACType

    model, (x, y) = TinyConvNet(), tiny_images(16)
    acc = UniformKronGGN(model, torch.float64, "all", reduce=approx == "reduce")
    curv = accumulate(acc, x, y, hessian="jtj", mining_batch=M)
    assert curv.stats["excluded_params"] == 6  # BatchNorm's weight and bias stay at theta_MAP
    params = [p for n, p in model.named_parameters() if n in curv.names]
    kfac = KFACLinearOperator(
        model,
        nn.MSELoss(reduction="sum"),
        params,
        [(x, torch.zeros(16, 2, dtype=torch.float64))],
        fisher_type=FisherType.TYPE2,
        separate_weight_and_bias=False,
        check_deterministic=False,
        kfac_approx=KFACType.EXPAND if approx == "expand" else KFACType.REDUCE,
    )
    kfac.compute_kronecker_factors()
    for name, f in zip(["trunk.0", "trunk.3", "head"], curv.kron):
        assert rel_err(f.G, kfac._gradient_covariances[name] / 2) < 1e-10
        assert rel_err(f.A, kfac._input_covariances[name]) < 1e-10


def test_jtj_factors_weight_the_input_factor_by_the_output_trace():
    """G = sum over items and locations of B^T B, A = sum c U U^T / sum c with c = ||B||_F^2 (explicit
    loop)."""
    model, (x, y) = TinyConvNet(), tiny_images(8)
    curv = compute_curvature(model, x, y, structure="kron", hessian="jtj", mining_batch=M)
    _, qs = jac.layer_quantities(model, x, jac.kron_layers(model, curv.names))
    for f, (U, B) in zip(curv.kron, qs):
        G, A, C = 0, 0, 0
        for i in range(8):
            for s in range(U.shape[1]):
                c = float((B[i, s] ** 2).sum())
                G, A, C = G + B[i, s].T @ B[i, s], A + c * torch.outer(U[i, s], U[i, s]), C + c
        assert rel_err(f.G, G) < 1e-12 and rel_err(f.A, A / C) < 1e-12


def test_ggn_factors_match_an_explicit_loop_over_pairs_and_locations():
    """The vectorised Laplacian form against the pseudo-sample definition, pair by pair: for a kept pair
    with block S, X1 = Bbar^T S Bbar, Y1 = dU dU^T and X2 = dB^T S dB, Y2 = Ubar Ubar^T per location;
    G = sum X, A = sum tr(X) Y / sum tr(X)."""
    model, (x, y) = TinyConvNet(), tiny_images(16)
    curv = compute_curvature(model, x, y, structure="kron", hessian="ggn", mining_batch=M)
    layers = jac.kron_layers(model, curv.names)
    sums = [[0, 0, 0.0] for _ in layers]
    pairs = 0
    for b in range(0, 16, M):
        xb, yb = x[b : b + M], y[b : b + M]
        f, qs = jac.layer_quantities(model, xb, layers)
        pc = contrastive_pair_curvature(f[None], yb[None], pos_margin=0.0, neg_margin=1.0, miner_margin=0.2)
        Lk = clamped_laplacians(pc)[0][0].reshape(M, 2, M, 2)
        for a in range(M):
            for c in range(a + 1, M):
                S = -Lk[a, :, c, :]
                if S.abs().max() == 0:
                    continue
                pairs += 1
                for acc, (U, B) in zip(sums, qs):
                    for s in range(U.shape[1]):
                        Bbar, dB = (B[a, s] + B[c, s]) / 2, B[a, s] - B[c, s]
                        Ubar, dU = (U[a, s] + U[c, s]) / 2, U[a, s] - U[c, s]
                        for g, v in ((Bbar, dU), (dB, Ubar)):
                            X = g.T @ S @ g
                            acc[0] = acc[0] + X
                            acc[1] = acc[1] + X.trace() * torch.outer(v, v)
                            acc[2] += float(X.trace())
    assert pairs > 10 and curv.stats["pseudo_samples"] == pairs
    for f, (G, A, C) in zip(curv.kron, sums):
        assert rel_err(f.G, G) < 1e-10 and rel_err(f.A, A / C) < 1e-10


def test_last_layer_factors_against_the_exact_block_with_many_pairs():
    """The last layer (a CNN's head): tr(G (x) A) equals the exact GGN block's trace, and the relative
    Frobenius error is below that of the factors before (A = the plain mean of dU dU^T over kept pairs)."""
    model, (x, y) = TinyConvNet(d=3), tiny_images(320, classes=4)
    kw = dict(hessian="ggn", mining_batch=16, loss=PairLoss())
    kr = compute_curvature(model, x, y, structure="kron", subset="head", **kw)
    exact = compute_curvature(model, x, y, structure="full", subset="head", **kw).H
    assert kr.stats["pseudo_samples"] > 500
    K = kron_to_flat(model, kr)
    assert abs(float(K.trace() / exact.trace()) - 1) < 1e-10
    # the factors before: same G, A = mean over kept pairs of dU dU^T
    phi = torch.cat([model.trunk(x), torch.ones(320, 1, dtype=torch.float64)], 1).detach()
    A_old, n = 0, 0
    for b in range(0, 320, 16):
        pc = contrastive_pair_curvature(
            model(x[b : b + 16])[None].detach(),
            y[b : b + 16][None],
            pos_margin=0.0,
            neg_margin=1.0,
            miner_margin=0.2,
        )
        ia, ib = torch.nonzero(torch.triu(pc.W_pos[0] + pc.W_pos[0].T, 1) > 0, as_tuple=True)
        dU = phi[b + ia] - phi[b + ib]
        A_old, n = A_old + dU.T @ dU, n + len(ia)
    old = type(kr)(kr.structure, kr.subset, kr.names, kr.D, kron=[type(kr.kron[0])(kr.kron[0].G, A_old / n)])
    err_new, err_old = rel_err(K, exact), rel_err(kron_to_flat(model, old), exact)
    assert err_new < err_old, (err_new, err_old)
    assert K[-3:, -3:].abs().max() < 1e-12 * K.abs().max()  # translation invariance: the last bias has none


def test_kron_last_layer_exact_for_one_pair_ggn():
    model = tiny_net()
    x, _ = tiny_data(3)
    y = torch.tensor([0, 0, 1])  # one positive pair (both orders), negatives dropped by the clamp
    loss = PairLoss(miner_margin=100.0)
    kr = compute_curvature(model, x, y, structure="kron", loss=loss, mining_batch=3)
    full = compute_curvature(model, x, y, structure="full", loss=loss, mining_batch=3).H
    dense = kron_to_flat(model, kr)
    k = 3 * 2 + 2
    assert rel_err(dense[-k:, -k:], full[-k:, -k:]) < 1e-10
    assert kr.stats["dropped_fraction_output"] > 0


def test_pair_curvature_that_is_not_a_laplacian_is_refused(monkeypatch):
    from bench.la import curvature

    model, (x, y) = tiny_net(), tiny_data(16)
    real = curvature.clamped_laplacians

    def broken(pc):
        L, Ld = real(pc)
        return L + torch.eye(L.shape[-1], dtype=L.dtype), Ld  # PSD, but the rows of blocks no longer sum to 0

    monkeypatch.setattr(curvature, "clamped_laplacians", broken)
    with pytest.raises(BenchError, match="not a block graph Laplacian"):
        accumulate(KronGGN(model), x, y, hessian="ggn", mining_batch=M)


def test_unsupported_conv_is_one_line():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2, 2)).double()
    with pytest.raises(BenchError, match="groups=2"):
        KronGGN(model)
    assert len(KronGGN(model, subset="head").layers) == 1  # the head alone is fine
