"""Method fits side by side on a multi-core CPU: (method, seed) pairs run in forked worker processes.

Small-batch training of a small net is dispatch-bound and runs on one core (`train_threads`), so on a
2-core box the second core idles through most of a serial run; two workers fit two methods at once.
What makes that safe: the workers are forked after the data is loaded (they share it, copy-on-write);
a net several methods need (the shared base model) is trained once, under the model cache's file lock,
and loaded by the others; the parent alone writes the run folder, as each result arrives, and charges
the shared base training to the first method that completes. Each worker runs with one intra-op
thread (`WORKER_THREADS`: more hang in a forked GNU OpenMP). Results equal a serial run's up to
floating-point rounding (thread counts change reduction orders). CUDA runs stay serial: one GPU, and
CUDA does not survive a fork.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import torch

from bench.errors import BenchError

_SHARED: dict = {}  # what the forked workers inherit: the fit function (closing over the run state and data)


def cpu_count() -> int:
    """CPU cores this process may use (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(cfg, device: torch.device, tasks: int) -> int:
    """cfg.workers resolved: 0 (auto) = one per core, at most one per pending fit, on a CPU; 1 on CUDA
    or where processes cannot be forked. An explicit count > 1 on CUDA is a one-line BenchError."""
    forkable = "fork" in mp.get_all_start_methods()
    if cfg.workers > 1 and device.type != "cpu":
        raise BenchError(
            f"workers={cfg.workers} runs methods in forked CPU processes; on {device} use workers=1"
        )
    if cfg.workers > 1 and not forkable:
        raise BenchError(
            f"workers={cfg.workers} needs processes started by fork, which this platform lacks; use workers=1"
        )
    if device.type != "cpu" or not forkable:
        return 1
    n = cfg.workers if cfg.workers > 0 else cpu_count()
    return max(1, min(n, tasks))


# Intra-op CPU threads of each worker: one. A forked child whose parent has started GNU OpenMP's thread
# pool hangs in its first parallel region with more than one thread (reproduced here: a parent matmul,
# then a child at 2 threads never returns), the reason torch's DataLoader workers run single-threaded
# too. So a many-core box gives each fit one core; `workers=1` keeps every core for one fit at a time.
WORKER_THREADS = 1


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this worker process when its parent dies (Linux's PR_SET_PDEATHSIG), so a
    SIGKILLed run or grid leaves no orphan blocked on a pipe; a parent already gone before the call (the
    fork-to-prctl race) ends the worker at once. Elsewhere a no-op: the pipe's EOF still ends a worker
    that is between tasks."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl (not Linux)
        return
    if os.getppid() != parent:
        os._exit(1)


def _init(threads: int, parent: int) -> None:
    die_with_parent(parent)
    torch.set_num_threads(threads)


def _fit(name: str, seed: int):
    start = time.perf_counter()
    out = _SHARED["fit"](name, seed)
    return out, time.perf_counter() - start


def schedule(pending: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The order fits are handed out: per seed, the first post-hoc method (it trains the shared base
    model), then the methods that train nets of their own (they need no base, so a second worker starts
    at once), then the remaining post-hoc methods, which load the base once it is cached."""
    from bench.registry import METHODS

    first_reusing: dict[int, str] = {}
    for name, seed in pending:
        if METHODS.get(name).reuses_base_model:
            first_reusing.setdefault(seed, name)

    def rank(item: tuple[str, int]) -> tuple[int, int]:
        name, seed = item
        return seed, 0 if first_reusing.get(seed) == name else 1 if not METHODS.get(
            name
        ).reuses_base_model else 2

    return sorted(pending, key=rank)  # stable: the run's method order within each rank


def run_pool(
    fit: Callable, failed: Callable, pending: list[tuple[str, int]], workers: int, record: Callable
) -> None:
    """fit(name, seed) -> outcome for every pending (method, seed) in `workers` forked processes (they
    inherit `fit` and what it closes over: the run state and the data); record(outcome, seconds) in the
    parent as each completes, failed(name, seed, message) standing in for a fit whose worker died.
    A dead worker (killed for memory, a crash) breaks the whole pool and every fit in it, without saying
    whose worker died; so the fits it took down are retried one at a time, each in a pool of its own,
    and only a fit whose own worker dies is failed. Ctrl-C stops the workers."""
    _SHARED["fit"] = fit
    try:
        lost = _pool_pass(failed, schedule(pending), workers, record)
        for item in lost:  # alone: a second death is this fit's own
            _pool_pass(failed, [item], 1, record, last_try=True)
    finally:
        _SHARED.clear()


def _pool_pass(
    failed: Callable, pending: list[tuple[str, int]], workers: int, record: Callable, last_try: bool = False
) -> list[tuple[str, int]]:
    """One pool over `pending`: records what completes; returns the fits a dead worker took down (or,
    on the `last_try`, records them as failed)."""
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp.get_context("fork"),
        initializer=_init,
        initargs=(WORKER_THREADS, os.getpid()),
    )
    lost: list[tuple[str, int]] = []
    try:
        futures = {pool.submit(_fit, n, s): (n, s) for n, s in pending}
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for f in sorted(finished, key=lambda f: pending.index(futures[f])):
                try:
                    out, seconds = f.result()
                except Exception as e:  # BrokenProcessPool: a worker died (this fit's or another's); else the
                    if isinstance(e, BrokenProcessPool) and not last_try:  # outcome could not come back
                        lost.append(futures[f])
                        continue
                    why = f"worker process failed: {type(e).__name__}: {e}"
                    out, seconds = failed(*futures[f], why), None
                record(out, seconds)
    except BaseException:  # Ctrl-C: stop the workers (shutdown forgets them, so they are taken first)
        workers_now = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in workers_now:
            p.terminate()
        raise
    pool.shutdown()
    return lost
