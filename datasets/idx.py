"""Reading and locating MNIST-format (IDX, gzip) files, with clear errors for missing or corrupt data."""

from __future__ import annotations

import gzip
import os
import socket
import zlib
from pathlib import Path

import numpy as np

from bench.errors import BenchError

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(path: Path) -> np.ndarray:
    """Parse one gzip IDX file into a uint8 array; a truncated or corrupt file is a BenchError."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise BenchError(f"corrupt or truncated data file {path}: {e}") from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise BenchError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    need = int(np.prod(dims))
    if len(raw) - offset != need:
        raise BenchError(f"truncated data file {path}: expected {need} values, found {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def find_idx_dir(candidates: list[Path]) -> Path | None:
    """First directory among candidates (or their <X>/raw subfolders) holding all four IDX files."""
    for c in candidates:
        for d in (c, *sorted(c.glob("*/raw"))) if c.is_dir() else ():
            if all((d / f).is_file() for f in FILES.values()):
                return d
    return None


def load_idx_dir(d: Path) -> dict[str, np.ndarray]:
    """All four arrays of an IDX directory, checked for matching lengths."""
    arrs = {k: read_idx(d / f) for k, f in FILES.items()}
    for part in ("train", "test"):
        if len(arrs[f"{part}_images"]) != len(arrs[f"{part}_labels"]):
            raise BenchError(f"{d}: {part} images and labels differ in length")
    return arrs


def network_up(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to host opens within timeout (so a download will not hang)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def user_cache_dir() -> Path:
    """Where downloaded data is kept: $BENCH_DATA_CACHE or ~/.cache/bench."""
    return Path(os.environ.get("BENCH_DATA_CACHE", Path.home() / ".cache" / "bench"))
