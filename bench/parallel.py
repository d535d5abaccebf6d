"""Method fits side by side on a multi-core CPU: (method, seed) pairs run in forked worker processes.

Small-batch training of a small net is dispatch-bound and runs on one core (`train_threads`), so on a
2-core box the second core idles through most of a serial run; two workers fit two methods at once.
What makes that safe: the workers are forked after the data is loaded (they share it, copy-on-write);
a net several methods need (the shared base model) is trained once, under the model cache's file lock,
and loaded by the others; the parent alone writes the run folder, as each result arrives, and charges
the shared base training to the first method that completes.

Every core busy until the end: the longest fits start first (`estimate_costs`, `schedule`), and once no
fit is left to start, each running fit takes an equal share of the cores (`balance_threads`, called at
every stage a fit starts), so a long fit left alone at the end gets them all. Threads in a forked child:
GNU OpenMP keeps its thread pool per *master thread* (thread-local); a child forked after the parent ran
a parallel region inherits that pool's bookkeeping but not its threads, and its main thread hangs in its
first parallel region with more than one thread. A thread the child creates itself starts with no pool
and builds a fresh one. So a worker runs each fit in a fresh thread (`_in_fresh_thread`), and may use
any number of OpenMP threads there, whatever the parent did before the fork (`tests/test_parallel.py`
runs the hang case). Results equal a serial run's up to floating-point rounding (thread counts change
reduction orders). CUDA runs stay serial: one GPU, and CUDA does not survive a fork.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import resource
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import torch

from bench.errors import BenchError

# what the forked workers inherit: the fit function (closing over the run state and data) and the pool's
# shared counters (fits started, fits running, fits in all, cores); "worker" is set in a worker only
_SHARED: dict = {}


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


# Intra-op CPU threads of a worker's fit while other fits are waiting to start: one (small-batch training
# is dispatch-bound; the cores go to more fits at once). Once none waits, `balance_threads` shares them.
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


def die_with_process(pid: int) -> None:
    """End this process (exit status 1) as soon as process `pid` exits, from a daemon thread: for a worker
    whose parent is not the process it serves (a forkserver's child serving the grid's driver), which
    PR_SET_PDEATHSIG cannot watch. The forkserver stays alive while its children hold its pipe, so
    without this a busy worker of a killed driver ran its cell to the end (minutes). Waits on a pidfd
    (Linux >= 5.3; no pid-reuse race, since `pid` is alive when it is opened), else polls once a second."""

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            select.select([fd], [], [])
        else:
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
                time.sleep(1.0)
        os._exit(1)

    if not _alive(pid):
        os._exit(1)
    threading.Thread(target=watch, name="bench-die-with", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _init(threads: int, parent: int) -> None:
    die_with_parent(parent)
    _SHARED["worker"] = True
    torch.set_num_threads(threads)


def process_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's threads and of its children that have exited and
    been waited for (the pool's workers once it shut down, and what they waited for in turn)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def utilisation_record(wall_seconds: float, cpu_seconds: float, cores: int | None = None) -> dict:
    """config.json's "cpu": a run's wall time (from `run`'s start, data and extraction included), the busy
    core-seconds of its processes over it, the cores it could use and utilisation = busy / (wall x cores).
    Busy includes OpenMP threads spinning at a barrier (GNU OpenMP spins briefly before sleeping)."""
    cores = cores or cpu_count()
    return {
        "wall_seconds": round(wall_seconds, 3),
        "busy_core_seconds": round(cpu_seconds, 3),
        "cores": cores,
        "utilisation": round(cpu_seconds / (wall_seconds * cores), 4) if wall_seconds > 0 else None,
    }


def _in_fresh_thread(fn: Callable, *args):
    """fn(*args) in a new thread of this process (its result returned, its exception raised here): GNU
    OpenMP gives a new master thread a new thread pool, which a forked child's main thread cannot have
    (module docstring)."""
    box: dict = {}

    def target() -> None:
        try:
            box["out"] = fn(*args)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="bench-fit", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["out"]


def balance_threads() -> int:
    """In a pool worker: set this fit's intra-op threads to its share of the cores (WORKER_THREADS while
    fits wait to start, else cores // fits running) and return it. Called where a fit starts a stage
    (`bench.timing.StageTimer.stage`) and in long loops; a no-op outside a worker (returns the current
    count)."""
    if not _SHARED.get("worker"):
        return torch.get_num_threads()
    started, running = _SHARED["started"].value, _SHARED["running"].value
    n = WORKER_THREADS if started < _SHARED["total"] else max(1, _SHARED["cores"] // max(1, running))
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def _fit(name: str, seed: int):
    with _SHARED["started"].get_lock():
        _SHARED["started"].value += 1
    with _SHARED["running"].get_lock():
        _SHARED["running"].value += 1
    start, cpu = time.perf_counter(), process_cpu_seconds()

    def fit():
        balance_threads()
        return _SHARED["fit"](name, seed)

    try:
        out = _in_fresh_thread(fit)
    finally:
        with _SHARED["running"].get_lock():
            _SHARED["running"].value -= 1
    return out, time.perf_counter() - start, process_cpu_seconds() - cpu


def schedule(
    pending: list[tuple[str, int]], costs: dict[tuple[str, int], float] | None = None
) -> list[tuple[str, int]]:
    """The order fits are handed out, longest first within three ranks: per seed, the costliest post-hoc
    method (it trains the shared base model, which the other post-hoc fits then load), then the methods
    that train nets of their own (they need no base, so a second worker starts at once), then the
    remaining post-hoc methods. `costs` (estimated seconds, `bench.fit_costs`) orders each rank; without
    it, or between equal costs, the seed and the run's method order do."""
    from bench.registry import METHODS

    costs = costs or {}
    index = {item: i for i, item in enumerate(pending)}
    by_cost = sorted(pending, key=lambda it: (-costs.get(it, 0.0), it[1], index[it]))
    first_reusing: dict[int, str] = {}
    for name, seed in by_cost:
        if METHODS.get(name).reuses_base_model:
            first_reusing.setdefault(seed, name)

    def rank(item: tuple[str, int]) -> tuple[int, float, int, int]:
        name, seed = item
        r = 0 if first_reusing.get(seed) == name else 1 if not METHODS.get(name).reuses_base_model else 2
        return r, -costs.get(item, 0.0), seed, index[item]

    return sorted(pending, key=rank)


def run_pool(
    fit: Callable,
    failed: Callable,
    pending: list[tuple[str, int]],
    workers: int,
    record: Callable,
    costs: dict[tuple[str, int], float] | None = None,
) -> None:
    """fit(name, seed) -> outcome for every pending (method, seed) in `workers` forked processes (they
    inherit `fit` and what it closes over: the run state and the data), longest first (`schedule` with
    the estimated `costs`); record(outcome, seconds, cpu_seconds) in the parent as each completes,
    failed(name, seed, message) standing in for a fit whose worker died.
    A dead worker (killed for memory, a crash) breaks the whole pool and every fit in it, without saying
    whose worker died; so the fits it took down are retried one at a time, each in a pool of its own,
    and only a fit whose own worker dies is failed. Ctrl-C stops the workers."""
    _SHARED["fit"] = fit
    try:
        lost = _pool_pass(failed, schedule(pending, costs), workers, record)
        for item in lost:  # alone: a second death is this fit's own
            _pool_pass(failed, [item], 1, record, last_try=True)
    finally:
        _SHARED.clear()


def _pool_pass(
    failed: Callable, pending: list[tuple[str, int]], workers: int, record: Callable, last_try: bool = False
) -> list[tuple[str, int]]:
    """One pool over `pending`: records what completes; returns the fits a dead worker took down (or,
    on the `last_try`, records them as failed)."""
    ctx = mp.get_context("fork")
    _SHARED.update(
        started=ctx.Value("i", 0), running=ctx.Value("i", 0), total=len(pending), cores=cpu_count()
    )
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
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
                cpu = None
                try:
                    out, seconds, cpu = f.result()
                except Exception as e:  # BrokenProcessPool: a worker died (this fit's or another's); else the
                    if isinstance(e, BrokenProcessPool) and not last_try:  # outcome could not come back
                        lost.append(futures[f])
                        continue
                    why = f"worker process failed: {type(e).__name__}: {e}"
                    out, seconds = failed(*futures[f], why), None
                record(out, seconds, cpu)
    except BaseException:  # Ctrl-C: stop the workers (shutdown forgets them, so they are taken first)
        workers_now = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in workers_now:
            p.terminate()
        raise
    pool.shutdown()
    return lost
