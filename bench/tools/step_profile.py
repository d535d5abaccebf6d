"""`python -m bench step-profile`: where one training step of the shared loop spends its time, for the
fast path `bench.train.train_net` runs (vectorised miner + loss, fused Adam) and for the
pytorch-metric-learning reference (its TripletMarginMiner + ContrastiveLoss, torch's default Adam), at a given
net and batch; with `--compile`, the fast step under torch.compile next to eager, in the same process.

Each step is cut into phases timed with perf_counter (CUDA-synchronised at every cut):
  data         x[idx], y[idx] of in-memory tensors (the batch as `Split.batches` gives it)
  forward      model(x)
  mining       fast: cdist + mined multiplicities + reducer weights; PML: miner(emb, y) (its own distances)
  loss         fast: the weighted pair sums; PML: loss_fn(emb, y, triplets) (its own distances)
  backward     zero_grad + loss.backward()
  optimiser    opt.step()
  bookkeeping  total += loss.detach() (the epoch's running loss)
`loop` is the untimed loop itself (the fast one is `train_net` on a Split of the same data, per step), so
`loop` - sum(phases) is what the cuts cost. A torch.profiler pass gives the share of the step spent
inside ATen operators (self time) and the operators per step: the rest is Python and autograd glue.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from bench.timing import sync

# (bench.train and what it pulls in, pytorch-metric-learning among them, are imported where used, so
# that building the CLI's parser stays fast)

PHASES = ("data", "forward", "mining", "loss", "backward", "optimiser", "bookkeeping")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the step-profile subcommand."""
    parser.add_argument(
        "--batch", type=int, default=16, help="batch size (paper preset: 16, default preset: 64)"
    )
    parser.add_argument("--hidden", default="16,16,16,16", help="hidden widths (paper net: 16,16,16,16)")
    parser.add_argument("--embed-dim", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (train_threads; default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--compile",
        choices=["off", "loss", "step"],
        default="off",
        help="also time torch.compile of forward + loss (loss) or of forward + loss and "
        "the optimiser step (step) against eager",
    )
    parser.add_argument("--no-profiler", action="store_true", help="skip the torch.profiler pass")
    parser.add_argument(
        "--no-phases", action="store_true", help="skip the phase table (e.g. to time --compile alone)"
    )
    parser.add_argument("--seed", type=int, default=0)


@dataclass
class Setup:
    """A net, its config and `steps` batches of random 1x28x28 inputs over 7 classes on `device`."""

    cfg: object
    device: torch.device
    x: torch.Tensor  # [steps * batch, 1, 28, 28]
    y: torch.Tensor
    batches: list[torch.Tensor]  # index batches on the device


def make_setup(args: argparse.Namespace) -> Setup:
    """The paper preset's config at the given batch and widths, random data, and the device (resolved:
    a missing CUDA is one BenchError line)."""
    from bench.config import preset_config
    from bench.environment import resolve_device

    device = resolve_device(args.device)
    hidden = tuple(int(h) for h in str(args.hidden).split(",") if h.strip())
    cfg = preset_config("paper").replace(
        batch_size=args.batch, hidden=hidden, embed_dim=args.embed_dim, quiet=True, train_threads=args.threads
    )
    g = torch.Generator().manual_seed(args.seed)
    n = args.steps * args.batch
    x = torch.randn(n, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 7, (n,), generator=g).to(device)
    batches = list(torch.randperm(n, generator=g).to(device).split(args.batch))
    return Setup(cfg, device, x, y, batches)


class Laps:
    """Accumulated seconds per phase; `cut(name)` charges the time since the previous cut."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, dict.fromkeys(PHASES, 0.0)

    def start(self) -> None:
        sync(self.device)
        self.t = time.perf_counter()

    def cut(self, name: str) -> None:
        sync(self.device)
        t = time.perf_counter()
        self.seconds[name] += t - self.t
        self.t = t


def fast_phases(s: Setup, model, opt, laps: Laps) -> None:
    """One epoch over s.batches of the fast path, cut into phases (the code of `contrastive_loss`)."""
    from bench.loss import mined_pair_weights, weighted_pair_loss

    cfg, total = s.cfg, torch.zeros((), device=s.device)
    for idx in s.batches:
        laps.start()
        xb, yb = s.x[idx], s.y[idx]
        laps.cut("data")
        F = model(xb)[None]
        laps.cut("forward")
        dist, (W_pos, W_neg), _ = mined_pair_weights(F, yb[None], cfg)
        laps.cut("mining")
        loss = weighted_pair_loss(dist, W_pos, W_neg, cfg)[0]
        laps.cut("loss")
        _timed_update(loss, opt, total, laps)


def _timed_update(loss: torch.Tensor, opt, total: torch.Tensor, laps: Laps) -> None:
    """The phases after the loss, shared by both paths: backward, optimiser, bookkeeping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    laps.cut("backward")
    opt.step()
    laps.cut("optimiser")
    total += loss.detach()
    laps.cut("bookkeeping")


def pml_phases(s: Setup, model, opt, laps: Laps) -> None:
    """One epoch of the PML reference path, cut into phases."""
    from bench.loss import make_loss_and_miner

    loss_fn, miner = make_loss_and_miner(s.cfg)
    total = torch.zeros((), device=s.device)
    for idx in s.batches:
        laps.start()
        xb, yb = s.x[idx], s.y[idx]
        laps.cut("data")
        emb = model(xb)
        laps.cut("forward")
        trip = miner(emb, yb)
        laps.cut("mining")
        loss = loss_fn(emb, yb, trip)
        laps.cut("loss")
        _timed_update(loss, opt, total, laps)


def pml_loop(s: Setup, model, opt) -> None:
    """One untimed epoch of the PML reference path."""
    from bench.loss import make_loss_and_miner

    loss_fn, miner = make_loss_and_miner(s.cfg)
    total = torch.zeros((), device=s.device)
    for idx in s.batches:
        xb, yb = s.x[idx], s.y[idx]
        emb = model(xb)
        loss = loss_fn(emb, yb, miner(emb, yb))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
    sync(s.device)


def fast_loop(s: Setup, model, opt=None) -> None:
    """One epoch of `train_net` itself on the same items (its own seeded order): the loop as runs use it."""
    from bench.data import Split
    from bench.loss import batched_contrastive_loss
    from bench.train import train_net

    cfg = s.cfg
    train_net(
        model,
        lambda m, xb, yb: batched_contrastive_loss(m(xb)[None], yb[None], cfg)[0],
        replace(cfg, epochs=1),
        Split(s.x, s.y),
        s.device,
        seed=0,
    )
    sync(s.device)


def _net(s: Setup, seed: int):
    from bench.model import build_model

    return build_model(s.cfg, tuple(s.x.shape[1:]), seed).to(s.device)


def _median_round(fn: Callable[[], None], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _optimizer(path: str, model, cfg) -> torch.optim.Optimizer:
    """The fast path's optimiser (`make_optimizer`), or the reference's: torch's default Adam."""
    from bench.train import make_optimizer

    return (
        make_optimizer(model.parameters(), cfg)
        if path == "fast"
        else torch.optim.Adam(model.parameters(), lr=cfg.lr)
    )


def profile_path(s: Setup, path: str, rounds: int) -> dict:
    """{phase: µs per step} (medians over rounds) and `loop` µs per step for path fast|pml."""
    steps = len(s.batches)
    model = _net(s, 0)
    opt = _optimizer(path, model, s.cfg)
    phases, loop = (fast_phases, fast_loop) if path == "fast" else (pml_phases, pml_loop)
    phases(s, model, opt, Laps(s.device))  # warm-up
    per_round = []
    for _ in range(rounds):
        laps = Laps(s.device)
        phases(s, model, opt, laps)
        per_round.append(laps.seconds)
    out = {k: 1e6 * statistics.median(r[k] for r in per_round) / steps for k in PHASES}
    out["loop"] = 1e6 * _median_round(lambda: loop(s, model, opt), rounds) / steps
    return out


def aten_share(s: Setup, path: str, steps: int = 100) -> dict:
    """torch.profiler over `steps` steps of the untimed loop: the share of its wall time spent inside
    ATen operators (sum of their self times) and the operators per step."""
    from torch.profiler import ProfilerActivity, profile

    sub = replace(s, batches=s.batches[:steps])
    model = _net(s, 0)
    opt = _optimizer(path, model, s.cfg)
    (pml_loop if path == "pml" else _plain_fast_loop)(sub, model, opt)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        (pml_loop if path == "pml" else _plain_fast_loop)(sub, model, opt)
        wall = time.perf_counter() - t
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    self_us = sum(e.self_cpu_time_total for e in events)
    calls = sum(e.count for e in events)
    return {
        "aten_share": self_us / (wall * 1e6),
        "ops_per_step": calls / steps,
        "profiled_us_per_step": 1e6 * wall / steps,
    }


def _plain_fast_loop(s: Setup, model, opt) -> None:
    """The fast step's loop without train_net's epoch machinery (for the profiler)."""
    from bench.loss import batched_contrastive_loss

    cfg, total = s.cfg, torch.zeros((), device=s.device)
    for idx in s.batches:
        loss = batched_contrastive_loss(model(s.x[idx])[None], s.y[idx][None], cfg)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
    sync(s.device)


def compiled_vs_eager(s: Setup, mode: str, rounds: int) -> dict:
    """Compile time and µs per step of the fast step with torch.compile (mode loss: forward + loss, its
    backward compiled with it; step: also the optimiser step) against the eager step: two nets from one
    init on the same batches; the largest relative difference of loss and gradients on the first batch
    (same weights) and of the parameters after one epoch."""
    from bench.loss import batched_contrastive_loss
    from bench.train import make_optimizer

    cfg = s.cfg
    eager, compiled = _net(s, 0), _net(s, 0)
    opt_e, opt_c = make_optimizer(eager.parameters(), cfg), make_optimizer(compiled.parameters(), cfg)

    def objective(model, xb, yb):
        return batched_contrastive_loss(model(xb)[None], yb[None], cfg)[0]

    fwd_loss = torch.compile(objective, dynamic=False)
    opt_step = torch.compile(opt_c.step) if mode == "step" else opt_c.step

    def run(model, opt, step_fn, loss_fn, batches):
        for idx in batches:
            loss = loss_fn(model, s.x[idx], s.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            step_fn()
        sync(s.device)

    x0, y0 = s.x[s.batches[0]], s.y[s.batches[0]]
    t = time.perf_counter()
    loss_c = fwd_loss(compiled, x0, y0)  # the first call compiles (forward and backward)
    loss_c.backward()
    sync(s.device)
    compile_s = time.perf_counter() - t
    loss_e = objective(eager, x0, y0)
    loss_e.backward()
    g_c, g_e = (torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (compiled, eager))
    same_batch = max(
        abs(float(loss_c.detach() - loss_e.detach())) / max(abs(float(loss_e.detach())), 1e-12),
        float((g_c - g_e).norm() / g_e.norm().clamp_min(1e-30)),
    )
    t = time.perf_counter()
    opt_step()  # (mode step: compiles the optimiser step)
    sync(s.device)
    compile_s += time.perf_counter() - t
    opt_e.step()
    run(eager, opt_e, opt_e.step, objective, s.batches)
    run(compiled, opt_c, opt_step, fwd_loss, s.batches)
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(compiled.parameters(), eager.parameters()))
    steps = len(s.batches)
    t_e, t_c = [], []
    for _ in range(rounds):  # interleaved, so that a change of load hits both alike
        t_e.append(_median_round(lambda: run(eager, opt_e, opt_e.step, objective, s.batches), 1))
        t_c.append(_median_round(lambda: run(compiled, opt_c, opt_step, fwd_loss, s.batches), 1))
    t_e, t_c = statistics.median(t_e), statistics.median(t_c)
    return {
        "compile_s": compile_s,
        "eager_us": 1e6 * t_e / steps,
        "compiled_us": 1e6 * t_c / steps,
        "speedup": t_e / t_c,
        "same_batch_rel_diff": same_batch,
        "max_param_diff_after_epoch": diff,
    }


def format_table(results: dict[str, dict]) -> str:
    """Phases as rows, paths as columns: µs per step and share of the sum of phases."""
    paths = list(results)
    lines = [
        f"{'phase':<12}" + "".join(f" {p + ' µs':>12} {'share':>6}" for p in paths),
        "-" * (12 + 20 * len(paths)),
    ]
    sums = {p: sum(results[p][k] for k in PHASES) for p in paths}
    for k in PHASES:
        lines.append(
            f"{k:<12}"
            + "".join(f" {results[p][k]:>12.1f} {100 * results[p][k] / sums[p]:>5.1f}%" for p in paths)
        )
    lines.append(f"{'sum':<12}" + "".join(f" {sums[p]:>12.1f} {'':>6}" for p in paths))
    lines.append(f"{'loop':<12}" + "".join(f" {results[p]['loop']:>12.1f} {'':>6}" for p in paths))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Profile, print the tables; returns the exit code."""
    s = make_setup(args)
    torch.set_num_threads(args.threads) if args.threads > 0 and s.device.type == "cpu" else None
    print(
        f"step-profile: net 784-{str(args.hidden).replace(',', '-')}-{args.embed_dim}, batch {args.batch}, "
        f"{args.steps} steps x {args.rounds} rounds on {s.device}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    if not args.no_phases:
        results = {"fast": profile_path(s, "fast", args.rounds), "pml": profile_path(s, "pml", args.rounds)}
        print(format_table(results))
        print(f"pml / fast loop: {results['pml']['loop'] / results['fast']['loop']:.2f}x")
    if not args.no_profiler:
        for path in ("fast", "pml"):
            a = aten_share(s, path, min(100, args.steps))
            print(
                f"{path}: {100 * a['aten_share']:.0f}% of the step inside ATen operators (self time), "
                f"{a['ops_per_step']:.0f} operators per step "
                f"(profiled {a['profiled_us_per_step']:.0f} µs/step)"
            )
    if args.compile != "off":
        c = compiled_vs_eager(s, args.compile, args.rounds)
        print(
            f"torch.compile ({args.compile}): compile {c['compile_s']:.1f} s; "
            f"eager {c['eager_us']:.0f} µs/step, "
            f"compiled {c['compiled_us']:.0f} µs/step ({c['speedup']:.2f}x); "
            f"same batch, same weights: loss and gradients within {c['same_batch_rel_diff']:.1e} (relative); "
            f"after an epoch the nets differ by up to {c['max_param_diff_after_epoch']:.1e} (a rounding "
            f"difference flips a mined triplet now and then, and training amplifies it)"
        )
    return 0
