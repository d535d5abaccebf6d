"""Shared brute-force references and test-only curvature paths for the Laplace tests (float64, tiny nets)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev

from backbones.mlp import EmbeddingNet
from bench.config import preset_config
from bench.la import jacobians as jac
from bench.la.curvature import Chunk, Curvature, DiagGGN, FullGGN, KronGGN
from bench.la.pairs import clamped_laplacians
from bench.loss import make_loss_and_miner


def tiny_net(
    in_dim: int = 5, hidden: tuple[int, ...] = (4, 3), d: int = 2, seed: int = 0, smooth: bool = False
) -> EmbeddingNet:
    """A float64 EmbeddingNet; smooth=True swaps ReLU for Tanh (no kinks: the linearisation error of
    the GLM predictive is then second order in the posterior spread)."""
    torch.manual_seed(seed)
    net = EmbeddingNet(in_dim, hidden, d).double()
    if smooth:
        for i, mod in enumerate(net.net):
            if isinstance(mod, torch.nn.ReLU):
                net.net[i] = torch.nn.Tanh()
    return net


class TinyConvNet(nn.Module):
    """A float64 CNN with the backbone contract (`trunk`, `head`): Conv2d(3x3, pad 1) - BatchNorm2d (eval,
    non-trivial running statistics) - act - Conv2d(3x3, stride 2, no bias) - act - global average pool -
    head Linear. Inputs [n, c_in, 5, 5]; the second conv has 2 x 2 output locations."""

    def __init__(self, c_in: int = 2, d: int = 2, seed: int = 0, smooth: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        act = nn.Tanh if smooth else nn.ReLU
        self.trunk = nn.Sequential(
            nn.Conv2d(c_in, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            act(),
            nn.Conv2d(3, 4, 3, stride=2, bias=False),
            act(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4, d)
        bn = self.trunk[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def tiny_images(
    n: int = 24, c_in: int = 2, classes: int = 3, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c_in, 5, 5, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def kron_to_flat(model: nn.Module, curvature: Curvature) -> torch.Tensor:
    """Dense block-diagonal H [D, D] in the flat (named_parameters) layout from [W | b]-layout Kronecker
    factors, one block per Linear/Conv2d layer (weight row-major [out, in'], then bias [out])."""
    blocks = []
    for layer, f in zip(jac.kron_layers(model, curvature.names), curvature.kron):
        out, k = layer.weight.shape[0], layer.weight[0].numel()
        cols = k + (layer.bias is not None)
        K = torch.kron(f.G, f.A)  # index o * cols + i
        perm = [o * cols + i for o in range(out) for i in range(k)] + [
            o * cols + k for o in range(out) if cols > k
        ]
        blocks.append(K[perm][:, perm])
    return torch.block_diag(*blocks)


class UniformKronGGN(KronGGN):
    """Test-only: standard KFAC's pseudo-sample weights (every item and location alike), the convention
    curvlinops and laplace-torch use."""

    def item_weights(self, B: torch.Tensor) -> torch.Tensor:
        return torch.ones(B.shape[:2], dtype=B.dtype, device=B.device)


def tiny_data(
    n: int = 24, in_dim: int = 5, classes: int = 3, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_dim, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def full_jacobian(model: torch.nn.Module, x: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
    """[n*d, D] by jacrev of the whole batch output w.r.t. a flat parameter vector."""
    params = dict(model.named_parameters())
    names = names or list(params)
    flat = torch.cat([params[k].detach().reshape(-1) for k in names])

    def f(theta: torch.Tensor) -> torch.Tensor:
        p, i = {}, 0
        for k in names:
            p[k] = theta[i : i + params[k].numel()].reshape(params[k].shape)
            i += params[k].numel()
        return functional_call(model, {**{k: v.detach() for k, v in params.items()}, **p}, (x,))

    J = jacrev(f)(flat)
    return J.reshape(-1, flat.numel())


def autograd_output_hessian(
    F: torch.Tensor, y: torch.Tensor, part: str = "all", cfg=None, reducer=None
) -> torch.Tensor:
    """Hessian [B*d, B*d] of PML's ContrastiveLoss (AvgNonZeroReducer, or `reducer`, e.g. SumReducer())
    w.r.t. the embeddings, the pairs fixed to what the training miner yields; part='pos' keeps only
    the positive pairs."""
    cfg = cfg or preset_config("smoke")
    loss_fn, miner = make_loss_and_miner(cfg)
    if reducer is not None:
        from pytorch_metric_learning import losses

        loss_fn = losses.ContrastiveLoss(
            pos_margin=cfg.pos_margin, neg_margin=cfg.neg_margin, distance=loss_fn.distance, reducer=reducer
        )
    a, p, n = miner(F, y)
    if part == "pos":
        e = a[:0]
        idx = (a, p, e, e)
    else:
        idx = (a, p, a, n)
    B, d = F.shape
    return torch.autograd.functional.hessian(lambda E: loss_fn(E, y, idx), F).reshape(B * d, B * d)


def brute_ggn(model, x, y, m: int, part: str = "all", names=None, cfg=None, reducer=None) -> torch.Tensor:
    """sum over consecutive mining batches of J_b^T H_b J_b (explicit jacrev and autograd Hessians;
    `reducer` as in `autograd_output_hessian`)."""
    H = None
    for s in range(0, len(y) - 1, m):
        xb, yb = x[s : s + m], y[s : s + m]
        if len(yb) < 2:
            continue
        J = full_jacobian(model, xb, names)
        with torch.no_grad():
            F = model(xb)
        Lb = autograd_output_hessian(F, yb, part, cfg, reducer)
        term = J.T @ Lb @ J
        H = term if H is None else H + term
    return H


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class ExactGGN(FullGGN):
    """Test-only: the exact GGN sum_b J_b^T L_b J_b with the unclamped, indefinite block Laplacian
    L = L_kept + L_dropped (dense accumulation, no PSD clamp)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        super().__init__(model, dtype)
        self.H = torch.zeros(self.D, self.D, dtype=self.dtype, device=self.device)

    def add(self, chunk: Chunk) -> None:
        nbc, m = chunk.valid.shape
        Jb = chunk.J.reshape(nbc, m * chunk.J.shape[1], self.D)
        L_kept, L_dropped = clamped_laplacians(chunk.pairs)
        self.H += torch.einsum("bkp,bkl,blq->pq", Jb, L_kept + L_dropped, Jb)

    def result(self) -> Curvature:
        return self._curvature(H=self.H)


class LastLayerDiagGGN(DiagGGN):
    """Test-only: the diagonal over the last layer (a structure no method uses)."""

    subset = "last_layer"


# The paper preset's full GGN (D = 13,410, Fashion-MNIST, 15 epochs): count of eigenvalues above t,
# from an exact eigvalsh; the marglik optimum there is delta = 1.638 (||theta||^2 = 462.9).
PAPER_SPECTRUM_COUNTS = (
    (1e4, 1),
    (1e3, 15),
    (1e2, 63),
    (10, 207),
    (1, 673),
    (0.1, 2102),
    (1e-2, 4500),
    (1e-3, 6906),
    (1e-4, 8425),
    (1e-5, 9304),
)
PAPER_D, PAPER_THETA_SQ = 13410, 462.9


def paper_like_spectrum(D: int) -> torch.Tensor:
    """D eigenvalues [descending, float64] with the paper GGN's shape: log lambda interpolated linearly in
    log(rank) through PAPER_SPECTRUM_COUNTS with ranks scaled by D / 13,410, zero below the last."""
    import numpy as np

    ranks = np.array([c for _, c in PAPER_SPECTRUM_COUNTS], dtype=float) * D / PAPER_D
    logs = np.log([t for t, _ in PAPER_SPECTRUM_COUNTS])
    i = np.arange(1, D + 1, dtype=float)
    lam = np.exp(np.interp(np.log(i), np.log(ranks), logs, left=np.log(11446.8), right=-np.inf))
    return torch.tensor(lam, dtype=torch.float64)


def psd_with_spectrum(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(lam) Q^T for a seeded random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    H = (Q * lam) @ Q.T
    return (H + H.T) / 2
