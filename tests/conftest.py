"""Shared fixtures: a private data cache per session, a smoke config on the synthetic dataset, a CLI
runner, and the `--device` option (cpu by default; e.g. `pytest --device cuda`) of the tests that fit
methods (`tests.fit_helpers.run_device`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

from bench.cli import main  # noqa: E402
from bench.config import preset_config  # noqa: E402
from bench.environment import resolve_device  # noqa: E402
from bench.errors import BenchError  # noqa: E402
from tests.fit_helpers import DEVICE_ENV  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="device of the tests that fit and predict methods: cpu (default), cuda or cuda:N",
    )


def pytest_configure(config):
    """Resolve --device once (a missing CUDA stops the run with one line) and hand it to the tests."""
    try:
        os.environ[DEVICE_ENV] = str(resolve_device(config.getoption("--device")))
    except BenchError as e:
        raise pytest.UsageError(str(e)) from None


@pytest.fixture(scope="session", autouse=True)
def private_data_cache(tmp_path_factory):
    """Datasets decoded or downloaded by the tests (CIFAR-10 from the shared archive, MNIST) go to a
    folder of this test session, never into the user's cache (`$BENCH_DATA_CACHE`, else ~/.cache/bench).
    Set in os.environ so worker processes (the grid's forkserver, Ray) inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))
        yield


@pytest.fixture
def smoke_cfg(tmp_path):
    """Smoke preset on the synthetic dataset, writing under tmp_path."""
    return preset_config("smoke").replace(
        dataset="synthetic", out=str(tmp_path / "runs"), quiet=True, report=False
    )


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
