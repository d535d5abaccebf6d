"""Export and load of fitted methods (bench/export.py, bench/state_codec.py): every registered method
exports from a smoke run and its loaded artefact reproduces the run's saved predictions and scores bit
for bit; damaged, truncated, other-version and unsafe files fail with one line; the docs' example runs."""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bench
from bench.cli import main
from bench.config import preset_config
from bench.data import load_benchmark
from bench.errors import BenchError
from bench.export import FORMAT, VERSION, read_payload, to_bytes
from bench.registry import METHODS
from bench.run_folder import RunFolder
from bench.runner import run
from bench.state_codec import StateError, decode, encode

DOCS = Path(__file__).resolve().parents[1] / "docs" / "export.md"
FAST = {
    "plain",
    "diag_la",
    "mc_dropout",
    "deep_ensemble",
    "pfe",
}  # the rest: marked slow (a few seconds each)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A finished smoke run of every registered method on the synthetic data, and its data."""
    cfg = preset_config("smoke").replace(
        dataset="synthetic",
        quiet=True,
        report=False,
        workers=1,
        methods=("all",),
        out=str(tmp_path_factory.mktemp("runs")),
    )
    return run(cfg, log=lambda *a, **k: None), load_benchmark(cfg)


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    """method -> artefact path, exported on first use."""
    out, paths = tmp_path_factory.mktemp("artefacts"), {}

    def get(name: str) -> Path:
        if name not in paths:
            paths[name] = bench.export.export(
                smoke_run[0], name, out / f"{name}.pt", log=lambda *a: None
            ).path
        return paths[name]

    return get


def _params(names):
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _params(METHODS.names()))
def test_every_method_exports_and_reproduces_the_run(name, smoke_run, exported):
    run_dir, data = smoke_run
    saved = RunFolder(run_dir).perquery(name, 0)
    fitted = bench.load(exported(name))
    assert (fitted.name, fitted.seed) == (name, 0)
    emb = fitted.embed(data.test_id.x)
    assert np.array_equal(emb.mean.numpy(), saved["id_mean"])
    assert ("id_var" in saved) == (emb.var is not None)
    if emb.var is not None:
        assert np.array_equal(emb.var.numpy(), saved["id_var"])
        assert np.array_equal(emb.scores["trace"], saved["score__id__trace"])
    ood, ood_split = next(iter(data.test_ood.items()))  # scored against the ID test set, as the run did
    hits = fitted.retrieve(ood_split.x, data.test_id.x, k=3, gallery_labels=data.test_id.y)
    assert hits.index.shape == hits.distance.shape == hits.labels.shape == (len(ood_split), 3)
    assert torch.equal(hits.labels, data.test_id.y[hits.index])
    expected = {k.split("__")[2]: v for k, v in saved.items() if k.startswith(f"score__{ood}__")}
    assert set(hits.scores) == set(expected)
    for score, u in expected.items():
        assert np.array_equal(hits.scores[score], u), score


def test_export_keeps_only_what_predict_reads(exported):
    state = decode(read_payload(exported("diag_la"))["state"])
    assert {"model", "posterior", "_sample_gen", "_samples"} <= set(state)
    assert "_curvature" not in state and "_family" not in state and "diagnostics" not in state
    # full_la: the posterior's factor (D x D) is kept, the curvature H it was built from (D x D) is not
    path = exported("full_la")
    d = json.loads(read_payload(path)["fitted"])["D"]
    assert d * d * 4 < path.stat().st_size < 1.5 * d * d * 4


def test_export_refuses_a_run_whose_saved_predictions_it_cannot_reproduce(smoke_run, tmp_path):
    import shutil

    run_dir = tmp_path / "runs" / Path(smoke_run[0]).name
    shutil.copytree(smoke_run[0], run_dir)
    shutil.copytree(Path(smoke_run[0]).parent / "cache", tmp_path / "runs" / "cache")
    f = run_dir / "perquery" / "plain-seed0.npz"
    arrays = dict(np.load(f))
    arrays["id_mean"][3, 1] = np.nextafter(arrays["id_mean"][3, 1], np.inf)  # one ulp
    np.savez_compressed(f, **arrays)
    with pytest.raises(BenchError, match="(id_mean|changed|damaged|manifest)"):
        bench.export.export(run_dir, "plain", tmp_path / "plain.pt", log=lambda *a: None)
    assert not (tmp_path / "plain.pt").exists()


def test_cli_export_and_inspect(smoke_run, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["export", str(smoke_run[0]), "--method", "plain", "--out", str(out)]) == 0
    assert "reproduced bit for bit" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    assert "plain (seed 0)" in capsys.readouterr().out
    assert main(["export", str(smoke_run[0]), "--method", "nope", "--out", str(out)]) == 2
    assert "has no results of method 'nope'" in capsys.readouterr().err


# -- damaged files --------------------------------------------------------------------------------------


@pytest.fixture
def good(exported) -> bytes:
    return exported("plain").read_bytes()


