"""`python -m bench hessian-bench`: time this project's Hessians against laplace-torch and the floor
(one process, one net, one data set; the rows are described in `run_bench`)."""

from __future__ import annotations

import argparse
import math
import time

import torch

from backbones.mlp import EmbeddingNet
from bench.environment import resolve_device
from bench.errors import BenchError
from bench.la.structures import compute_curvature
from bench.loss import PairLoss
from bench.model import num_params
from bench.timing import sync


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the hessian-bench subcommand."""
    parser.add_argument("--n", type=int, default=1024, help="training items in the Hessian (default 1024)")
    parser.add_argument("--hidden", default="16,16,16,16", help="hidden widths (paper net: 16,16,16,16)")
    parser.add_argument("--embed-dim", type=int, default=2)
    parser.add_argument(
        "--data",
        choices=["fashion_mnist", "random"],
        default="fashion_mnist",
        help="real Fashion-MNIST training images or random inputs of the same shape",
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder holding the Fashion-MNIST files (default: the usual search)"
    )
    parser.add_argument("--chunk", type=int, default=256, help="items per Jacobian chunk")
    parser.add_argument("--mining-batch", type=int, default=16, help="pairs are mined per batch of this size")
    parser.add_argument("--lt-n", type=int, default=512, help="items for laplace-torch (time scaled to --n)")
    parser.add_argument("--no-laplace-torch", action="store_true", help="skip the laplace-torch rows")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=0)


def _time(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def _load(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.data == "random":
        g = torch.Generator().manual_seed(args.seed)
        return torch.rand(args.n, 784, generator=g), torch.randint(0, 7, (args.n,), generator=g)
    from bench.config import preset_config
    from bench.data import load_benchmark

    data = load_benchmark(preset_config("paper").replace(far_ood=(), data_dir=args.data_dir)).train_id
    if len(data) < args.n:
        raise BenchError(f"--n {args.n} exceeds the {len(data)} training items")
    sub = data.subset(args.n, seed=args.seed)
    return sub.x, sub.y


def run_bench(args: argparse.Namespace) -> list[dict]:
    """The measurements as rows {what, rows, seconds, ratio, note}:
      floor            bare torch.mm(J^T, J) for a random J of shape [N*d, D] (the GEMM the full H needs)
      ours full ggn    Jacobians + mining + block-Laplacian factor + symmetric rank-k update, all N items
      ours full jtj    the seed's sum_n J_n^T J_n, same path without the Laplacian
      ours diag/kfac   the cheap structures (GGN)
      laplace-torch    Laplace(model, "regression", "all", "full").fit: the jtj matrix, with its default
                       backend (CurvlinopsGGN) and AsdlGGN, on the first --lt-n items, scaled linearly to N
    Ratios are seconds / floor seconds; the laplace-torch notes give the relative difference between
    our jtj H and laplace-torch's on the same items."""
    device = resolve_device(args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    hidden = tuple(int(h) for h in str(args.hidden).split(",") if h.strip())
    x, y = _load(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = EmbeddingNet(math.prod(x.shape[1:]), hidden, args.embed_dim).to(device=device, dtype=dtype)
    D, d, N = num_params(model), args.embed_dim, len(y)
    x = x.to(device=device, dtype=dtype)
    rows: list[dict] = []

    # floor: one GEMM of the [N*d, D] Jacobian's shape
    J = torch.randn(N * d, D, device=device, dtype=dtype)
    torch.mm(J[:256].T, J[:256])  # warm the BLAS
    t_floor, _ = _time(lambda J=J: torch.mm(J.T, J), device)  # J bound now: it is deleted below
    del J
    rows.append(
        {"what": "floor: torch.mm(J^T, J)", "rows": N * d, "seconds": t_floor, "note": f"J [{N * d}, {D}]"}
    )

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(args.seed)

    kw = dict(mining_batch=args.mining_batch, chunk=args.chunk, dtype=dtype, loss=PairLoss())
    for what, structure, hessian in [
        ("ours full ggn", "full", "ggn"),
        ("ours full jtj", "full", "jtj"),
        ("ours diag ggn", "diag", "ggn"),
        ("ours kfac ggn", "kron", "ggn"),
    ]:
        t, curv = _time(
            lambda structure=structure, hessian=hessian: compute_curvature(
                model, x, y, structure=structure, hessian=hessian, generator=gen(), **kw
            ),
            device,
        )
        note, st = "", curv.stats
        if structure == "kron":
            note = (
                f"{st['pseudo_samples']} pair pseudo-samples; dropped curvature "
                f"{100 * st['dropped_fraction_output']:.1f}% (output space)"
            )
        elif hessian == "ggn":
            note = (
                f"dropped curvature {100 * st['dropped_fraction_param']:.1f}% (param space), "
                f"{100 * st['dropped_fraction_output']:.1f}% (output space)"
            )
        rows.append({"what": what, "rows": st["rows"], "seconds": t, "note": note})
        del curv

    if not args.no_laplace_torch:
        rows += _laplace_torch_rows(model, x, y, args, kw, N, device)
    for r in rows:
        r["ratio"] = r["seconds"] / t_floor
    return rows


def _laplace_torch_rows(model, x, y, args, kw, N, device) -> list[dict]:
    from laplace import Laplace
    from laplace.curvature import AsdlGGN, CurvlinopsGGN

    n = min(args.lt_n, N)
    xs = x[:n]
    ys = torch.zeros(n, args.embed_dim, device=device, dtype=x.dtype)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=args.chunk)
    ours = compute_curvature(model, xs, y[:n], structure="full", hessian="jtj", **kw).H
    rows = []
    for name, backend in [("CurvlinopsGGN (default)", CurvlinopsGGN), ("AsdlGGN", AsdlGGN)]:
        la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="full", backend=backend)
        t, _ = _time(lambda la=la: la.fit(loader), device)  # la bound now: it is deleted below
        err = float((la.H.to(ours.dtype) - ours).norm() / ours.norm())
        rows.append(
            {
                "what": f"laplace-torch {name}",
                "rows": N * args.embed_dim,
                "seconds": t * N / n,
                "note": f"jtj; measured on {n} items x{N / n:g}; rel diff to ours {err:.1e}",
            }
        )
        del la
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table."""
    head = f"{'what':<36} {'rows':>8} {'seconds':>9} {'x floor':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['what']:<36} {r['rows']:>8} {r['seconds']:>9.2f} {r['ratio']:>8.2f}  {r['note']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the bench and print the table; returns the exit code."""
    hidden = str(args.hidden)
    resolve_device(args.device)  # a missing CUDA is one line, before any work
    print(
        f"hessian-bench: net 784-{hidden.replace(',', '-')}-{args.embed_dim}, N={args.n} ({args.data}), "
        f"{args.dtype} on {args.device}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    rows = run_bench(args)
    D = num_params(EmbeddingNet(784, tuple(int(h) for h in hidden.split(",")), args.embed_dim))
    print(f"D = {D}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
