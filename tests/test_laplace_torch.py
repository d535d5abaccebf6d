"""The laplace_torch method (laplace-torch run as-is) against this project's full LA with hessian=jtj,
and its one speed-up (the eigenvalue log-determinant) against laplace-torch's own path."""

from __future__ import annotations

import copy

import pytest
import torch
from laplace import Laplace
from laplace.curvature.curvature import GGNInterface
from torch.utils.data import DataLoader, TensorDataset

from bench.config import preset_config
from bench.errors import BenchError
from bench.la.structures import compute_curvature
from bench.registry import METHODS
from methods.laplace_torch import EigLogdetFullLaplace, make_laplace, psd_eigenvalues, scale_fit
from tests import test_laplace_methods
from tests.laplace_helpers import rel_err, tiny_data, tiny_net
from tests.test_laplace_methods import _fit as fit

setup = test_laplace_methods.setup  # that module's fixture, requested here by name


def _fit(cfg, data, model, name):
    return fit(cfg, data, model, name)[0]


def test_same_h_and_glm_covariance_as_our_full_la_with_jtj(setup):
    """With the settings agreeing (hessian=jtj, one fixed prior precision), laplace-torch's H is our
    J^T J and its GLM covariances are ours, up to float32 rounding."""
    cfg, data, model = setup
    cfg = cfg.replace(hessian="jtj", prior_precision="2.0")
    lt = _fit(cfg, data, model, "laplace_torch")
    ours = _fit(cfg, data, model, "full_la")
    H = compute_curvature(
        copy.deepcopy(model).requires_grad_(True),
        data.train_id.x,
        data.train_id.y,
        structure="full",
        hessian="jtj",
    ).H
    assert rel_err(lt.la.H, H) < 1e-5
    assert lt.diagnostics["prior_precision"] == 2.0 and lt.diagnostics["targets"] == "f_MAP"
    a, b = lt.predict(data.test_id.x), ours.predict(data.test_id.x)
    assert torch.allclose(a.mean, b.mean, atol=1e-6)
    assert rel_err(a.cov, b.cov) < 1e-4


def test_eigenvalue_logdet_marglik_equals_laplace_torchs_own():
    """The only change to laplace-torch (the log-determinant of its full posterior precision from the
    eigenvalues of its H) leaves its marglik loop's answer and value unchanged."""
    model, (x, _) = tiny_net(in_dim=5, hidden=(6, 4)), tiny_data(40)
    with torch.no_grad():
        t = model(x)
    loader = DataLoader(TensorDataset(x, t), batch_size=16)
    plain = Laplace(
        model, "regression", subset_of_weights="all", hessian_structure="full", backend=GGNInterface
    )
    fast = EigLogdetFullLaplace(model, "regression", backend=GGNInterface)
    for la in (plain, fast):
        la.fit(loader)
    fast.evals = torch.linalg.eigvalsh(fast.H).clamp_min(0)
    for la in (plain, fast):
        la.optimize_prior_precision(method="marglik", pred_type="glm")
    assert float(fast.prior_precision) == pytest.approx(float(plain.prior_precision), rel=1e-9)
    assert float(plain.prior_precision) != pytest.approx(1.0)  # the loop moved it
    with torch.no_grad():
        assert float(fast.log_marginal_likelihood()) == pytest.approx(
            float(plain.log_marginal_likelihood()), rel=1e-9
        )


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_scale_fit_multiplies_the_curvature(structure):
    model, (x, _) = tiny_net().float(), tiny_data(24)
    x = x.float()
    with torch.no_grad():
        t = model(x)
    loader = DataLoader(TensorDataset(x, t), batch_size=8)
    a, b = make_laplace(model, structure, "auto"), make_laplace(model, structure, "auto")
    a.fit(loader)
    b.fit(loader)
    scale_fit(b, 3.0, 72)
    dense = (lambda la: la.H_facs.to_matrix()) if structure == "kron" else (lambda la: la.H)
    assert torch.allclose(dense(b), 3.0 * dense(a), rtol=1e-5, atol=1e-7) and b.n_data == 72


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_structures_and_the_mc_predictive(setup, structure):
    """Every structure fits with its marglik; the MC predictive reuses the same networks for every
    query set, keeps them as joint samples, and its mean is the mean of those networks."""
    cfg, data, model = setup
    cfg = cfg.replace(
        predictive="mc", posterior_samples=20, method_options=(("laplace_torch_structure", structure),)
    )
    lt = _fit(cfg, data, model, "laplace_torch")
    assert lt.diagnostics["structure"] == structure and lt.diagnostics["prior_precision"] > 0
    a, b = lt.predict(data.test_id.x), lt.predict(data.test_id.x)
    assert torch.equal(a.mean, b.mean) and a.samples.shape == (20, len(data.test_id), cfg.embed_dim)
    both = lt.predict(torch.cat([data.test_id.x[:10], data.test_id.x[:10]]))
    assert torch.allclose(both.samples[:, :10], both.samples[:, 10:])  # same draw for every item
    assert torch.allclose(a.mean, a.samples.mean(0)) and (a.var > 0).all()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("prior_precision", "grid", "prior_precision must be marglik or a positive number"),
        ("predictive", "lmc", "laplace_torch: predictive must be glm or mc"),
        (
            "method_options",
            (("laplace_torch_structure", "lowrank"),),
            "laplace_torch_structure must be one of",
        ),
    ],
)
def test_options_refused_in_one_line(field, value, message):
    cfg = preset_config("smoke").replace(**{field: value})
    with pytest.raises(BenchError, match=message) as e:
        METHODS.get("laplace_torch").validate(cfg)
    assert "\n" not in str(e.value)


