"""Logging finished runs and grids to an experiment tracker (MLflow), from their folders alone.

`bench run --log mlflow` logs, after the run (and its report) is written, one MLflow run for the bench
run, holding the config as params and config.json, results.csv, timings.csv and the report (md, html,
figures) as artifacts, with one nested MLflow run per (method, seed): params method, seed and the fit's
scalar diagnostics (prior precision, temperature, ...), and metrics: every metric of results.csv under
`metric_key(name)` with its CI bounds as `<key>.ci_low` / `<key>.ci_high`, and the stage timings as
`time/<stage>` (seconds). The shared base training and feature extraction go to the parent's
`time/base/seed<seed>/<stage>`. `bench grid --log mlflow` logs one parent run for the grid and one nested
run per finished cell (its coordinates and config as params, its method and seed as above), with the
grid's grid.json, merged results.csv / timings.csv and report as the parent's artifacts.

The store is local by default: a SQLite database `<out>/mlflow.db` (open it with
`mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db`), artifacts in `<out>/mlartifacts/`; `--log-uri`
names another store or a tracking server. Logging is idempotent: a run folder already logged to the
experiment (tag `bench.run_dir`) is not logged again, so a resumed grid logs only the cells it adds.
MLflow is an optional extra (`pip install 'bench[tracking]'`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from bench.errors import BenchError

TRACKERS = ("mlflow",)
EXPERIMENT = "bench"
INSTALL_HINT = (
    "--log mlflow needs MLflow, an optional extra: pip install 'bench[tracking]' (or: pip install mlflow)"
)
RUN_DIR_TAG = "bench.run_dir"
_BATCH = 500  # metrics per log_batch call (MLflow accepts up to 1000)
_PARAMS_BATCH = 100  # params per log_batch call (MLflow's limit)


def check_tracker(name: str | None) -> None:
    """BenchError (one line) unless `name` is None or a tracker whose package is installed."""
    if name is None:
        return
    if name not in TRACKERS:
        raise BenchError(f"unknown tracker {name!r} for --log; known: {', '.join(TRACKERS)}")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise BenchError(INSTALL_HINT) from None


def default_uri(out: str | Path) -> str:
    """The local store under `out` (the folder of run folders): sqlite:///<out>/mlflow.db."""
    return f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}"


def metric_key(name: str) -> str:
    """The MLflow key of a bench metric name (MLflow allows letters, digits, _ - . space : /):
    `AUROC[noise]:trace` -> `AUROC/noise:trace`, `mAP@5` -> `mAP_at_5`,
    `AURC(mAP@7):trace` -> `AURC/mAP_at_7:trace`."""
    return re.sub(r"[\[(]([^\])]*)[\])]", r"/\1", name).replace("@", "_at_")


def _client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    for noisy in ("alembic", "mlflow"):  # migrations of a new SQLite store log at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _experiment(client, uri: str, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside the database
        artifacts = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def _already_logged(client, experiment_id: str, run_dir: Path) -> str | None:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def _scalar_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flat str params of the JSON-safe scalars (and short lists) in `d`, keys prefixed."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[f"{prefix}{k}"] = str(v)
        elif isinstance(v, (list, tuple)) and len(json.dumps(v)) <= 250:
            out[f"{prefix}{k}"] = json.dumps(v)
    return out


