"""How long each pending (method, seed) fit will take, so that the worker pool starts the longest first
(`bench.parallel.schedule`): a long fit started last runs alone at the end while the other cores idle.

Sources, in order: the seconds an earlier run with the same settings recorded for that method
(`<out>/cache/fit_seconds.json`, written by every run as each fit completes: the sum of the fit's own
stage times, the shared base training and extraction left out), else the method's own guess
(`Method.relative_cost`) in units of a post-hoc fit, converted to seconds with the median ratio of
seconds to guess over the methods that have a recorded time (1 s per unit when none has). Estimates only
order the fits; results never depend on them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.atomic import atomic_write_json
from bench.conventions import BASE_METHOD

HISTORY = "fit_seconds.json"
# fields that do not change what one method's fit costs per seed (which methods and seeds run, and where)
_NOT_COST = {
    "methods",
    "seed",
    "seeds",
    "name",
    "out",
    "quiet",
    "report",
    "data_dir",
    "data_workers",
    "workers",
}


def cost_key(cfg) -> str:
    """A digest of every setting that can change a fit's cost (the method list and seeds left out)."""
    return cfg.digest([k for k in cfg.to_dict() if k not in _NOT_COST])


def _read(path: Path) -> dict:
    try:
        blob = json.loads(path.read_text())
        return blob if isinstance(blob, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: no history
        return {}


def fit_seconds(times: list[dict]) -> float:
    """A fit's own seconds from its timing rows (those charged to the shared base left out)."""
    return float(sum(t["seconds"] for t in times if t["method"] != BASE_METHOD))


def remember(cache_root: Path, cfg, method: str, seconds: float) -> None:
    """Record `seconds` for `method` under this config's cost key (atomic; a lost race loses a hint)."""
    path = Path(cache_root) / HISTORY
    blob = _read(path)
    blob.setdefault(cost_key(cfg), {})[method] = round(float(seconds), 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, blob)


def _guess(cfg, cls) -> float:
    """The method's own guess at its config (its recipe applied), times the trials of its search when
    recipe=tuned refits it per trial (a method on the shared base model tunes from one fit: counted once)."""
    from bench.recipes import method_config
    from bench.tuning import wants_tuning

    cost = float(cls.relative_cost(method_config(cfg, cls)))
    if wants_tuning(cfg, cls) and not cls.reuses_base_model:
        cost *= cfg.tune_trials
    return cost


def estimate_costs(
    cfg, pending: list[tuple[str, int]], cache_root: Path
) -> tuple[dict[tuple[str, int], float], str]:
    """(estimated seconds per pending fit, a line saying where the estimates came from)."""
    from bench.registry import METHODS

    known: dict[str, float] = _read(Path(cache_root) / HISTORY).get(cost_key(cfg), {})
    guess = {name: _guess(cfg, METHODS.get(name)) for name, _ in pending}
    ratios = [known[n] / guess[n] for n in guess if n in known and guess[n] > 0]
    unit = statistics.median(ratios) if ratios else 1.0
    costs = {(n, s): float(known[n]) if n in known else guess[n] * unit for n, s in pending}
    timed = len({n for n, _ in pending if n in known})
    methods = len({n for n, _ in pending})
    source = (
        f"{timed} of {methods} methods from an earlier run's timings, the rest from method guesses"
        if timed
        else "from method guesses (no earlier run with these settings)"
    )
    return costs, source