def test_float32_spectrum_of_an_ill_conditioned_psd_matrix():
    """psd_eigenvalues (float32 LAPACK on H scaled to a unit largest diagonal) against float64 eigvalsh on
    a rank-deficient J^T J (lambda_max 2e10, half the spectrum 0): every eigenvalue within 1e-6 lambda_max,
    so log det(H + delta I) agrees where delta is far above that error and not where it is below (what
    `logdet_error` checks at the marglik optimum)."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 4, 300, dtype=torch.float64)
    J = torch.randn(150, 300, generator=g, dtype=torch.float64) * scales
    H = (J.T @ J).float()
    exact = torch.linalg.eigvalsh(H.double())
    got = psd_eigenvalues(H)
    assert got.dtype == H.dtype and bool((got >= 0).all())
    lam = float(exact.max())
    assert float((got.double() - exact.clamp_min(0)).abs().max()) < 1e-6 * lam

    def logdet_gap(delta):
        return abs(float(torch.log(got.double() + delta).sum() - torch.log(exact.clamp_min(0) + delta).sum()))

    assert logdet_gap(1e-3 * lam) < 1e-2
    assert logdet_gap(1e-8 * lam) > 1  # delta below float32's error: float64 would be needed


def test_the_float32_spectrum_is_checked_at_the_optimum_and_redone_in_float64(setup, monkeypatch):
    """laplace_torch's marglik with the float32 spectrum: its log-determinant at the optimum is checked
    against a float64 Cholesky (a small error recorded); a spectrum that fails the check is recomputed in
    float64 and the optimisation rerun, giving the float64 answer."""
    import methods.laplace_torch as lt_mod

    cfg, data, model = setup
    good = _fit(cfg, data, model, "laplace_torch")
    assert good.diagnostics["eig_dtype"] == "float32"
    assert good.diagnostics["eig_logdet_error"] < 1e-2
    la = good.la
    la.evals = torch.linalg.eigvalsh(la.H.double()).clamp_min(0).to(la.H.dtype)
    assert lt_mod.logdet_error(la) < 1e-2
    monkeypatch.setattr(lt_mod, "psd_eigenvalues", lambda H: psd_eigenvalues(H) * 3)  # a wrong spectrum
    redone = _fit(cfg, data, model, "laplace_torch")
    assert redone.diagnostics["eig_dtype"] == "float64" and redone.diagnostics["eig_logdet_error"] > 1
    assert redone.diagnostics["prior_precision"] == pytest.approx(
        good.diagnostics["prior_precision"], rel=1e-4
    )