def _log(
    client,
    run_id: str,
    metrics: dict[str, float] | None = None,
    params: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
    ps = [Param(k, v[:6000]) for k, v in (params or {}).items()]
    ts = [RunTag(k, v) for k, v in (tags or {}).items()]
    for i in range(0, len(ms), _BATCH):
        client.log_batch(run_id, metrics=ms[i : i + _BATCH])
    for i in range(0, len(ps), _PARAMS_BATCH):
        client.log_batch(run_id, params=ps[i : i + _PARAMS_BATCH])
    if ts:
        client.log_batch(run_id, tags=ts)


def method_metrics(results, timings, method: str, seed: int) -> dict[str, float]:
    """The MLflow metrics of one (method, seed): each metric, its CI bounds and the stage timings."""
    out: dict[str, float] = {}
    rows = results[(results["method"] == method) & (results["seed"] == seed)]
    for r in rows.itertuples(index=False):
        key = metric_key(r.metric)
        if key in out:
            raise BenchError(f"metrics {r.metric!r} and another map to the same MLflow key {key!r}")
        out[key], out[f"{key}.ci_low"], out[f"{key}.ci_high"] = r.value, r.ci_low, r.ci_high
    t = timings[(timings["method"] == method) & (timings["seed"] == seed)]
    out.update({f"time/{r.stage}": r.seconds for r in t.itertuples(index=False)})
    return out


def _artifacts(client, run_id: str, folder: Path) -> None:
    from bench.run_folder import CONFIG, PLOTS, REPORTS, RESULTS, TIMINGS

    for name in (CONFIG, RESULTS, TIMINGS, *REPORTS.values()):
        if (folder / name).is_file():
            client.log_artifact(run_id, str(folder / name))
    if (folder / PLOTS).is_dir():
        client.log_artifacts(run_id, str(folder / PLOTS), PLOTS)


def _log_children(client, experiment_id: str, parent: str, run, extra: dict[str, str]) -> list[str]:
    """One nested MLflow run per (method, seed) of a RunFolder, under `parent`."""
    ids = []
    diagnostics = run.meta.get("diagnostics", {})
    for method in run.methods:
        for seed in run.seeds:
            metrics = method_metrics(run.results, run.timings, method, seed)
            if not metrics:
                continue
            child = client.create_run(
                experiment_id,
                run_name=f"{method}-seed{seed}",
                tags={"mlflow.parentRunId": parent, "bench.method": method},
            )
            cid = child.info.run_id
            params = {
                "method": method,
                "seed": str(seed),
                **extra,
                **_scalar_params(diagnostics.get(f"{method}-seed{seed}", {}), "fit."),
            }
            _log(client, cid, metrics, params)
            client.set_terminated(cid)
            ids.append(cid)
    return ids


def log_run(run_dir: str | Path, uri: str | None = None, experiment: str = EXPERIMENT) -> str:
    """Log a finished run folder (module docstring); returns the parent MLflow run's id (the existing one
    when this folder was logged before)."""
    from bench.run_folder import RunFolder

    check_tracker("mlflow")
    run = RunFolder(run_dir)
    path = run.path.resolve()
    uri = uri or default_uri(path.parent)
    client = _client(uri)
    exp = _experiment(client, uri, experiment)
    if (found := _already_logged(client, exp, path)) is not None:
        return found
    parent = client.create_run(exp, run_name=path.name, tags={RUN_DIR_TAG: str(path), "bench.kind": "run"})
    pid = parent.info.run_id
    base = run.timings[run.timings["method"] == "base"]
    _log(
        client,
        pid,
        {f"time/base/seed{r.seed}/{r.stage}": r.seconds for r in base.itertuples(index=False)},
        _scalar_params(run.config, ""),
        {
            "bench.status": str(run.meta.get("status")),
            "bench.git_commit": str(run.meta.get("git_commit")),
            "bench.config_digest": str(run.meta.get("config_digest")),
        },
    )
    _log_children(client, exp, pid, run, {})
    _artifacts(client, pid, path)
    client.set_terminated(pid)
    return pid


def log_grid(grid_dir: str | Path, uri: str | None = None, experiment: str = EXPERIMENT) -> str:
    """Log a grid folder: one parent MLflow run for the grid (its spec as params) and, nested under it,
    one run per finished cell not logged before (tag `bench.run_dir`); returns the parent's id."""
    from bench.run_folder import GridFolder

    check_tracker("mlflow")
    grid = GridFolder(grid_dir)
    path = grid.path.resolve()
    uri = uri or default_uri(path.parent)
    client = _client(uri)
    exp = _experiment(client, uri, experiment)
    pid = _already_logged(client, exp, path)
    if pid is None:
        parent = client.create_run(
            exp, run_name=path.name, tags={RUN_DIR_TAG: str(path), "bench.kind": "grid"}
        )
        pid = parent.info.run_id
        _log(client, pid, params=_scalar_params(grid.meta.get("spec", {}), "spec."))
    for cell, info in sorted(grid.meta.get("cells", {}).items()):
        run = grid.cell_run(cell)
        if run is None:
            continue
        cell_dir = run.path.resolve()
        if _already_logged(client, exp, cell_dir) is not None:
            continue
        point = info.get("point") or {}
        coords = {
            "cell": cell,
            "cell.dataset": str(info.get("dataset")),
            **_scalar_params(point, "cell.point."),
            **_scalar_params(run.config, "config."),
        }
        ids = _log_children(client, exp, pid, run, coords)
        for cid in ids:
            client.set_tag(cid, RUN_DIR_TAG, str(cell_dir))
    _artifacts(client, pid, path)  # the grid's merged results, timings and report (refreshed on resume)
    if (path / "grid.json").is_file():
        client.log_artifact(pid, str(path / "grid.json"))
    client.set_terminated(pid)
    return pid
