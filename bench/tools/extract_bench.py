"""`python -m bench.tools.extract_bench [--preset cifar] [--items 1024] [--rounds 3]`: the frozen-trunk
feature extraction's throughput (`bench.features.extract_features`, images read and transformed as a run
reads them) against the floor, a bare `torch.inference_mode()` forward pass of the same trunk on the
same, already transformed, images in the same batches, in one process, rounds interleaved (median).

ratio = extraction seconds / bare forward seconds; the target is <= 1.2. What the difference holds: image
decoding and transforms (DataLoader workers), no_grad vs inference_mode, and the copies into one tensor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def measure(preset: str, items: int, rounds: int, threads: int | None = None) -> dict:
    """Seconds per round of extraction and of the bare forward on `items` test images of `preset`."""
    from bench.config import preset_config
    from bench.data import load_benchmark
    from bench.features import extract_features, frozen_trunk

    if threads:
        torch.set_num_threads(threads)
    cfg = preset_config(preset).replace(quiet=True)
    data = load_benchmark(cfg)
    split = data.test_id.subset(items)
    trunk = frozen_trunk(cfg, data.test_id.in_shape)
    if trunk is None:
        raise SystemExit(f"error: preset {preset} has no frozen trunk")
    cpu = torch.device("cpu")
    chunk = cfg.image_chunk
    n = len(split)
    index = [torch.arange(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    inputs = list(split.batches(index))  # the same transformed images, made once

    def bare() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([trunk(xb) for xb in inputs])

    def extract() -> torch.Tensor:
        return extract_features(trunk, split, cpu, chunk, quiet=True)

    same = torch.equal(bare(), extract())  # warm-up, and the two must agree
    t_bare, t_ext = [], []
    for _ in range(rounds):
        for fn, out in ((bare, t_bare), (extract, t_ext)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    b, e = statistics.median(t_bare), statistics.median(t_ext)
    return {
        "items": n,
        "threads": torch.get_num_threads(),
        "bare_s": b,
        "extract_s": e,
        "ratio": e / b,
        "items_per_s": n / e,
        "identical": same,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tools.extract_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="cifar")
    parser.add_argument("--items", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    r = measure(args.preset, args.items, args.rounds, args.threads)
    print(
        f"{r['items']} images, {r['threads']} threads: extraction {r['extract_s']:.2f} s "
        f"({r['items_per_s']:.0f} images/s), bare inference_mode forward {r['bare_s']:.2f} s, "
        f"ratio {r['ratio']:.2f} (target <= 1.2); features identical: {r['identical']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
