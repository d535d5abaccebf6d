"""Executors behind one small interface (submit, poll, close): `local`, a pool of worker processes
that survives the death of one, and `ray`, Ray core tasks on a local or remote Ray cluster."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_ready
from typing import Any, Protocol

from bench.errors import BenchError
from bench.grid.tasks import run_task
from bench.parallel import die_with_parent, die_with_process

TaskResult = dict[str, Any]  # what tasks.run_task returns: {"ok": bool, ...}
RAY_MISSING = "--executor ray needs Ray: pip install 'bench[cluster]' (or use --executor local)"


@dataclass(frozen=True)
class ExecutorOptions:
    """Where and how wide tasks run: `kind` local|ray, the Ray `address` (None: start Ray here),
    `jobs` tasks at once (local default: CPUs / cpus_per_job; Ray default: as its resources allow),
    CPUs and (fractional) GPUs each task reserves."""

    kind: str = "local"
    address: str | None = None
    jobs: int | None = None
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise BenchError(f"unknown executor {self.kind!r}; known: {', '.join(EXECUTORS)}")
        if self.jobs is not None and self.jobs < 1:
            raise BenchError(f"--jobs must be >= 1, got {self.jobs}")
        if self.cpus_per_job <= 0 or self.gpus_per_job < 0:
            raise BenchError("--cpus-per-job must be > 0 and --gpus-per-job >= 0")
        if self.address and self.kind != "ray":
            raise BenchError("--address is for --executor ray")
        if self.kind == "ray" and importlib.util.find_spec("ray") is None:
            raise BenchError(RAY_MISSING)

    @property
    def threads(self) -> int:
        """torch intra-op threads per task (the CPUs it reserves, at least one)."""
        return max(1, int(self.cpus_per_job))


class Executor(Protocol):
    """Runs `tasks.run_task(*args)` for submitted keys; `slots` bounds the tasks in flight (None: no
    bound)."""

    slots: int | None

    def submit(self, key: str, args: tuple) -> None: ...

    def poll(self, timeout: float) -> list[tuple[str, TaskResult]]:
        """Finished tasks (waiting up to `timeout` s for the first); a task whose worker died comes
        back as {"ok": False, "error": ...}."""
        ...

    def close(self, cancel: bool = False) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def _died(key: str, why: str) -> TaskResult:
    return {
        "ok": False,
        "error": f"worker died while running {key} ({why}); `bench grid --resume` reruns it",
        "traceback": "",
        "worker_died": True,
    }


def _worker_loop(conn, driver: int) -> None:
    """A local worker: run (key, args) messages one at a time until None or the pipe closes; it dies with
    its parent (the forkserver) and with the driver, even in the middle of a cell."""
    die_with_parent(os.getppid())
    die_with_process(driver)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        key, args = msg
        conn.send((key, run_task(*args)))


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_loop, args=(child, os.getpid()), daemon=True)
        self.proc.start()
        child.close()


class LocalExecutor:
    """`jobs` long-lived worker processes, one task at a time each, forked from a forkserver (a clean
    process, no threads) that imported bench once. A worker that dies loses only its task (reported
    as such) and is replaced on demand."""

    def __init__(self, opts: ExecutorOptions) -> None:
        self.slots = opts.jobs or max(1, int((os.cpu_count() or 1) // opts.cpus_per_job))
        self._ctx = mp.get_context(
            "forkserver"
        )  # workers fork from one clean server that imported bench once
        self._ctx.set_forkserver_preload(["bench.grid.tasks", "bench.runner"])
        self._idle: list[_Worker] = []
        self._busy: dict[_Worker, str] = {}

    def submit(self, key: str, args: tuple) -> None:
        while self._idle and not self._idle[-1].proc.is_alive():
            self._idle.pop()
        w = self._idle.pop() if self._idle else _Worker(self._ctx)
        w.conn.send((key, args))
        self._busy[w] = key

    def poll(self, timeout: float) -> list[tuple[str, TaskResult]]:
        if not self._busy:
            time.sleep(timeout)
            return []
        handles = {**{w.conn: w for w in self._busy}, **{w.proc.sentinel: w for w in self._busy}}
        done = []
        for h in wait_ready(list(handles), timeout):
            w = handles[h]
            if w not in self._busy:
                continue  # both its pipe and its sentinel were ready
            key = self._busy.pop(w)
            try:
                if w.conn.poll():
                    done.append(w.conn.recv())
                    self._idle.append(w)
                    continue
            except (EOFError, OSError):
                pass
            w.proc.join(5)
            done.append((key, _died(key, f"exit code {w.proc.exitcode}")))
        return done

    def close(self, cancel: bool = False) -> None:
        for w in self._idle:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._busy:  # only after an interrupt: their tasks are abandoned
            w.proc.terminate()
        for w in [*self._idle, *self._busy]:
            w.proc.join(10)
        self._idle, self._busy = [], {}

    def describe(self) -> dict[str, Any]:
        return {"executor": "local", "jobs": self.slots}


class RayExecutor:
    """Ray core tasks (`max_retries=0`: a task whose worker dies is reported, and `--resume` reruns it).
    Uses the Ray already initialised in this process, else connects to `address`, else starts a
    local Ray with `jobs x cpus_per_job` CPUs (all CPUs when jobs is not given)."""

    def __init__(self, opts: ExecutorOptions) -> None:
        try:
            import ray
        except ImportError:
            raise BenchError(RAY_MISSING) from None
        self._ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            if opts.address:
                ray.init(address=opts.address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=int(opts.jobs * opts.cpus_per_job) if opts.jobs else None,
                    include_dashboard=False,
                    log_to_driver=False,
                )
        self.slots = opts.jobs
        self._task = ray.remote(run_task).options(
            num_cpus=opts.cpus_per_job, num_gpus=opts.gpus_per_job, max_retries=0
        )
        self._refs: dict[Any, str] = {}
        self._opts = opts

    def submit(self, key: str, args: tuple) -> None:
        self._refs[self._task.remote(*args)] = key

    def poll(self, timeout: float) -> list[tuple[str, TaskResult]]:
        ray = self._ray
        if not self._refs:
            time.sleep(timeout)
            return []
        ready, rest = ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        done = []
        for ref in ready:
            key = self._refs.pop(ref)
            try:
                done.append((key, ray.get(ref)))
            except ray.exceptions.RayError as e:  # worker or node died, task lost
                done.append(
                    (key, _died(key, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
                )
        return done

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self._refs:
                self._ray.cancel(ref, force=True)
        self._refs = {}
        if self._owned:
            self._ray.shutdown()

    def describe(self) -> dict[str, Any]:
        res = self._ray.cluster_resources()
        return {
            "executor": "ray",
            "ray_version": self._ray.__version__,
            "address": self._opts.address,
            "jobs": self.slots,
            "cluster_cpus": res.get("CPU"),
            "cluster_gpus": res.get("GPU", 0.0),
            "nodes": len([n for n in self._ray.nodes() if n.get("Alive")]),
        }


EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}


def make_executor(opts: ExecutorOptions) -> Executor:
    return EXECUTORS[opts.kind](opts)
