"""laplace-torch's own Laplace approximation, run as-is inside the harness, so that the reference
implementation has its row in every table: `Laplace(model, "regression", subset_of_weights=all |
last_layer, hessian_structure=full | diag | kron)` (recipe=paper: its documented defaults, last-layer
KFAC; recipe=default: full over all weights), its marglik `optimize_prior_precision`, its GLM predictive
and, for predictive=mc, its sampled networks."""

from __future__ import annotations

import copy
import warnings

import torch

with warnings.catch_warnings():  # its import warns about torch.jit.script: keep CLI errors one line
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    from laplace import Laplace
    from laplace.baselaplace import FullLaplace
    from laplace.curvature import CurvlinopsGGN
    from laplace.curvature.curvature import GGNInterface

from bench.errors import BenchError, require
from bench.la.memory import check_full_memory
from bench.la.predictive import SAMPLE_STREAM, SUBSET_STREAM, positive_number
from bench.la.spectrum import EIG_LOGDET_TOL, psd_eigenvalues
from bench.la.structures import resolve_subset
from bench.la.subsets import NEEDED_BY, subset_modules
from bench.method import EmbeddingPrediction, FitContext, Method, Option
from bench.model import last_linear
from bench.recipes import Knob, Recipe
from bench.registry import register_method

STRUCTURES = ("full", "diag", "kron")
# laplace-torch's curvature backends; auto: its own torch.func GGN (GGNInterface: Jacobians and one
# einsum J^T J) for full, where its default CurvlinopsGGN multiplies the GGN by a D x D identity
# (measured: 136 s per 512 items on the paper net, against 35 s per 1024), and the default
# CurvlinopsGGN for diag and kron
BACKENDS = {"curvlinops": CurvlinopsGGN, "torch": GGNInterface}
AUTO_BACKEND = {"full": "torch", "diag": "curvlinops", "kron": "curvlinops"}
GLM_CHUNK = 4096  # items per call of its GLM predictive


class EigLogdetFullLaplace(FullLaplace):
    """laplace-torch's FullLaplace, with one change: while `evals` (the eigenvalues of its H) is set
    and the prior is a scalar, the log-determinant of its posterior precision H_factor H + delta I is
    sum_i log(H_factor lambda_i + delta), the same number as its `logdet` of the D x D matrix, which
    its marglik loop (100 Adam steps) otherwise recomputes and differentiates at every step: 185 s
    per step for D = 13,410 on 2 CPU cores (logdet 27 s, its backward 157 s), 5 hours in all."""

    evals: torch.Tensor | None = None

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        if self.evals is None or self.prior_precision.numel() != 1:
            return super().log_det_posterior_precision
        return torch.log(self._H_factor * self.evals + self.prior_precision).sum()


def logdet_error(la) -> float:
    """|sum log(H_factor lambda_i + delta) - log det(H_factor H + delta I)| at the fitted scalar prior
    delta: the spectrum's log-determinant (what the marglik used) against a float64 Cholesky of the
    matrix itself; inf where that matrix is not positive definite in float64."""
    delta = float(la.prior_precision.reshape(-1)[0])
    H_factor = float(la._H_factor)
    A = la.H.double() * H_factor
    A.diagonal().add_(delta)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return float("inf")
    exact = 2 * L.diagonal().log().sum()
    del A, L
    return float((torch.log(la.evals.double() * H_factor + delta).sum() - exact).abs())


