"""CUB-200-2011, a 100-species subset (5,902 images at 227 x 227, re-encoded JPEG): the shipped
archive ../shared/data/cub200-subset100.tar.gz (a copy of the public repository serizba/vision @
16a8a47e, folder ex03/task2/bird_dataset), extracted, with the layout

    cub200-subset100/classes.txt              "<id 0-99>, <species name>"
    cub200-subset100/images.txt               "<image id>, <species name>/<NNNN>.jpg"
    cub200-subset100/image_class_labels.txt   "<image id>, <id 0-99>"
    cub200-subset100/images/<species name>/NNNN.jpg

Found at, in this order: --data-dir naming the extracted folder, a folder holding it
(DIR/cub200-subset100/), the archive, or a folder holding the archive; without --data-dir, the archive
beside the project (../shared/data, as CIFAR-10's), extracted once into the user cache
(~/.cache/bench/cub100/<checksum>/).

Species get their official class ids by name (`datasets.cub_official_classes`): folder
"Black_footed_Albatross" is the official 001. Zero-shot split by that id, as the standard split of the
full set (official classes 1-100 train, 101-200 test) does: the 50 species with the lowest official
ids train (001-089), the other 50 (090-200) are the test classes. The subset's train_test_split.txt is
not used: its flag is inverted against the official file (0 marks the ~30 training images per species,
2,999 in all; the official file marks training images with 1); see docs/fine-grained.md.
Results are labelled "CUB-200-2011 (100-species subset, 227 px)": not comparable to full-CUB figures.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from bench.data import DataSource
from bench.errors import BenchError
from bench.registry import register_dataset
from datasets._files import zero_shot_source
from datasets.cifar10 import file_sha256, shared_archive, tree_checksum
from datasets.cub_official_classes import official_id
from datasets.fine_grained_ood import NEAR_OOD, fine_grained_far_ood
from datasets.idx import user_cache_dir

ARCHIVE = "cub200-subset100.tar.gz"
FOLDER = "cub200-subset100"
LABEL = "CUB-200-2011 (100-species subset, 227 px)"
SEEN_SPECIES = 50
HOW = (
    f"cub100: pass --data-dir DIR with DIR/{FOLDER}/ (extract {ARCHIVE} there: tar -xzf {ARCHIVE} -C DIR) "
    f"or the archive itself, or put {ARCHIVE} in ../shared/data beside the project"
)


def _is_subset(d: Path) -> bool:
    return (d / "images.txt").is_file() and (d / "classes.txt").is_file() and (d / "images").is_dir()


def extract_once(archive: Path) -> Path:
    """The archive's cub200-subset100/ folder, extracted into the user cache under the archive's
    checksum: once, atomically (into a temporary folder, then renamed), so a killed extraction
    never leaves a half tree that a later run trusts."""
    dest = user_cache_dir() / "cub100" / file_sha256(archive)[:16]
    if _is_subset(dest / FOLDER):
        return dest / FOLDER
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp, filter="data")
        if not _is_subset(tmp / FOLDER):
            raise BenchError(f"{archive} holds no {FOLDER}/ with classes.txt, images.txt and images/; {HOW}")
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first: its tree is as good as ours
            if not _is_subset(dest / FOLDER):
                raise
    except (tarfile.TarError, EOFError) as e:
        raise BenchError(f"corrupt or unreadable archive {archive}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / FOLDER


def locate_cub100(data_dir: str | None) -> tuple[Path, str]:
    """(extracted folder, content checksum) of the first source found (module docstring order)."""
    if data_dir is None:
        found = shared_archive(ARCHIVE)
        if found is None:
            raise BenchError(f"{HOW} (no --data-dir given and no archive beside the project)")
        return extract_once(found), file_sha256(found)
    p = Path(data_dir)
    if p.is_file():
        return extract_once(p), file_sha256(p)
    for d in (p, p / FOLDER):
        if _is_subset(d):
            return d, tree_checksum(d, "images/*/*")
    if (p / ARCHIVE).is_file():
        return locate_cub100(str(p / ARCHIVE))
    raise BenchError(f"{HOW} (not found under {p})")


def _pairs(path: Path) -> list[tuple[str, str]]:
    """Rows "<a>, <b>" of one of the subset's tables (a short row is a BenchError)."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        a, sep, b = line.partition(",")
        if not sep or not b.strip():
            raise BenchError(f"{path}:{n}: expected '<id>, <value>', got {line!r}")
        rows.append((a.strip(), b.strip()))
    return rows


def read_subset(root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(image paths relative to root/images, 1-based class ids in official order, class names
    "NNN.<species>"): the subset's species numbered 1..S by their official CUB id."""
    species = dict(_pairs(root / "classes.txt"))
    official = {}
    for name in species.values():
        oid = official_id(name)
        if oid is None:
            raise BenchError(
                f"cub100: species {name!r} of {root / 'classes.txt'} is not one of CUB-200-2011's 200"
            )
        official[name] = oid
    order = sorted(official, key=official.get)
    rank = {name: i + 1 for i, name in enumerate(order)}
    labels = dict(_pairs(root / "image_class_labels.txt"))
    paths, ids = [], []
    for image_id, rel in sorted(_pairs(root / "images.txt"), key=lambda r: int(r[0])):
        name = rel.split("/", 1)[0]
        if name not in rank or species.get(labels.get(image_id, "")) != name:
            raise BenchError(
                f"cub100: image {image_id} ({rel}) disagrees with classes.txt/image_class_labels.txt"
            )
        paths.append(rel)
        ids.append(rank[name])
    names = [f"{official[n]:03d}.{n}" for n in order]
    return paths, np.array(ids, dtype=np.int64), names


def cub100_present(data_dir: str | None) -> bool:
    """Whether the CUB subset can be found (under `data_dir`, or the archive beside the project)."""
    try:
        locate_cub100(data_dir)
    except BenchError:
        return False
    return True


@register_dataset("cub100", far_ood=fine_grained_far_ood("cub100"), near_ood=(NEAR_OOD["cub100"],))
def load_cub100(cfg) -> DataSource:
    """CUB-200-2011's 100-species subset (227 px); zero-shot: the 50 species of lowest official id
    train, the other 50 test; near-OOD cars_train, far-OOD Caltech-101 and PACS sketches when present."""
    root, checksum = locate_cub100(cfg.data_dir)
    paths, ids, names = read_subset(root)
    if len(names) < 4:
        raise BenchError(f"cub100: {root} holds {len(names)} species; the zero-shot split needs at least 4")
    seen = SEEN_SPECIES if len(names) == 2 * SEEN_SPECIES else len(names) // 2
    src = zero_shot_source("cub100", root / "images", paths, ids, seen, names, LABEL)
    src.checksum = checksum
    return src
