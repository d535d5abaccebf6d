"""The real fine-grained and OOD image sets that are read from snapshots of public GitHub
repositories (no package registry serves their images): where each one's snapshot is, the folder
it is extracted to under --data-dir, and the one line that says so when it is missing.

Extraction (never into this repository): `git --git-dir=<snapshot git dir> archive <commit> | tar -x -C
DIR/<folder>`, then `--data-dir DIR`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError


@dataclass(frozen=True)
class Snapshot:
    """A public repository at a commit whose files hold one image set; `folder` is where it goes
    under --data-dir, `marker` a path (file or folder) inside the extracted tree that identifies it."""

    repo: str
    commit: str
    folder: str
    marker: str

    def how(self, dataset: str) -> str:
        return (
            f"{dataset}: the images come from the public GitHub repository {self.repo} at commit "
            f"{self.commit[:12]}; extract it with `git --git-dir=<its git dir> archive {self.commit[:12]} "
            f"| tar -x -C DIR/{self.folder}` so that DIR/{self.folder}/{self.marker} exists, and pass "
            "--data-dir DIR"
        )


CARS_TRAIN = Snapshot(
    "fmejbah/car_dataset1",
    "2ac6920297f51277ac4e24afd231c46d35077831",
    "cars_train",
    "train_perfect_preds.txt",
)
CALTECH101 = Snapshot(
    "MachineLearning2020/Homework2-Caltech101",
    "836044dd000296b2bb74d0aa4b4e462e459b01d7",
    "caltech101",
    "101_ObjectCategories",
)
PACS = Snapshot(
    "MachineLearning2020/Homework3-PACS", "d586a6cf3db84896fb6cc465c7bf51bdaf6d65d8", "pacs", "PACS"
)


def find_snapshot(data_dir: str | None, dataset: str, snap: Snapshot) -> Path:
    """The extracted folder F (F/marker exists): --data-dir itself or its subfolder `snap.folder`;
    else a BenchError with the one line of `Snapshot.how` (plus what was searched)."""
    if data_dir is None:
        raise BenchError(f"{snap.how(dataset)} (no --data-dir given)")
    root = Path(data_dir)
    for d in (root / snap.folder, root):
        if (d / snap.marker).exists():
            return d
    raise BenchError(f"{snap.how(dataset)} (not found under {root})")


def snapshot_present(data_dir: str | None, snap: Snapshot) -> bool:
    """Whether find_snapshot would find the set (for defaults that use only what is there)."""
    if data_dir is None:
        return False
    root = Path(data_dir)
    return any((d / snap.marker).exists() for d in (root / snap.folder, root))
