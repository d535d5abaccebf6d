"""Shared fixtures: a smoke config on the synthetic dataset, and a CLI runner."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

from bench.cli import main  # noqa: E402
from bench.config import preset_config  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                                   reason="Debian package dataset-fashion-mnist not installed")


@pytest.fixture
def smoke_cfg(tmp_path):
    """Smoke preset on the synthetic dataset, writing under tmp_path."""
    return preset_config("smoke").replace(dataset="synthetic", out=str(tmp_path / "runs"), quiet=True, report=False)


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    def run(*args: str):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err
    return run
