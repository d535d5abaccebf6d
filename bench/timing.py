"""Wall-time per (method, stage), CUDA-synchronised so GPU work is charged to the right stage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from bench.parallel import balance_threads


def sync(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work on `device` (no-op elsewhere), so wall times are charged correctly."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


@dataclass
class StageTimer:
    """Records seconds per (method, stage); `with timer.stage(m, "hessian"):` adds to that cell."""

    device: torch.device | str | None = None
    records: dict[tuple[str, str], float] = field(default_factory=dict)
    _active: set[tuple[str, str]] = field(default_factory=set, repr=False)

    @contextmanager
    def stage(self, method: str, stage: str) -> Iterator[None]:
        """Time a block; the elapsed time is added to (method, stage) even if the block raises.

        Nesting the same (method, stage) is a no-op inside, so a method may time a stage that the
        runner also times without counting it twice. In a pool worker a stage starts with the fit's
        current share of the cores (`bench.parallel.balance_threads`).
        """
        key = (method, stage)
        if key in self._active:
            yield
            return
        balance_threads()
        self._active.add(key)
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self._active.discard(key)
            self.add(method, stage, time.perf_counter() - start)

    def add(self, method: str, stage: str, seconds: float) -> None:
        """Add `seconds` to (method, stage), e.g. when restoring a cached stage's recorded time."""
        key = (method, stage)
        self.records[key] = self.records.get(key, 0.0) + float(seconds)

    def for_method(self, method: str) -> dict[str, float]:
        """Stage -> seconds for one method."""
        return {s: t for (m, s), t in self.records.items() if m == method}
