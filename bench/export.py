"""Export a fitted method from a run folder into one self-contained file, and load it back.

Run folders keep predictions, not fitted posteriors, so `export` refits: it rebuilds the run's data and
config from config.json, fits the method for the seed exactly as the runner did (same seeds, generator
streams and thread count; the nets come from the run's model cache, `<run>/../cache/models`), and checks
that the refit reproduces, bit for bit, what the run saved for that (method, seed) in perquery/: the
mean and variance of every query set (ID test and each OOD set) and every uncertainty score vector. It
then keeps, of the method's `export_state()` taken right after the fit, the attributes `predict` read,
writes the artefact, reads it back, and checks the loaded method against the same arrays again. A
mismatch at either check is a BenchError and no file is written.

File format (FORMAT, VERSION): `torch.save` of {"format", "version", "sha256", "payload"}, where payload is
a uint8 tensor holding the bytes of a second `torch.save` of

    {"format", "version", "method", "seed", "config" (RunConfig as JSON), "device" (where it was fitted),
     "fitted" (the fit's diagnostics as JSON: prior precision, temperature, ...), "input" (shape and kind
     of one input), "source" (run folder, config digest, commit, bench and torch versions), "checked" (the
     arrays compared bit for bit), "state" (`bench.state_codec` tree: nets, posterior factors, ...)}

and sha256 is the SHA-256 of those payload bytes. Both levels load with `torch.load(weights_only=True)`;
classes are resolved through `bench.state_codec`'s allowlist: the file holds no code.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import __version__
from bench.atomic import atomic_write_bytes
from bench.errors import BenchError, require
from bench.method import EmbeddingPrediction, Method
from bench.state_codec import StateError, decode, encode, objects_in, reference

FORMAT = "bench-fitted-method"
VERSION = 1


# -- the loaded object -------------------------------------------------------------------------------


@dataclass
class Embedding:
    """What `FittedMethod.embed` returns for N inputs: mean [N, d], var [N, d] (None for a deterministic
    method), cov [N, d, d] (when the method gives one), samples [S, N, d] (its joint draws, when it has
    them) and scores (name -> [N]; `trace`, the total variance, the one score that needs no gallery)."""

    mean: torch.Tensor
    var: torch.Tensor | None = None
    cov: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Neighbours:
    """What `FittedMethod.retrieve` returns for N queries: index and distance [N, k] of each query's k
    nearest gallery items under the mean embeddings (nearest first), their labels [N, k] (gallery
    positions when no labels were given) and the uncertainty scores of the queries (name -> [N], larger =
    more uncertain; every score of the run's config the method supports)."""

    index: torch.Tensor
    distance: torch.Tensor
    labels: torch.Tensor
    scores: dict[str, np.ndarray]


class FittedMethod:
    """A fitted method loaded from an exported artefact (`bench.load`): `embed` and `retrieve` on new
    inputs, shaped and scaled as the run's dataset gives them (see `input`)."""

    def __init__(self, method: Method, meta: dict[str, Any]) -> None:
        self.method = method
        self.name: str = meta["method"]
        self.seed: int = int(meta["seed"])
        self.config = method.cfg
        self.fitted: dict[str, Any] = json.loads(meta["fitted"])
        self.input: dict[str, Any] = dict(meta["input"])
        self.source: dict[str, Any] = dict(meta["source"])
        self.device = torch.device(meta["device"])  # where it was fitted, and its tensors lie

    def __repr__(self) -> str:
        return f"FittedMethod({self.name!r}, seed={self.seed}, input={self.input.get('shape')})"

    def predict(self, inputs: torch.Tensor) -> EmbeddingPrediction:
        """The method's prediction for `inputs` [N, *input shape], as in the run (one query set, on CPU)."""
        return _predict(self.method, inputs, self.device)

    def embed(self, inputs: torch.Tensor) -> Embedding:
        """Mean, variance / covariance, joint samples and the gallery-free score (`trace`) of N inputs."""
        from bench.metrics.uncertainty import uncertainty_score

        p = self.predict(inputs)
        u = uncertainty_score(p)
        return Embedding(p.mean, p.var, p.cov, p.samples, {} if u is None else {"trace": u})

    def retrieve(
        self,
        queries: torch.Tensor,
        gallery: torch.Tensor,
        k: int = 10,
        gallery_labels: torch.Tensor | None = None,
    ) -> Neighbours:
        """Each query's k nearest gallery items (the run's distance, mean embeddings) and the queries'
        uncertainty scores against this gallery, computed as the run scores an OOD set against its ID
        test set. Scores about retrieved labels use `gallery_labels` [G]; without them every gallery item
        is its own label (top1_flip then asks whether the top-1 *item* changes under the predictive)."""
        from bench.evaluate import resolve_scores
        from bench.metrics.retrieval import nearest
        from bench.metrics.uncertainty import ScoreSettings, run_score, score_inputs

        require(k >= 1, f"k must be >= 1, got {k}")
        pg, pq = self.predict(gallery), self.predict(queries)
        labels = torch.arange(len(gallery)) if gallery_labels is None else torch.as_tensor(gallery_labels)
        require(
            labels.shape == (len(gallery),),
            f"gallery_labels must have shape [{len(gallery)}], got {list(labels.shape)}",
        )
        idx, dist = nearest(pq.mean, pg.mean, k, self.config.distance)
        _, inp = score_inputs(pg, {"queries": pq}, labels, ScoreSettings.from_config(self.config))
        scores = {
            n: u for n in resolve_scores(self.config) if (u := run_score(n, inp["queries"])) is not None
        }
        return Neighbours(idx, dist, labels[idx], scores)


def _predict(method: Method, x: torch.Tensor, device: torch.device) -> EmbeddingPrediction:
    with torch.no_grad(), method.query_set():
        return method.predict(torch.as_tensor(x).to(device)).to("cpu")


# -- reading and writing the file --------------------------------------------------------------------


def _config_json(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def _config_from_json(text: str):
    from bench.grid.spec import config_from_dict

    return config_from_dict(json.loads(text))


def to_bytes(payload: dict[str, Any]) -> bytes:
    """The file's bytes for `payload` (module docstring: the inner save, its checksum, the outer save)."""
    inner = io.BytesIO()
    torch.save(payload, inner)
    data = inner.getvalue()
    outer = io.BytesIO()
    torch.save(
        {
            "format": FORMAT,
            "version": VERSION,
            "sha256": hashlib.sha256(data).hexdigest(),
            "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
        },
        outer,
    )
    return outer.getvalue()


def read_payload(path: str | Path) -> dict[str, Any]:
    """The payload of an artefact, after checking format, version and checksum (BenchError, one line)."""
    path = Path(path)
    require(path.is_file(), f"{path}: no such file")
    try:
        outer = torch.load(path, map_location=None, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, or an object weights_only refuses
        raise BenchError(f"{path} is not a bench artefact or is damaged ({type(e).__name__})") from None
    if not (isinstance(outer, dict) and outer.get("format") == FORMAT):
        raise BenchError(f"{path} is not a bench fitted-method artefact")
    if outer.get("version") != VERSION:
        raise BenchError(
            f"{path} has artefact format version {outer.get('version')}; this bench {__version__} "
            f"reads version {VERSION}: export it again with this version"
        )
    data = outer.get("payload")
    require(isinstance(data, torch.Tensor) and data.dtype == torch.uint8, f"{path} is damaged (no payload)")
    raw = data.numpy().tobytes()
    if hashlib.sha256(raw).hexdigest() != outer.get("sha256"):
        raise BenchError(f"{path} is damaged: its checksum does not match its content")
    try:
        payload = torch.load(io.BytesIO(raw), map_location=None, weights_only=True)
    except Exception as e:
        raise BenchError(f"{path} is damaged: its payload does not load ({type(e).__name__})") from None
    require(
        isinstance(payload, dict) and payload.get("version") == VERSION, f"{path} is damaged (bad payload)"
    )
    return payload


def method_from_payload(payload: dict[str, Any], where: str = "artefact") -> Method:
    """The fitted method of a payload: the registered class made with the stored config, its state loaded."""
    from bench.registry import METHODS

    try:
        cls = METHODS.get(payload["method"])
        cfg = _config_from_json(payload["config"])
        method = cls(cfg)
        method.load_state(decode(payload["state"]))
    except StateError as e:
        raise BenchError(f"{where}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise BenchError(f"{where} is damaged ({type(e).__name__}: {e})") from None
    except RuntimeError as e:  # e.g. a CUDA generator or tensor on a machine without CUDA
        raise BenchError(f"{where} cannot be loaded here ({str(e).splitlines()[0]})") from None
    return method


def load(path: str | Path) -> FittedMethod:
    """The fitted method of an artefact written by `python -m bench export` (BenchError, one line, when
    the file is damaged, of another format version, or names a method this bench does not have)."""
    payload = read_payload(path)
    return FittedMethod(method_from_payload(payload, str(path)), payload)


def tensor_sizes(tree: Any, path: str = "") -> dict[str, tuple[list[int], int]]:
    """path -> (shape, bytes) of every tensor in a state tree (the nets' weights, posterior factors, ...)."""
    out: dict[str, tuple[list[int], int]] = {}
    if isinstance(tree, torch.Tensor):
        out[path] = (list(tree.shape), tree.numel() * tree.element_size())
    elif isinstance(tree, dict):
        kind = tree.get("$")
        if kind in ("tensor", "param", "ndarray"):
            out.update(tensor_sizes(tree["t"], path))
        elif kind in ("dict", "odict"):
            for k, v in tree["items"]:
                key = str(k).lstrip("_") if str(k) in ("_parameters", "_buffers", "_modules") else k
                out.update(
                    tensor_sizes(
                        v, f"{path}.{key}" if key not in ("parameters", "buffers", "modules") else path
                    )
                )
        elif kind in ("list", "tuple", "set"):
            for i, v in enumerate(tree["items"]):
                out.update(tensor_sizes(v, f"{path}[{i}]"))
        elif kind == "object":
            out.update(tensor_sizes(tree["state"], path))
    return out


def describe(path: str | Path) -> str:
    """A few lines about an artefact: method, seed, source, the fit's prior and temperature, its tensors."""
    p = read_payload(path)
    fitted = json.loads(p["fitted"])
    facts = {
        k: fitted[k]
        for k in ("prior_precision", "temperature", "dropout", "member_seeds", "variance")
        if k in fitted
    }
    sizes = tensor_sizes(p["state"])
    lines = [
        f"{path}: {p['method']} (seed {p['seed']}), artefact format {p['version']}, input "
        f"{p['input']['kind']} of shape {p['input']['shape']}",
        f"  from {p['source']['run']} (config {p['source']['config_digest']}, commit "
        f"{p['source']['git_commit']}), bench {p['source']['bench_version']}",
        f"  fitted: {json.dumps(facts)}" if facts else "  fitted: (no posterior scale)",
        f"  checked bit for bit at export: {len(p['checked'])} arrays",
        f"  {len(sizes)} tensors, {sum(b for _, b in sizes.values()) / 1e6:.2f} MB; largest:",
    ]
    for name, (shape, b) in sorted(sizes.items(), key=lambda kv: -kv[1][1])[:5]:
        lines.append(f"    {name.lstrip('.')} {shape} ({b / 1e3:.1f} kB)")
    return "\n".join(lines)


# -- export -------------------------------------------------------------------------------------------


ALL_ATTRIBUTES = "*"  # recorded when an object's __dict__ itself was read (copy, vars): keep every attribute


def recordable(obj: Any) -> bool:
    """Whether `recording_reads` may watch `obj`: an instance with a __dict__ of a class the codec may
    name, except nn.Modules (their weights are read through internal dicts: kept whole) and enums."""
    if isinstance(obj, (type, nn.Module, enum.Enum)) or not hasattr(obj, "__dict__"):
        return False
    try:
        reference(type(obj))
    except StateError:
        return False
    return True


@contextmanager
def recording_reads(objs: list[Any]) -> Iterator[dict[int, set[str]]]:
    """Within the block, {id(obj): names of its instance attributes that were read} for every object of
    `objs` (through a subclass swapped in for each class during the block, restored after; an object
    whose `__dict__` is read as a whole records ALL_ATTRIBUTES)."""
    reads: dict[int, set[str]] = {id(o): set() for o in objs}
    swapped: dict[type, type] = {}

    def recorder(cls: type) -> type:
        def getattribute(self, name: str) -> Any:
            seen = reads.get(id(self))
            if seen is not None:
                if name in ("__dict__", "__getstate__", "__reduce__", "__reduce_ex__"):
                    seen.add(ALL_ATTRIBUTES)
                elif name in object.__getattribute__(self, "__dict__"):
                    seen.add(name)
            return cls.__getattribute__(self, name)

        return type(
            cls.__name__,
            (cls,),
            {
                "__getattribute__": getattribute,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
            },
        )

    originals = [(o, type(o)) for o in objs]
    try:
        for o, cls in originals:
            if cls not in swapped:
                swapped[cls] = recorder(cls)
            object.__setattr__(o, "__class__", swapped[cls])  # also for frozen dataclasses
        yield reads
    finally:
        for o, cls in originals:
            object.__setattr__(o, "__class__", cls)


def prediction_arrays(method: Method, data, cfg, device: torch.device) -> dict[str, np.ndarray]:
    """The arrays the run saves per (method, seed) that depend on the fitted method: `id_mean`, `id_var`,
    `ood_<set>_mean`, `ood_<set>_var` and every score vector `score__<set>__<score>`, computed as the
    runner computes them (`predict_split` per query set, then `score_inputs` / `run_score`)."""
    from bench.evaluate import resolve_scores
    from bench.metrics.uncertainty import ScoreSettings, run_score, score_inputs
    from bench.run_folder import score_array
    from bench.runner import predict_split

    with torch.no_grad():
        pid = predict_split(method, data.test_id, device)
        pood = {k: predict_split(method, s, device) for k, s in data.test_ood.items()}
    out: dict[str, np.ndarray] = {}
    for prefix, p in [("id", pid), *((f"ood_{k}", p) for k, p in pood.items())]:
        out[f"{prefix}_mean"] = p.mean.numpy()
        if p.var is not None:
            out[f"{prefix}_var"] = p.var.numpy()
    inp_id, inp_ood = score_inputs(pid, pood, data.test_id.y, ScoreSettings.from_config(cfg))
    for name in resolve_scores(cfg):
        for s, inp in [("id", inp_id), *inp_ood.items()]:
            u = run_score(name, inp)
            if u is not None:
                out[score_array(s, name)] = u
    return out


def compare(got: dict[str, np.ndarray], saved: dict[str, np.ndarray], what: str) -> list[str]:
    """The names compared; BenchError naming the first array of `saved` that `got` lacks or that differs
    in any bit (NaN equal to NaN)."""
    names = [k for k in got if k in saved]
    for k in sorted(set(saved) & _comparable(saved)):
        if k not in got:
            raise BenchError(f"{what} gives no {k}, which the run saved")
    for k in names:
        a, b = np.asarray(got[k]), np.asarray(saved[k])
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=True):
            diff = (
                float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                if a.shape == b.shape
                else None
            )
            raise BenchError(
                f"{what} does not reproduce the run's {k} bit for bit "
                + (
                    f"(max abs difference {diff:.3g})"
                    if diff is not None
                    else f"(shape {a.shape} vs {b.shape})"
                )
            )
    return names


def _comparable(saved: dict[str, np.ndarray]) -> set[str]:
    return {
        k
        for k in saved
        if k.startswith("score__")
        or (k.endswith(("_mean", "_var")) and (k.startswith("id_") or k.startswith("ood_")))
    }


@dataclass
class ExportResult:
    """What `export` wrote: the file, its size in bytes, the arrays checked, the state's attributes and
    the nets the refit had to train (not in the model cache)."""

    path: Path
    size: int
    checked: list[str]
    attributes: list[str]
    trained: int


def _verify_run_folder(run_dir: Path) -> None:
    """The run folder's checksum manifest: a file changed after bench wrote it is named in one line."""
    from bench.run_folder import verify

    verify(run_dir)


def export(
    run_dir: str | Path, method: str, out: str | Path, seed: int | None = None, log=print
) -> ExportResult:
    """Refit `method` (seed `seed`, default the run's first) of a finished run, check it against the run's
    saved arrays, and write the artefact to `out` (module docstring). BenchError, one line, on any failure."""
    from bench.run_folder import RunFolder

    run = RunFolder(run_dir)
    _verify_run_folder(run.path)
    require(
        method in run.methods,
        f"{run.path} has no results of method {method!r}; it has {', '.join(run.methods)}",
    )
    seed = run.seeds[0] if seed is None else int(seed)
    require(seed in run.seeds, f"{run.path} has no seed {seed}; it has {', '.join(map(str, run.seeds))}")
    saved = run.perquery(method, seed)
    require(
        saved is not None,
        f"{run.path}: the per-query arrays of {method} (seed {seed}) are missing or unreadable",
    )
    refit = _refit(run, method, seed, log)
    compare(refit.arrays, saved, f"the refit of {method} (seed {seed})")
    payload = _payload(run, refit)
    data_bytes = to_bytes(payload)
    inner = torch.load(io.BytesIO(_inner(data_bytes)), weights_only=True)
    loaded = method_from_payload(inner, "the artefact")
    with _threads(refit.threads), torch.random.fork_rng(devices=[]):
        again = prediction_arrays(loaded, refit.data, refit.cfg, refit.device)
    compare(again, saved, f"the exported {method} (seed {seed}), loaded back,")
    atomic_write_bytes(Path(out), data_bytes)
    return ExportResult(Path(out), len(data_bytes), sorted(refit.arrays), sorted(refit.state), refit.trained)


@dataclass
class _Refit:
    """A method refitted as the run fitted it: its state right after the fit (the attributes predict
    read, of the method and of the objects inside it), the arrays its predictions gave, and what the
    refit ran on."""

    method: Method
    cfg: Any
    data: Any
    device: torch.device
    threads: int | None
    state: dict[str, Any]
    nested: dict[int, set[str]]  # id(object) -> its attributes predict read (objects inside the state)
    arrays: dict[str, np.ndarray]
    trained: int


def _refit(run, method: str, seed: int, log) -> _Refit:
    """Fit `method` for `seed` as the runner did (data, config, model cache, seeds, thread count) and
    predict every query set, recording which attributes predict reads; generators are rewound after."""
    from bench.environment import resolve_device
    from bench.features import prepare_benchmark
    from bench.model_cache import ModelCache
    from bench.parallel import WORKER_THREADS
    from bench.recipes import method_config
    from bench.registry import METHODS
    from bench.runner import fit_context
    from bench.timing import StageTimer

    cfg = _config_from_json(json.dumps(run.config)).replace(seed=seed, quiet=True)
    # the method's own config, as the runner made it: its recipe and, for recipe=tuned, the values its
    # search chose (recorded in the run's diagnostics; bench.tuning)
    tuning = ((run.meta.get("diagnostics") or {}).get(f"{method}-seed{seed}") or {}).get("tuning") or {}
    cfg = method_config(
        cfg, METHODS.get(method), tuning.get("values") if tuning.get("status") == "tuned" else None
    )
    device = resolve_device(cfg.device)
    if str(device) != str(run.meta.get("device", device)):
        log(f"warning: the run used {run.meta.get('device')}, this refit {device}: the check may fail")
    cache_root = run.path.parent / "cache"  # the runner's <out>/cache, beside the run folder
    data, _ = prepare_benchmark(cfg, device, cache_root)
    cache = ModelCache(cache_root / "models", cfg, data.train_id, device)
    threads = WORKER_THREADS if int(run.meta.get("workers") or 1) > 1 else None
    fitted = METHODS.get(method)(cfg)
    ctx = fit_context(cfg, data, device, cache, StageTimer(device), method, fitted.reuses_base_model, set())
    with _threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fitted.fit(ctx)
        snapshot = fitted.export_state()  # the values right after the fit (predict may reassign some)
        reachable = objects_in(snapshot)
        rewind = [(g, g.get_state()) for g in reachable if isinstance(g, torch.Generator)]
        watched = [fitted, *(o for o in reachable if o is not fitted and recordable(o))]
        with recording_reads(watched) as reads:
            arrays = prediction_arrays(fitted, data, cfg, device)
    for g, state in rewind:  # the artefact starts where the run's predictions started
        g.set_state(state)
    kept = {k: v for k, v in snapshot.items() if k in reads[id(fitted)]}
    nested = {i: names for i, names in reads.items() if i != id(fitted) and ALL_ATTRIBUTES not in names}
    return _Refit(fitted, cfg, data, device, threads, kept, nested, arrays, cache.trained)


def _payload(run, refit: _Refit) -> dict[str, Any]:
    """The artefact's payload (module docstring) of a checked refit."""
    cfg = refit.cfg
    try:
        tree = encode(refit.state, f"{refit.method.name}'s state", only=refit.nested)
    except StateError as e:
        raise BenchError(str(e)) from None
    return {
        "format": FORMAT,
        "version": VERSION,
        "method": refit.method.name,
        "seed": cfg.seed,
        "config": _config_json(cfg),
        "device": str(refit.device),
        "fitted": json.dumps(refit.method.diagnostics, default=str),
        "input": {
            "shape": list(refit.data.test_id.in_shape),
            "kind": "standardised frozen-trunk features" if cfg.freeze_backbone else "dataset inputs",
        },
        "source": {
            "run": str(run.path.resolve()),
            "config_digest": run.meta.get("config_digest"),
            "git_commit": run.meta.get("git_commit"),
            "bench_version": __version__,
            "torch_version": str(torch.__version__),
            "exported": datetime.now(timezone.utc).isoformat(),
        },
        "checked": sorted(refit.arrays),
        "state": tree,
    }


def _inner(file_bytes: bytes) -> bytes:
    outer = torch.load(io.BytesIO(file_bytes), weights_only=True)
    return outer["payload"].numpy().tobytes()


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to n within the block (as the run's worker processes had them)."""
    if n is None:
        with nullcontext():
            yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
