"""Why laplace-torch's J^T J posterior and our contrastive-GGN full_la rank OOD sets differently
(docs/findings.md): curvature, prior and scale separated on one trained model.

For a full posterior Sigma = (t H + delta I)^-1 the trace score tr(J(x) Sigma J(x)^T) ranks queries by
t / delta only (Sigma = (1/t) (H + (delta/t) I)^-1 and AUROC is rank-based), so the "prior" and the
"scale" are one knob for OOD detection: the relative prior strength rho = delta / (t * mean eigenvalue of
H). This script computes, on the default preset's base model and the same curvature items as full_la
(its subset and mining stream), both curvatures exactly from their row factors (H = G^T G, G the rows
`bench.la.curvature` accumulates: the clamped pair-Laplacian factor times J for hessian=ggn, J itself
for jtj), and the trace score in closed form for a sweep of delta:

    Sigma = (1/delta) (I - U diag(lam / (lam + delta)) U^T),  H = U diag(lam) U^T (rank r <= rows),
    tr(J Sigma J^T) = (1/delta) (||J||_F^2 - sum_i ||J u_i||^2 lam_i / (lam_i + delta)),

with U from the eigendecomposition of the small Gram matrix G G^T. Printed per curvature and delta:
the far (MNIST) and near (held-out classes) AUROC with 95% bootstrap CIs, and marglik's delta for
each curvature at the scale each method uses (ours: likelihood_scale=batch; laplace-torch: the sum
over items, which is hessian=jtj here). Usage:

    PYTHONPATH=. python scripts/curvature_vs_prior.py --seed 0 --out /tmp/r21c/def [--queries 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from bench.config import preset_config
from bench.features import prepare_benchmark
from bench.la import jacobians as jac
from bench.la.curvature import _RowAccumulator, accumulate
from bench.la.predictive import SUBSET_STREAM
from bench.la.prior import optimize_marglik
from bench.la.spectrum import Spectrum
from bench.la.structures import resolve_subset
from bench.la.subsets import subset_names
from bench.loss import PairLoss
from bench.method import FitContext
from bench.metrics.bootstrap import grouped_bootstrap_ci
from bench.metrics.ood import auroc
from bench.model_cache import ModelCache
from bench.timing import StageTimer

PERM_STREAM = 17  # methods/laplace.py's mining stream (the same curvature items and batches as full_la)
RELATIVE = np.logspace(-4, 2, 13)  # delta / mean nonzero eigenvalue


class RowRecorder(_RowAccumulator):
    """The rows M [k, D] that full_la's accumulator would add as H += M^T M, kept instead of summed."""

    structure, subset = "full", "all"

    def __init__(self, model, dtype, subset) -> None:
        super().__init__(model, dtype, subset)
        self.rows: list[torch.Tensor] = []

    def add_rows(self, M: torch.Tensor) -> None:
        self.rows.append(M.detach().clone())

    def result(self):
        return self._curvature()  # H stays None: the rows are the result


def factor(model, data, cfg, hessian: str, ctx: FitContext, subset: str) -> torch.Tensor:
    """G [rows, D] with G^T G the full curvature full_la builds (hessian items scaled by N / n)."""
    train = data.train_id
    n_full = len(train)
    train = train.subset(cfg.hessian_items, seed=ctx.seed_for(SUBSET_STREAM))
    loss = dataclasses.replace(PairLoss.from_config(cfg), reduction="mean")  # likelihood_scale=batch
    acc = RowRecorder(model, torch.float32, subset)
    accumulate(
        acc,
        train,
        train.y,
        hessian=hessian,
        loss=loss,
        mining_batch=cfg.batch_size,
        chunk=cfg.jacobian_chunk,
        generator=ctx.generator(PERM_STREAM),
    )
    return torch.cat(acc.rows) * math.sqrt(n_full / len(train))