class FormedCovarianceVariance:
    """laplace-torch's full GLM variance J Sigma J^T with Sigma formed once: a class rather than a lambda,
    so a fitted method holds no local function and can be exported (`bench.export`)."""

    def __init__(self, cov: torch.Tensor) -> None:
        self.cov = cov

    def __call__(self, Js: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ncp,pq,nkq->nck", Js, self.cov, Js)


def make_laplace(
    model: torch.nn.Module,
    structure: str,
    backend: str,
    fast_logdet: bool = True,
    weights: str = "all",
    temperature: float = 1.0,
):
    """laplace-torch's regression Laplace over `weights` ("all" | "last_layer", its subset_of_weights)
    with sigma_noise 1, prior mean 0 (its defaults), its `temperature` (default 1) and the given curvature
    backend; full over all weights: `EigLogdetFullLaplace` when fast_logdet (else its FullLaplace)."""
    backend_cls = BACKENDS[AUTO_BACKEND[structure] if backend == "auto" else backend]
    if structure == "full" and fast_logdet and weights == "all":
        return EigLogdetFullLaplace(model, "regression", backend=backend_cls, temperature=temperature)
    return Laplace(
        model,
        "regression",
        subset_of_weights=weights,
        hessian_structure=structure,
        backend=backend_cls,
        temperature=temperature,
    )


def laplace_torch_weights(la_subset: str, model: torch.nn.Module) -> str:
    """laplace-torch's subset_of_weights for the run's `la_subset`, resolved like full_la's (auto: the
    head on a model with one): "all", or "last_layer" (its LLLaplace on the last Linear) when the subset
    is exactly that layer; any other subset is a BenchError (laplace-torch has no equivalent here)."""
    subset = resolve_subset("full", la_subset, model)
    every = {id(p) for p in model.parameters() if p.requires_grad}
    mods = subset_modules(model, subset)
    owned = every if mods is None else {id(p) for m in mods for p in m.parameters()}
    if owned == every:
        return "all"
    if owned == {id(p) for p in last_linear(model, NEEDED_BY).parameters()}:
        return "last_layer"
    raise BenchError(
        f"laplace_torch covers all weights or the last Linear layer; la_subset={la_subset} selects "
        f"other layers ({subset}); use la_subset=all, or full_la / diag_la for this subset"
    )


class FeatureHook:
    """laplace-torch's last-layer feature hook (`FeatureExtractor._get_hook`: the last layer's input kept
    in the extractor's `_features`), as an importable callable instead of its local closure, so that a
    fitted last-layer posterior can be exported (`bench.state_codec` names functions by module path)."""

    def __init__(self, extractor: torch.nn.Module, name: str) -> None:
        self.extractor, self.name = extractor, name

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        features = inputs[0]
        self.extractor._features[self.name] = (
            features if self.extractor.enable_backprop else features.detach()
        )


def importable_hooks(la) -> None:
    """Replace laplace-torch's local feature hooks in a fitted last-layer Laplace by `FeatureHook`s."""
    extractor = getattr(la, "model", None)
    name = getattr(extractor, "_last_layer_name", None)
    if name is None:
        return
    for module in extractor.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__qualname__", "").startswith("FeatureExtractor._get_hook"):
                module._forward_hooks[key] = FeatureHook(extractor, name)


class _TargetLoader:
    """Batches (x, f_MAP(x)) of a `bench.data.Split` in order, as laplace-torch's `fit` reads a
    DataLoader (it takes N from `len(loader.dataset)`); images stay on disk until their batch."""

    def __init__(self, model: torch.nn.Module, split, batch: int, device: torch.device) -> None:
        self.model, self.split, self.batch, self.device = model, split, batch, device
        self.dataset = range(len(split))

    def __iter__(self):
        n = len(self.split)
        for xb in self.split.batches(
            [torch.arange(i, min(i + self.batch, n)) for i in range(0, n, self.batch)]
        ):
            xb = xb.to(self.device)
            with torch.no_grad():  # (never yield inside: the consumer would run without grad)
                targets = self.model(xb)  # f_MAP: zero residuals (see LaplaceTorch)
            yield xb, targets

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch)


def scale_fit(la, factor: float, n_data: int) -> None:
    """Scale a fitted laplace-torch posterior's data term by `factor` (its H and loss; n_data set):
    a curvature from a subset of n of N items estimates the full-data one with factor N / n."""
    la.loss = la.loss * factor
    la.n_data = n_data
    if getattr(la, "H_facs", None) is not None:  # KronLaplace: rescale the factors, decompose again
        la.H_facs = la.H_facs * factor
        la.H = la.H_facs.decompose(damping=la.damping)
    else:
        la.H = la.H * factor