def _one_line_error(path: Path, capsys, match: str) -> None:
    with pytest.raises(BenchError, match=match):
        bench.load(path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def test_truncated_file_is_one_line(good, tmp_path, capsys):
    (tmp_path / "t.pt").write_bytes(good[: len(good) // 2])
    _one_line_error(tmp_path / "t.pt", capsys, "damaged|not a bench artefact")


def test_flipped_byte_is_caught_by_the_checksum(good, tmp_path, capsys):
    outer = torch.load(io.BytesIO(good), weights_only=True)
    outer["payload"][len(outer["payload"]) // 2] ^= 0x01
    torch.save(outer, tmp_path / "c.pt")
    _one_line_error(tmp_path / "c.pt", capsys, "checksum does not match")


def test_other_version_is_one_line(good, tmp_path, capsys):
    outer = torch.load(io.BytesIO(good), weights_only=True)
    torch.save({**outer, "version": VERSION + 1}, tmp_path / "v.pt")
    _one_line_error(tmp_path / "v.pt", capsys, f"format version {VERSION + 1}.*reads version {VERSION}")


def test_not_an_artefact_is_one_line(tmp_path, capsys):
    (tmp_path / "x.pt").write_text("hello")
    _one_line_error(tmp_path / "x.pt", capsys, "not a bench artefact")
    torch.save({"a": torch.zeros(2)}, tmp_path / "y.pt")
    _one_line_error(tmp_path / "y.pt", capsys, "not a bench fitted-method artefact")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": FORMAT, "version": VERSION, "payload": Evil()}, tmp_path / "e.pt")
    with pytest.raises(BenchError, match="not a bench artefact or is damaged"):
        bench.load(tmp_path / "e.pt")


def test_references_outside_the_allowlist_are_refused(good, tmp_path):
    payload = read_payload_bytes(good)
    for ref in (
        "os:system",
        "bench.atomic:os.system",
        "builtins:eval",
        "torch:load",
        "bench.export:dataclass",
    ):
        payload["state"] = {"$": "dict", "id": None, "items": [["f", {"$": "function", "ref": ref}]]}
        (tmp_path / "r.pt").write_bytes(to_bytes(payload))
        with pytest.raises(
            BenchError, match="allowed packages|not a class or function defined there|does not have"
        ):
            bench.load(tmp_path / "r.pt")


def read_payload_bytes(data: bytes) -> dict:
    outer = torch.load(io.BytesIO(data), weights_only=True)
    return torch.load(io.BytesIO(outer["payload"].numpy().tobytes()), weights_only=True)


# -- the codec --------------------------------------------------------------------------------------------


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(encode(obj), buf)
    buf.seek(0)
    return decode(torch.load(buf, weights_only=True))


def test_codec_keeps_sharing_parameters_generators_and_modules():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    g = torch.Generator().manual_seed(7)
    torch.randn(3, generator=g)  # advance it: the state, not the seed, must travel
    t = torch.arange(6.0)
    state = {
        "net": net,
        "again": net,
        "gen": g,
        "view": t[2:4],
        "base": t,
        "pair": (1, "a", None),
        "size": torch.Size([2, 3]),
        "dtype": torch.float64,
        "dev": torch.device("cpu"),
        "np": np.float64(0.5),
    }
    back = _roundtrip(state)
    assert back["again"] is back["net"] and isinstance(back["net"][0].weight, nn.Parameter)
    x = torch.randn(5, 3)
    assert torch.equal(back["net"](x), net(x)) and back["net"].training is False
    assert torch.equal(torch.randn(4, generator=back["gen"]), torch.randn(4, generator=g))
    back["base"][2] = 100.0
    assert back["view"][0] == 100.0  # views still share their base's storage
    assert back["pair"] == (1, "a", None) and back["size"] == torch.Size([2, 3])
    assert back["dtype"] is torch.float64 and back["np"] == np.float64(0.5) and type(back["np"]) is np.float64


def test_codec_refuses_lambdas_and_foreign_classes_in_one_line():
    with pytest.raises(StateError, match=r"state.f: .*lambda"):
        encode({"f": lambda x: x})
    with pytest.raises(StateError, match="not from an allowed package"):
        encode({"ns": argparse.Namespace(a=1)})
    with pytest.raises(StateError, match="state.p: a pathlib.PosixPath is not a tensor"):
        encode({"p": Path("x")})


# -- the documented example -----------------------------------------------------------------------------


def test_docs_example_runs(exported, smoke_run, monkeypatch):
    """The first python block of docs/export.md runs as written, with its file and inputs provided; the
    README shows the same three lines."""
    text = DOCS.read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) == 3, "the README shows three lines"
    readme = (DOCS.parents[1] / "README.md").read_text()
    shown = re.search(r"```python\n(import bench\n.*?)```", readme, re.S).group(1)
    assert [ln for ln in shown.splitlines() if ln.strip()] == lines, "README and docs/export.md differ"
    data = smoke_run[1]
    monkeypatch.chdir(exported("diag_la").parent)
    Path("diag_la.pt").exists() or Path("diag_la.pt").symlink_to(exported("diag_la"))
    ns = {"queries": data.test_ood["noise"].x, "gallery": data.test_id.x}
    exec(compile(block, str(DOCS), "exec"), ns)
    hits = ns["hits"]
    assert hits.index.shape == (len(data.test_ood["noise"]), 5) and "top1_flip" in hits.scores