def eig_from_factor(G: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(lam [r] > 0, V [rows, r]): G G^T = V diag(lam) V^T, the nonzero spectrum of H = G^T G."""
    K = (G @ G.T).double()
    lam, V = torch.linalg.eigh(K)
    keep = lam > lam.max() * 1e-10
    return lam[keep].numpy(), V[:, keep]


def trace_scores(Jq: torch.Tensor, G: torch.Tensor, lam: np.ndarray, V: torch.Tensor, deltas) -> np.ndarray:
    """[len(deltas), Q] trace scores of queries Jq [Q, d, D] under (G^T G + delta I)^-1."""
    Q, d, D = Jq.shape
    Jf = Jq.reshape(Q * d, D)
    P = ((Jf @ G.T).double() @ V) ** 2  # [Q d, r]: (J u_i)^2 lam_i
    P = P.reshape(Q, d, -1).sum(1) / torch.as_tensor(lam)  # ||J u_i||^2 per query
    jn = Jf.double().pow(2).reshape(Q, d, D).sum((1, 2))
    lam_t = torch.as_tensor(lam)
    out = []
    for delta in deltas:
        shrink = (P * (lam_t / (lam_t + delta))).sum(1)
        out.append(((jn - shrink) / delta).numpy())
    return np.stack(out)


def auroc_ci(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    fn = lambda x, y, axis=-1: auroc(x, y, axis=axis)[None]  # noqa: E731
    return grouped_bootstrap_ci([(a,), (b,)], fn, 1000, 0.95, seed).triple()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/r21c/def")
    ap.add_argument("--queries", type=int, default=1000, help="queries per set (seeded subset)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = preset_config("default").replace(seed=args.seed, out=args.out, quiet=True)
    device = torch.device("cpu")
    data, _ = prepare_benchmark(cfg, device, Path(args.out) / "cache")
    cache = ModelCache(Path(args.out) / "cache" / "models", cfg, data.train_id, device)
    model, _, cached = cache.get(args.seed)
    model = model.eval()
    ctx = FitContext(
        cfg=cfg,
        data=data,
        device=device,
        timer=StageTimer(device),
        method="full_la",
        train_model=None,
        seed=args.seed,
        train_jointly=None,
    )
    subset = resolve_subset("full", cfg.la_subset, model)
    names = subset_names(model, subset)
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    theta_sq = float(jac.flat_params(model, names).double().pow(2).sum())
    sets = {"id": data.test_id, **data.test_ood}
    rng = np.random.default_rng(1000 + args.seed)
    Jq, counts = [], {}
    for name, s in sets.items():
        idx = np.sort(rng.choice(len(s), min(args.queries, len(s)), replace=False))
        x = s.inputs(torch.as_tensor(idx))
        Jq.append(jac.subset_jacobian(model, x, subset, names).detach())
        counts[name] = len(idx)
    Jq = torch.cat(Jq)
    bounds = np.cumsum([0, *counts.values()])
    part = {k: slice(bounds[i], bounds[i + 1]) for i, k in enumerate(counts)}
    jnorm = Jq.double().pow(2).sum((1, 2)).numpy()  # the prior-only (delta -> inf) score ||J(x)||_F^2
    prior_only = {k: auroc_ci(jnorm[part["id"]], jnorm[part[k]], args.seed) for k in counts if k != "id"}
    print(
        "prior only (||J||^2): "
        + "  ".join(f"{k} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in prior_only.items()),
        flush=True,
    )
    print(
        f"seed {args.seed}: base model {'cached' if cached else 'trained'}, D={Jq.shape[-1]}, "
        f"queries {counts}, theta^2={theta_sq:.2f} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    report = {
        "seed": args.seed,
        "queries": counts,
        "theta_sq": theta_sq,
        "curvatures": {},
        "prior_only": prior_only,
    }
    for hessian in ("ggn", "jtj"):
        G = factor(model, data, cfg, hessian, ctx, subset)
        lam, V = eig_from_factor(G)
        D = Jq.shape[-1]
        spec = Spectrum(np.concatenate([lam, np.zeros(D - len(lam))]), np.ones(D), D, "exact")
        marg, _ = optimize_marglik(spec, theta_sq)
        # laplace-torch's scale for jtj is the sum over N items, which is what jtj accumulates here
        mean_lam = float(lam.sum() / len(lam))
        deltas = sorted({*(RELATIVE * mean_lam), marg})
        S = trace_scores(Jq, G, lam, V, deltas)
        # share of each query's prior variance the data removes at marglik's delta: 1 - delta tr(J S J^T)
        # / ||J||^2 = sum_i ||J u_i||^2 lam_i / (lam_i + delta) / ||J||^2 (what the curvature "explains")
        explained = 1 - marg * S[deltas.index(marg)] / jnorm
        shares = {k: [float(np.quantile(explained[part[k]], q)) for q in (0.25, 0.5, 0.75)] for k in counts}
        print(
            f"{hessian}: prior variance removed at marglik, median [q25, q75]: "
            + "  ".join(f"{k} {v[1]:.3f} [{v[0]:.3f}, {v[2]:.3f}]" for k, v in shares.items()),
            flush=True,
        )
        rows = []
        for delta, s in zip(deltas, S):
            row = {
                "delta": float(delta),
                "rho": float(delta / mean_lam),
                "marglik": bool(delta == marg),
                "eff_params": float((lam / (lam + delta)).sum()),
            }
            for k in counts:
                if k != "id":
                    row[k] = auroc_ci(s[part["id"]], s[part[k]], args.seed)
            rows.append(row)
            ood = "  ".join(
                f"{k} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in row.items() if isinstance(v, tuple)
            )
            print(
                f"{hessian} rows={G.shape[0]} rank={len(lam)} delta={delta:9.3g} rho={row['rho']:8.2g} "
                f"{'(marglik)' if row['marglik'] else '         '} eff={row['eff_params']:7.1f}  {ood}",
                flush=True,
            )
        report["curvatures"][hessian] = {
            "rows": int(G.shape[0]),
            "rank": int(len(lam)),
            "trace": float(lam.sum()),
            "mean_eig": mean_lam,
            "marglik_delta": float(marg),
            "sweep": rows,
            "explained": shares,
            "top_eig_share": float(np.sort(lam)[::-1][:10].sum() / lam.sum()),
        }
        del G, V
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"curvature_vs_prior-seed{args.seed}.json").write_text(json.dumps(report, indent=1))
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
