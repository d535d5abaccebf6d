"""Miniature fake trees in the official layouts of CUB-200-2011, Cars-196 (both layouts), SOP and a
CIFAR-10 ImageFolder / python-batches folder: a few tiny JPEGs each, for the loaders' tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (20, 24), colour=None) -> None:
    """A tiny RGB JPEG at path (random noise around `colour`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = rng.uniform(0, 255, 3) if colour is None else np.asarray(colour, dtype=float)
    img = np.clip(base[:, None, None] + rng.normal(0, 20, (3, *size)), 0, 255).astype(np.uint8)
    Image.fromarray(img.transpose(1, 2, 0)).save(path, quality=90)


def cub_tree(root: Path, classes: int = 200, per_class: int = 2, seed: int = 0) -> Path:
    """root/CUB_200_2011 with images.txt, image_class_labels.txt, classes.txt and images/; returns root."""
    rng = np.random.default_rng(seed)
    cub = root / "CUB_200_2011"
    images, labels, names = [], [], []
    i = 0
    for c in range(1, classes + 1):
        names.append(f"{c} {c:03d}.Bird_{c}")
        for k in range(per_class):
            i += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k}.jpg"
            write_jpeg(cub / "images" / rel, rng, colour=rng.uniform(0, 255, 3) if k == 0 else None)
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
    (cub / "images.txt").write_text("\n".join(images) + "\n")
    (cub / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (cub / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def _annotations(records: list[dict]) -> np.ndarray:
    """A MATLAB struct array (1 x N) of the given field dicts, as scipy.io.savemat writes one."""
    fields = list(records[0])
    arr = np.zeros((1, len(records)), dtype=[(f, object) for f in fields])
    for i, r in enumerate(records):
        for f in fields:
            arr[0, i][f] = r[f]
    return arr


def cars_tree(
    root: Path, layout: str = "annos", classes: int = 196, per_class: int = 2, seed: int = 0
) -> Path:
    """root with cars_annos.mat + car_ims/ ("annos") or devkit/*.mat + cars_train/, cars_test/ ("devkit")."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    names = np.array([f"Car model {c}" for c in range(1, classes + 1)], dtype=object)
    recs, train, test = [], [], []
    i = 0
    for c in range(1, classes + 1):
        for k in range(per_class):
            i += 1
            if layout == "annos":
                rel = f"car_ims/{i:06d}.jpg"
                write_jpeg(root / rel, rng)
                recs.append(
                    {
                        "relative_im_path": rel,
                        "bbox_x1": 1,
                        "bbox_y1": 1,
                        "bbox_x2": 10,
                        "bbox_y2": 10,
                        "class": c,
                        "test": k % 2,
                    }
                )
            else:
                folder, dest = ("cars_train", train) if k % 2 == 0 else ("cars_test", test)
                write_jpeg(root / folder / f"{i:05d}.jpg", rng)
                dest.append(
                    {
                        "bbox_x1": 1,
                        "bbox_y1": 1,
                        "bbox_x2": 10,
                        "bbox_y2": 10,
                        "class": c,
                        "fname": f"{i:05d}.jpg",
                    }
                )
    if layout == "annos":
        savemat(str(root / "cars_annos.mat"), {"annotations": _annotations(recs), "class_names": names[None]})
    else:
        (root / "devkit").mkdir(parents=True, exist_ok=True)
        savemat(str(root / "devkit" / "cars_train_annos.mat"), {"annotations": _annotations(train)})
        savemat(str(root / "devkit" / "cars_test_annos_withlabels.mat"), {"annotations": _annotations(test)})
        savemat(str(root / "devkit" / "cars_meta.mat"), {"class_names": names[None]})
    return root


def sop_tree(
    root: Path,
    train_classes: int = 11318,
    test_classes: int = 11316,
    used: int = 4,
    per_class: int = 2,
    seed: int = 0,
) -> Path:
    """root/Stanford_Online_Products with Ebay_train.txt / Ebay_test.txt whose class ids span the
    official ranges (1..11318 train, 11319..22634 test); only `used` classes per side have images."""
    rng = np.random.default_rng(seed)
    sop = root / "Stanford_Online_Products"
    ids = {
        "train": list(range(1, used + 1)) + [train_classes],
        "test": [train_classes + k for k in range(1, used + 1)] + [train_classes + test_classes],
    }
    i = 0
    for part, classes in ids.items():
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for k in range(per_class):
                i += 1
                rel = f"bicycle_final/{c}_{k}.JPG"
                write_jpeg(sop / rel, rng)
                lines.append(f"{i} {c} 1 {rel}")
        (sop / f"Ebay_{part}.txt").write_text("\n".join(lines) + "\n")
    return root


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_tree(root: Path, per_class: int = 3, seed: int = 0) -> Path:
    """An ImageFolder tree root/train/<class>/*.jpg, root/test/<class>/*.jpg of 32x32 images."""
    rng = np.random.default_rng(seed)
    for part in ("train", "test"):
        for c in CIFAR_CLASSES:
            for k in range(per_class):
                write_jpeg(root / part / c / f"{k:04d}.jpg", rng, size=(32, 32))
    return root


def cifar_batches(root: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """root/cifar-10-batches-py in the official pickle format (data [N, 3072] uint8, labels)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        blob = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": list(rng.integers(0, 10, per_batch)),
        }
        with open(d / name, "wb") as f:
            pickle.dump(blob, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES}, f)
    return root