@register_method("laplace_torch")
class LaplaceTorch(Method):
    """laplace-torch's `Laplace(model, "regression", subset_of_weights="all", hessian_structure=...)`
    on the shared base model: the reference implementation as its users run it.

    Regression likelihood N(t | f(x), I) summed over the curvature items, so H = sum_n J_n^T J_n
    (this project's hessian=jtj, tested equal). Targets t = f_MAP(x), the base model's own
    embeddings: J^T J does not depend on targets, but laplace-torch's marglik does through the
    residuals (its log-likelihood term); with t = f_MAP they are 0, so theta_MAP is a stationary point
    of the likelihood the approximation is built on (class labels or zeros as targets would make the
    residuals, not the embedding task, set that term). The marglik optimum of a scalar prior does not
    depend on the targets (sigma_noise is not tuned). Items: the same `hessian_items` subset as the
    Laplace family (scaled by N / n, `scale_fit`). Prior precision: laplace-torch's
    `optimize_prior_precision(method="marglik")` (100 Adam steps on log delta from 1, lr 0.1, scalar),
    or a fixed number. Predictive: glm = its `la(x, pred_type="glm")` (mean f_MAP, covariance
    J Sigma J^T); mc = its `predictive_samples(x, pred_type="nn")` over `posterior_samples` networks,
    the same networks for every query set (one generator seed), as joint samples.
    """

    reuses_base_model = True
    options = {
        "laplace_torch_structure": Option(
            str, "full", "laplace-torch's hessian_structure", choices=STRUCTURES
        ),
        "laplace_torch_temperature": Option(
            float,
            1.0,
            "laplace-torch's temperature T (its H enters as H / T; its default 1)",
            minimum=1e-12,
        ),
        "laplace_torch_backend": Option(
            str,
            "auto",
            "laplace-torch's curvature backend; auto: its torch.func GGN for full (its default "
            "CurvlinopsGGN multiplies by a D x D identity), CurvlinopsGGN for diag and kron",
            choices=("auto", *BACKENDS),
        ),
    }

    recipes = {
        "paper": Recipe(
            settings={
                "la_subset": "last_k:1",
                "laplace_torch_structure": "kron",
                "laplace_torch_temperature": 1.0,
                "prior_precision": "marglik",
                "predictive": "glm",
            },
            source="laplace-torch 0.3 defaults (Daxberger et al. 2021); Laplace(model, likelihood) "
            "defaults to subset_of_weights='last_layer', hessian_structure='kron', temperature 1, then "
            "optimize_prior_precision(method='marglik') and its GLM predictive: last-layer KFAC with a "
            "marglik prior, the paper's recommended default",
            note="last_k:1 is the embedding net's last Linear layer, laplace-torch's last_layer; "
            "recipe=default keeps the former full posterior over all weights",
        ),
    }
    tunable = {
        "prior_precision": Knob(1e-4, 1e6, log=True),
        "laplace_torch_temperature": Knob(1e-5, 1e2, log=True),
    }

    @classmethod
    def relative_cost(cls, cfg) -> float:
        """Its full posterior (D x D: curvature, eigendecomposition, covariance) costs about twenty post-hoc
        fits at the default preset (467 s of ~250 s for the other eleven methods); other structures one."""
        return 20.0 if cls.option(cfg, "laplace_torch_structure") == "full" else 1.0

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        require(
            cfg.predictive in ("glm", "mc"),
            f"laplace_torch: predictive must be glm or mc, got {cfg.predictive!r}",
        )
        require(cfg.posterior_samples >= 2, f"posterior_samples must be >= 2, got {cfg.posterior_samples}")
        require(
            cfg.prior_precision == "marglik" or positive_number(cfg.prior_precision),
            f"laplace_torch: prior_precision must be marglik or a positive number, got "
            f"{cfg.prior_precision!r} "
            "(laplace-torch's gridsearch needs validation targets a metric-learning net does not have)",
        )
        require(
            cfg.hessian_items is None or cfg.hessian_items >= 2,
            f"hessian_items must be >= 2, got {cfg.hessian_items}",
        )

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.la = None
        self._sample_seed = 0

    def fit(self, ctx: FitContext) -> None:
        cfg = self.cfg
        structure = self.option(cfg, "laplace_torch_structure")
        backend = self.option(cfg, "laplace_torch_backend")
        model = copy.deepcopy(ctx.base_model()).eval()  # laplace-torch writes sampled weights into it
        weights = laplace_torch_weights(cfg.la_subset, model)
        params = (
            list(last_linear(model, NEEDED_BY).parameters())
            if weights == "last_layer"
            else list(model.parameters())
        )
        for p in params:
            p.requires_grad_(True)
        D = sum(p.numel() for p in params)
        if structure == "full":  # H, its precision, scale and covariance: up to 4 D x D at once, and
            # check_full_memory's two matrices of side 2D are 8 D x D: room for the temporaries
            check_full_memory(2 * D, next(model.parameters()).dtype, ctx.device, "laplace_torch")
        train = ctx.data.train_id
        n_full = len(train)
        train = train.subset(cfg.hessian_items, seed=ctx.seed_for(SUBSET_STREAM))
        loader = _TargetLoader(model, train, cfg.jacobian_chunk, ctx.device)
        temperature = self.option(cfg, "laplace_torch_temperature")
        la = make_laplace(model, structure, backend, weights=weights, temperature=temperature)
        with ctx.stage("hessian"):
            la.fit(loader)
            importable_hooks(la)  # (last layer: its feature hook, exportable)
            if len(train) < n_full:
                scale_fit(la, n_full / len(train), n_full)
        eig_info: dict = {}
        with ctx.stage("prior"):
            if isinstance(la, EigLogdetFullLaplace):
                la.evals, eig_info = psd_eigenvalues(la.H), {"eig_dtype": "float32"}
            self._prior(la, cfg)
            if isinstance(la, EigLogdetFullLaplace):  # the float32 spectrum checked at the optimum
                err = logdet_error(la)
                eig_info["eig_logdet_error"] = err
                if not err <= EIG_LOGDET_TOL:
                    la.evals = torch.linalg.eigvalsh(la.H.double()).clamp_min(0).to(la.H.dtype)
                    eig_info["eig_dtype"] = "float64"
                    self._prior(la, cfg)
            with torch.no_grad():
                log_marglik = float(la.log_marginal_likelihood())
            if structure == "full":
                # laplace-torch's full GLM variance forms Sigma = scale @ scale^T on every call
                # (`FullLaplace.posterior_covariance`, 2 D^3 flops: 120 s a call at D = 13,410 on one
                # thread); its own formula, with Sigma formed once (an instance attribute shadows the method)
                la.functional_variance = FormedCovarianceVariance(la.posterior_covariance)
        self.la = la
        self._sample_seed = ctx.seed_for(SAMPLE_STREAM)
        self.diagnostics = {
            "structure": structure,
            "subset_of_weights": weights,
            "backend": type(la.backend).__name__,
            "likelihood": "regression",
            "targets": "f_MAP",
            "sigma_noise": 1.0,
            "temperature": temperature,
            "D": D,
            "hessian_items": len(train),
            "prior_precision": float(la.prior_precision.reshape(-1)[0]),
            "prior_method": "marglik" if cfg.prior_precision == "marglik" else "fixed",
            "log_marglik": log_marglik,
            "predictive": cfg.predictive,
            **eig_info,
        }

    @staticmethod
    def _prior(la, cfg) -> None:
        """laplace-torch's marglik optimisation of the prior precision (from 1), or the fixed number."""
        if cfg.prior_precision == "marglik":
            la.optimize_prior_precision(
                method="marglik", pred_type="glm" if cfg.predictive == "glm" else "nn"
            )
        else:
            la.prior_precision = float(cfg.prior_precision)

    def predict(self, x: torch.Tensor) -> EmbeddingPrediction:
        la = self.la
        if la is None:
            raise BenchError("laplace_torch: predict called before fit")
        xd = x.to(la._device)
        if self.cfg.predictive == "mc":  # the same S networks for every call: one generator seed
            gen = torch.Generator(device=la._device).manual_seed(self._sample_seed)
            E = la.predictive_samples(xd, pred_type="nn", n_samples=self.cfg.posterior_samples, generator=gen)
            return EmbeddingPrediction.from_samples(E.detach()).to(x.device)
        parts = []  # large chunks: laplace-torch's full GLM forms its D x D covariance on every call
        for s in range(0, len(xd), GLM_CHUNK):
            f_mu, f_var = la(xd[s : s + GLM_CHUNK], pred_type="glm")
            parts.append(EmbeddingPrediction(mean=f_mu.detach(), cov=f_var.detach()))
        return EmbeddingPrediction.cat(parts).to(x.device)
