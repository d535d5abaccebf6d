"""CIFAR-10 (Krizhevsky 2009), 10 classes of 32x32 colour images, read offline, in this order from:
1. the official `cifar-10-batches-py` folder under --data-dir (torchvision's CIFAR10, download=False);
2. an ImageFolder tree under --data-dir: train/<class>/*.jpg|png, test/<class>/*;
3. the JPEG archive cifar10-jpeg.tar.gz: --data-dir naming it (or its folder), else ../shared/data
   beside the project (all 60,000 images re-encoded as JPEG: results are labelled "CIFAR-10 (JPEG)").
Trees and archives are decoded once into a uint8 array file in the user cache
(~/.cache/bench/cifar10/<source>-<checksum>.npz), never per run.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from bench.atomic import atomic_savez
from bench.data import DataSource
from bench.errors import BenchError
from bench.registry import register_dataset
from datasets.idx import user_cache_dir
from datasets.svhn import colour_far_ood

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ARCHIVE = "cifar10-jpeg.tar.gz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
HOW_TO_GET = (
    f"pass --data-dir DIR with DIR/cifar-10-batches-py (the official python release), an ImageFolder "
    f"tree DIR/train/<class>/*.jpg + DIR/test/<class>/*.jpg, or the archive {ARCHIVE} "
    "(or put it in ../shared/data beside the project)"
)


def shared_archive(name: str = ARCHIVE) -> Path | None:
    """../shared/data/<name> (default: cifar10-jpeg.tar.gz) beside the project (looked for above the
    project root too, so a git worktree nested below it finds the same shared folder)."""
    root = Path(__file__).resolve().parents[1]
    for parent in root.parents:
        cand = parent / "shared" / "data" / name
        if cand.is_file():
            return cand
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode(data: bytes) -> np.ndarray:
    """One image file's bytes as uint8 [3, H, W] (Pillow, RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)


