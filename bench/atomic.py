"""Atomic file writes: readers see the old file or the whole new one, never a part
(killed runs stay clean)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give results the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write text so that readers see the old file or the whole new one, never a part."""

    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic(path, w)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes atomically (images, archives)."""

    def w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(path, w)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_csv(path: Path, df: pd.DataFrame) -> None:
    _atomic(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.6g"))


def atomic_savez(path: Path, compressed: bool = True, **arrays: np.ndarray) -> None:
    """Arrays into one .npz (zip-compressed unless `compressed=False`: large image arrays load faster raw)."""

    def w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)

    _atomic(path, w)


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))
