"""`python -m bench.tools.matmul_rate`: a device's matrix-product floor, the rate of a bare torch.mm of two
n x n float32 matrices (2 n^3 flops a product; the median of `--repeats` timed products after warm-up),
with TF32 off (`torch.backends.cuda.matmul.allow_tf32 = False`, true fp32) and, on CUDA, on."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.environment import resolve_device
from bench.errors import BenchError
from bench.timing import sync


def matmul_tflops(n: int, device: torch.device, repeats: int = 10, tf32: bool = False) -> float:
    """TFLOP/s of torch.mm on n x n float32 matrices on `device` (TF32 as given, restored after)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for _ in range(3):
            torch.mm(a, b)
        times = []
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            times.append(time.perf_counter() - t)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n**3 / statistics.median(times) / 1e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--n", type=int, default=8192, help="matrix size (default 8192)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [("fp32 (tf32 off)", matmul_tflops(args.n, device, args.repeats, tf32=False))]
    if device.type == "cuda":
        rows.append(("tf32 on", matmul_tflops(args.n, device, args.repeats, tf32=True)))
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"matmul floor: torch.mm of {args.n} x {args.n} float32 on {device} ({name}), "
        f"median of {args.repeats}"
    )
    for what, tflops in rows:
        print(f"  {what:<16} {tflops:9.2f} TFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
