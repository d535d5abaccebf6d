"""The marginal likelihood that tunes the prior precision (`bench.la.prior`), against laplace-torch's
`log_marginal_likelihood` on the same posterior: laplace-torch's full GGN Laplace of a small regression
net, whose H and theta_MAP our formula reads through an exact and a stochastic (SLQ) spectrum. Their
difference is laplace-torch's log-likelihood term alone (the part that does not depend on the prior
precision), and our optimum is laplace-torch's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.la.prior import log_marglik, optimize_marglik
from bench.la.spectrum import exact_spectrum, slq_spectrum


@pytest.fixture(scope="module")
def fitted():
    laplace = pytest.importorskip("laplace")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=g, dtype=torch.float64)
    y = torch.randn(60, 2, generator=g, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    la = laplace.Laplace(net, "regression", subset_of_weights="all", hessian_structure="full")
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20))
    theta_sq = float(la.mean.detach().pow(2).sum())
    return la, la.H.detach().clone(), theta_sq


def _lt(la, delta: float) -> float:
    return float(la.log_marginal_likelihood(torch.tensor(delta, dtype=torch.float64)).detach())


def test_log_marglik_is_laplace_torch_s_up_to_the_log_likelihood(fitted):
    la, H, theta_sq = fitted
    spectrum = exact_spectrum(torch.linalg.eigvalsh(H))
    assert spectrum.D == H.shape[0] == 74  # 6*8 + 8 + 8*2 + 2
    log_lik = float(la.log_likelihood.detach())
    for delta in (1e-3, 0.1, 1.0, 7.5, 100.0, 1e4):
        ours = log_marglik(delta, spectrum, theta_sq)
        assert ours + log_lik == pytest.approx(_lt(la, delta), rel=1e-10, abs=1e-8), delta


def test_the_marglik_optimum_is_laplace_torch_s(fitted):
    la, H, theta_sq = fitted
    for spectrum, rel in (
        (exact_spectrum(torch.linalg.eigvalsh(H)), 1e-4),
        (slq_spectrum(H, steps=40, probes=64, generator=torch.Generator().manual_seed(1)), 0.1),
    ):
        delta, info = optimize_marglik(spectrum, theta_sq)
        grid = np.exp(np.linspace(np.log(delta) - 1, np.log(delta) + 1, 201))  # delta * e^[-1, 1]
        values = [_lt(la, d) for d in grid]
        assert grid[int(np.argmax(values))] == pytest.approx(delta, rel=max(rel, 0.011)), spectrum.method
        if spectrum.method == "exact":
            assert info["log_marglik"] + float(la.log_likelihood.detach()) == pytest.approx(
                _lt(la, delta), rel=1e-10
            )
            # MacKay's fixed point at the optimum: delta = gamma / ||theta||^2
            assert delta == pytest.approx(info["effective_params"] / theta_sq, rel=1e-4)