def _arrays(items: list[tuple[str, int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, 32, 32], labels [N]) of (name, label, bytes) items in name order."""
    items.sort(key=lambda t: t[0])
    x = np.stack([_decode(b) for _, _, b in items])
    return x, np.array([lab for _, lab, _ in items], dtype=np.int64)


def _split_part(rel: str) -> tuple[str, int] | None:
    """('train'|'test', class index) of a path like [prefix/]train/<class>/<file>, else None."""
    parts = Path(rel).parts
    if len(parts) < 3 or not rel.lower().endswith(IMAGE_SUFFIXES):
        return None
    part, cls = parts[-3], parts[-2]
    if part not in ("train", "test") or cls not in CLASS_NAMES:
        return None
    return part, CLASS_NAMES.index(cls)


def decode_archive(path: Path) -> dict[str, np.ndarray]:
    """Every image of a tar.gz ImageFolder archive (train/<class>/*, test/<class>/*) as arrays."""
    items: dict[str, list] = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                got = _split_part(m.name) if m.isfile() else None
                if got is not None:
                    items[got[0]].append((m.name, got[1], tar.extractfile(m).read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BenchError(f"corrupt or unreadable archive {path}: {e}") from None
    return _finish(items, path)


def decode_tree(root: Path) -> dict[str, np.ndarray]:
    """Every image of an ImageFolder tree root/train/<class>/*, root/test/<class>/* as arrays."""
    items: dict[str, list] = {"train": [], "test": []}
    for f in sorted(root.glob("*/*/*")):
        got = _split_part(str(f.relative_to(root)))
        if got is not None:
            items[got[0]].append((str(f), got[1], f.read_bytes()))
    return _finish(items, root)


def _finish(items: dict[str, list], where: Path) -> dict[str, np.ndarray]:
    if not items["train"] or not items["test"]:
        raise BenchError(
            f"{where} has no train/<class>/ and test/<class>/ images of CIFAR-10's classes; {HOW_TO_GET}"
        )
    (trx, try_), (tex, tey) = _arrays(items["train"]), _arrays(items["test"])
    return {"train_x": trx, "train_y": try_, "test_x": tex, "test_y": tey}


def tree_checksum(root: Path, pattern: str = "*/*/*") -> str:
    """Names a file tree's content: a hash of every file's relative path, size and mtime."""
    h = hashlib.sha256()
    for f in sorted(root.glob(pattern)):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached_decode(kind: str, checksum: str, decode) -> dict[str, np.ndarray]:
    """The decoded arrays of a source, from the user cache (keyed by kind and checksum) or decoded
    now and cached (a read-only cache only costs the decoding next time)."""
    path = user_cache_dir() / "cifar10" / f"{kind}-{checksum[:16]}.npz"
    try:
        with np.load(path) as z:
            return {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except (OSError, ValueError, KeyError):
        pass
    arrs = decode()
    try:
        atomic_savez(path, compressed=False, **arrs)
    except OSError:
        pass
    return arrs


def _official(root: Path) -> dict[str, np.ndarray]:
    from torchvision.datasets import CIFAR10

    tr, te = CIFAR10(str(root), train=True, download=False), CIFAR10(str(root), train=False, download=False)
    return {
        "train_x": tr.data.transpose(0, 3, 1, 2).copy(),
        "train_y": np.asarray(tr.targets, dtype=np.int64),
        "test_x": te.data.transpose(0, 3, 1, 2).copy(),
        "test_y": np.asarray(te.targets, dtype=np.int64),
    }


def locate_cifar10(data_dir: str | None) -> tuple[str, str, callable]:
    """(label, checksum, loader) of the first CIFAR-10 source found (module docstring order)."""
    if data_dir is not None:
        p = Path(data_dir)
        if p.is_file():
            return (
                "CIFAR-10 (JPEG)",
                file_sha256(p),
                lambda: cached_decode("archive", file_sha256(p), lambda: decode_archive(p)),
            )
        if not p.is_dir():
            raise BenchError(f"data dir {p} does not exist; {HOW_TO_GET}")
        if (p / "cifar-10-batches-py" / "data_batch_1").is_file():
            return "CIFAR-10", tree_checksum(p / "cifar-10-batches-py", "*"), lambda: _official(p)
        if (p / "train").is_dir() and (p / "test").is_dir():
            cs = tree_checksum(p)
            return "CIFAR-10 (image folder)", cs, lambda: cached_decode("tree", cs, lambda: decode_tree(p))
        if (p / ARCHIVE).is_file():
            return locate_cifar10(str(p / ARCHIVE))
        raise BenchError(f"data dir {p} has no CIFAR-10; {HOW_TO_GET}")
    found = shared_archive()
    if found is None:
        raise BenchError(f"CIFAR-10 not found; {HOW_TO_GET}")
    return locate_cifar10(str(found))


def pixel_statistics(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N, C, H, W] in [0, 1], from each channel's histogram of
    the 256 levels: the sums are exact integers (a float64 copy of the 150M values took 4 s a load,
    this 0.2 s)."""
    import torch  # (lazy) its bincount takes uint8 as is: numpy's converts 50M values to int64 first

    levels = np.arange(256, dtype=np.float64)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    hist = torch.stack([torch.bincount(xt[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])])
    hist = hist.numpy().astype(np.float64)
    n = hist[0].sum()
    mean = (hist @ levels) / n / 255.0
    sq = (hist @ levels**2) / n / 255.0**2
    return tuple(float(m) for m in mean), tuple(float(s) for s in np.sqrt(sq - mean**2))


@register_dataset("cifar10", far_ood=colour_far_ood)
def load_cifar10(cfg) -> DataSource:
    """CIFAR-10 32x32 colour images (official release, an image tree, or the shared JPEG archive);
    far-OOD: SVHN when in --data-dir, else MNIST and Fashion-MNIST made 3x32x32."""
    label, checksum, load = locate_cifar10(cfg.data_dir)
    a = load()
    return DataSource(
        "cifar10",
        a["train_x"],
        a["train_y"],
        a["test_x"],
        a["test_y"],
        list(CLASS_NAMES),
        pixel_statistics(a["train_x"]),
        label=label,
        checksum=checksum,
    )
