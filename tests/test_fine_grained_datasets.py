"""The real fine-grained sets and their OOD sets: cub100 (CUB-200-2011's 100-species subset), cars_train
(Stanford Cars' training half, stored BGR), caltech101 and pacs / pacs_<style>.

Loaders are tested on fake trees of the exact shipped layouts (species-name folders without numbers,
renumbered files, comma tables; the Cars label file and swapped channels; class folders with a stray
non-image). Real-data contract tests run when the data is there (the CUB archive beside the project;
the snapshots under $BENCH_FINE_GRAINED_DIR, default /work/data) and skip with the loader's one line
when it is not. One small real-data run of cub100 goes end to end through the CLI.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.config import PRESETS, preset_config
from bench.data import far_ood_names, load_benchmark
from bench.errors import BenchError
from bench.registry import DATASETS
from datasets import cub100
from datasets.cub_official_classes import OFFICIAL_SPECIES, official_id
from tests.image_trees import write_jpeg

REAL_DIR = os.environ.get("BENCH_FINE_GRAINED_DIR", "/work/data")
# official ids 1, 4, 7, 10, 100, 101, 150, 200 (the subset's order is scrambled on purpose)
SPECIES = [
    "Brown_Pelican",
    "Black_footed_Albatross",
    "Common_Yellowthroat",
    "Groove_billed_Ani",
    "White_Pelican",
    "Parakeet_Auklet",
    "Sage_Thrasher",
    "Red_winged_Blackbird",
]


def _cfg(**kw):
    return preset_config("smoke").replace(**{"far_ood": (), "quiet": True, **kw})


def cub100_tree(root: Path, species: list[str] = SPECIES, per_class: int = 3, seed: int = 0) -> Path:
    """root/cub200-subset100 as the subset ships: "<id>, <name>" tables, ids 0..S-1 in the subset's
    own order, images/<species name>/NNNN.jpg renumbered per species, train_test_split.txt with 0
    marking training images (the subset's inverted flag)."""
    rng = np.random.default_rng(seed)
    d = root / "cub200-subset100"
    classes, images, labels, split = [], [], [], []
    i = 0
    for c, name in enumerate(species):
        classes.append(f"{c}, {name}")
        for k in range(per_class):
            rel = f"{name}/{k:04d}.jpg"
            write_jpeg(d / "images" / rel, rng)
            images.append(f"{i}, {rel}")
            labels.append(f"{i}, {c}")
            split.append(f"{i}, {int(k == per_class - 1)}")
            i += 1
    for fname, rows in (
        ("classes.txt", classes),
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
    ):
        (d / fname).write_text("\n".join(rows) + "\n")
    return root


def cars_snapshot_tree(root: Path, classes: int = 196, per_class: int = 2, seed: int = 0) -> Path:
    """root/cars_train as the snapshot extracts: cars_train/NNNNN.jpg (stored BGR: a pure-red car is
    written blue), train_perfect_preds.txt (line i: the class of image i) and cars_meta.mat."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    d = root / "cars_train"
    labels = [c for c in range(1, classes + 1) for _ in range(per_class)]
    order = rng.permutation(len(labels))  # classes interleaved, as in the real file
    for i, _ in enumerate(order, start=1):
        write_jpeg(d / "cars_train" / f"{i:05d}.jpg", rng, colour=(0, 0, 250))  # red, stored as BGR
    (d / "train_perfect_preds.txt").write_text("\n".join(str(labels[j]) for j in order) + "\n")
    savemat(
        str(d / "cars_meta.mat"),
        {"class_names": np.array([f"Car {c}" for c in range(1, classes + 1)], dtype=object)[None]},
    )
    return root


def folder_tree(
    root: Path, classes: list[str], per_class: int = 2, suffix: str = ".jpg", seed: int = 0
) -> None:
    rng = np.random.default_rng(seed)
    for c in classes:
        for k in range(per_class):
            write_jpeg(root / c / f"image_{k:04d}{suffix}", rng)


def caltech_tree(root: Path) -> Path:
    cats = root / "caltech101" / "101_ObjectCategories"
    folder_tree(cats, ["BACKGROUND_Google", "accordion", "car_side"])
    (cats / "BACKGROUND_Google" / "tmp").write_text("not an image")
    return root


def pacs_tree(root: Path) -> Path:
    for style in ("photo", "art_painting", "cartoon", "sketch"):
        folder_tree(
            root / "pacs" / "PACS" / style, ["dog", "horse"], suffix=".png" if style == "sketch" else ".jpg"
        )
    return root


def test_official_cub_table_is_the_release_order():
    assert len(OFFICIAL_SPECIES) == 200 and len(set(OFFICIAL_SPECIES)) == 200
    assert official_id("Black_footed_Albatross") == 1 and official_id("001.Black_footed_Albatross") == 1
    assert official_id("Geococcyx") == 110 and official_id("200.Common_Yellowthroat") == 200
    assert official_id("Not_a_bird") is None


def test_cub100_gets_official_ids_by_name_and_splits_by_them(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_CACHE", str(tmp_path / "cache"))
    root = cub100_tree(tmp_path)
    src = DATASETS.get("cub100")(_cfg(dataset="cub100", data_dir=str(root)))
    want = sorted(SPECIES, key=official_id)
    assert src.class_names == [f"{official_id(n):03d}.{n}" for n in want]
    assert src.class_names[:2] == ["001.Black_footed_Albatross", "004.Groove_billed_Ani"]
    assert src.label == "CUB-200-2011 (100-species subset, 227 px)" and src.seen_classes == 4
    # the first half by official id trains (1, 4, 7, 10), the rest (100, 101, 150, 200) are the test classes
    for x, y in ((src.train_x, src.train_y), (src.test_x, src.test_y)):
        for path, label in zip(x, y):
            assert Path(path).parent.name == want[label] and Path(path).is_file()
    assert sorted(set(src.train_y)) == [0, 1, 2, 3] and sorted(set(src.test_y)) == [4, 5, 6, 7]
    data = load_benchmark(
        _cfg(
            dataset="cub100",
            data_dir=str(root),
            protocol="zero_shot",
            image_size=16,
            data_workers=0,
            n_train=None,
            n_test=None,
        )
    )
    assert data.label == src.label and data.test_id.inputs(torch.arange(2)).shape == (2, 3, 16, 16)


def test_cub100_archive_is_extracted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_CACHE", str(tmp_path / "cache"))
    tree = cub100_tree(tmp_path / "t")
    archive = tmp_path / "cub200-subset100.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "cub200-subset100", arcname="cub200-subset100")
    first = DATASETS.get("cub100")(_cfg(dataset="cub100", data_dir=str(archive)))
    assert str(tmp_path / "cache" / "cub100") in first.train_x[0]
    assert not list((tmp_path / "cache" / "cub100").glob(".extract-*"))  # no half-extracted leftovers
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("archive extracted twice"))
    again = DATASETS.get("cub100")(_cfg(dataset="cub100", data_dir=str(tmp_path)))  # the folder holding it
    assert list(again.test_x) == list(first.test_x) and again.checksum == first.checksum


def test_cub100_rejects_inconsistent_tables_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_CACHE", str(tmp_path / "cache"))
    root = cub100_tree(tmp_path)
    labels = root / "cub200-subset100" / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("0, 0\n", "0, 1\n", 1))
    with pytest.raises(BenchError, match="disagrees") as e:
        DATASETS.get("cub100")(_cfg(dataset="cub100", data_dir=str(root)))
    assert "\n" not in str(e.value)
    other = cub100_tree(tmp_path / "o", species=["Black_footed_Albatross", "Dodo", "Gadwall", "Mallard"])
    with pytest.raises(BenchError, match="'Dodo'"):
        DATASETS.get("cub100")(_cfg(dataset="cub100", data_dir=str(other)))


def test_cars_train_labels_and_reversed_channels(tmp_path):
    root = cars_snapshot_tree(tmp_path)
    src = DATASETS.get("cars_train")(_cfg(dataset="cars_train", data_dir=str(root)))
    assert (
        src.label == "Cars196 (training half, 196 classes)" and src.swap_red_blue and src.seen_classes == 98
    )
    assert len(src.class_names) == 196 and src.class_names[0] == "Car 1"
    lines = (root / "cars_train" / "train_perfect_preds.txt").read_text().split()
    for x, y in ((src.train_x, src.train_y), (src.test_x, src.test_y)):
        for path, label in zip(x[:20], y[:20]):
            assert int(lines[int(Path(path).stem) - 1]) == label + 1  # line i is image i's 1-based class
    assert src.train_y.max() == 97 and src.test_y.min() == 98
    data = load_benchmark(
        _cfg(
            dataset="cars_train",
            data_dir=str(root),
            protocol="zero_shot",
            image_size=16,
            crop_fraction=1.0,
            data_workers=0,
            n_train=None,
            n_test=None,
        )
    )
    stored = np.asarray(Image.open(src.test_x[0]).convert("RGB"))
    assert stored[..., 2].mean() > 200 and stored[..., 0].mean() < 50  # blue as stored
    read = data.test_id.store.get(int(data.test_id.index[0])).float()
    assert read[0].mean() > 200 and read[2].mean() < 50  # red as read


def test_caltech101_and_pacs_class_folders(tmp_path):
    caltech_tree(tmp_path)
    pacs_tree(tmp_path)
    cal = DATASETS.get("caltech101")(_cfg(data_dir=str(tmp_path)))
    assert cal.class_names == ["BACKGROUND_Google", "accordion", "car_side"] and len(cal.test_x) == 6
    assert cal.ood_name == "caltech101" and not any(p.endswith("tmp") for p in cal.test_x)
    sketch = DATASETS.get("pacs_sketch")(_cfg(data_dir=str(tmp_path)))
    assert sketch.class_names == ["dog", "horse"] and len(sketch.test_x) == 4
    assert all("/sketch/" in p and p.endswith(".png") for p in sketch.test_x)
    every = DATASETS.get("pacs")(_cfg(data_dir=str(tmp_path)))
    assert len(every.test_x) == 16 and np.bincount(every.test_y).tolist() == [8, 8]
    assert DATASETS.get("pacs_photo")(_cfg(data_dir=str(tmp_path))).ood_name == "pacs_photo"


def test_default_ood_sets_are_the_other_fine_grained_set_and_caltech_pacs(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert far_ood_names(_cfg(dataset="cars_train", data_dir=str(empty), far_ood=None)) == (
        "mnist_ood",
        "fashion_ood",
    )
    d = cub100_tree(tmp_path / "data")
    cars_snapshot_tree(d)
    caltech_tree(d)
    pacs_tree(d)
    assert far_ood_names(_cfg(dataset="cub100", data_dir=str(d), far_ood=None)) == (
        "cars_train",
        "caltech101",
        "pacs_sketch",
    )
    assert far_ood_names(_cfg(dataset="cars_train", data_dir=str(d), far_ood=None)) == (
        "cub100",
        "caltech101",
        "pacs_sketch",
    )
    data = load_benchmark(
        _cfg(
            dataset="cub100",
            data_dir=str(d),
            protocol="zero_shot",
            image_size=16,
            data_workers=0,
            n_train=None,
            n_test=None,
            far_ood=None,
        )
    )
    assert set(data.test_ood) == {"cars_train", "caltech101", "pacs_sketch"}
    assert len(data.test_ood["cars_train"]) == 196  # the cars' unseen classes 99-196, two images each
    assert data.test_ood["cars_train"].store.swap_red_blue and not data.test_id.store.swap_red_blue


@pytest.mark.parametrize(
    "name,repo",
    [
        ("cars_train", "fmejbah/car_dataset1"),
        ("caltech101", "MachineLearning2020/Homework2-Caltech101"),
        ("pacs_sketch", "MachineLearning2020/Homework3-PACS"),
    ],
)
def test_missing_snapshot_says_where_the_images_come_from(tmp_path, name, repo):
    for data_dir in (None, str(tmp_path)):
        with pytest.raises(BenchError, match=repo) as e:
            DATASETS.get(name)(_cfg(data_dir=data_dir))
        msg = str(e.value)
        assert "\n" not in msg and "git --git-dir" in msg and "archive" in msg and "--data-dir DIR" in msg


def test_missing_cub100_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(cub100, "shared_archive", lambda name: None)
    for data_dir in (None, str(tmp_path)):
        with pytest.raises(BenchError, match="cub200-subset100") as e:
            DATASETS.get("cub100")(_cfg(dataset="cub100", data_dir=data_dir))
        assert "\n" not in str(e.value) and "--data-dir" in str(e.value)


def test_fine_grained_presets_are_zero_shot_frozen_and_labelled():
    for name, ds in (("cub100", "cub100"), ("cars_train", "cars_train")):
        cfg = preset_config(name)
        assert cfg.dataset == ds and cfg.protocol == "zero_shot" and cfg.freeze_backbone
        assert cfg.backbone == "efficientnet_lite0" and cfg.methods == ("all",)
        tune = preset_config(f"{name}_finetune")
        assert not tune.freeze_backbone and tune.augment and tune.protocol == "zero_shot"
    assert PRESETS["cub100"][0].startswith("CUB-200-2011 (100-species subset, 227 px)")
    assert PRESETS["cars_train"][0].startswith("Cars196 (training half, 196 classes)")


# ---- real data: run when present, skip with the loader's one line when not ----


def _real(name: str, data_dir: str | None = REAL_DIR):
    try:
        return DATASETS.get(name)(_cfg(dataset=name, data_dir=data_dir))
    except BenchError as e:
        pytest.skip(str(e))


def test_real_cub100_from_the_shipped_archive():
    src = _real("cub100", None)  # the archive beside the project
    ids = [official_id(n) for n in src.class_names]
    assert len(src.class_names) == 100 and ids == sorted(ids) and ids[0] == 1 and ids[-1] == 200
    assert len(src.train_x) + len(src.test_x) == 5902 and len(src.train_x) == 2949
    assert max(ids[:50]) < min(ids[50:])
    # the split flag: 0 marks ~30 images per species (2,999 in all), the official training share
    root = Path(src.train_x[0]).parents[2]
    flags = dict(r for r in cub100._pairs(root / "train_test_split.txt"))
    labels = dict(cub100._pairs(root / "image_class_labels.txt"))
    zeros = np.bincount([int(labels[i]) for i, f in flags.items() if f == "0"], minlength=100)
    assert zeros.sum() == 2999 and zeros.max() == 30 and zeros.min() >= 29
    with Image.open(src.test_x[0]) as img:
        assert img.size == (227, 227)


def test_real_cars_train():
    src = _real("cars_train")
    assert len(src.train_x) + len(src.test_x) == 8144 and len(src.class_names) == 196 and src.swap_red_blue
    assert src.class_names[0] == "AM General Hummer SUV 2000" and len(src.train_x) == 4052
    first = sorted(zip(src.train_x, src.train_y))[0]
    assert (
        first[0].endswith("00001.jpg") and src.class_names[first[1]] == "Audi TTS Coupe 2012"
    )  # official class 14


def test_real_cars_train_reads_red_ferraris():
    """The snapshot's red/blue swap, checked on the images themselves: Ferraris and Lamborghinis are
    overwhelmingly red, orange or yellow, so as read (channels reversed) strongly red pixels outnumber
    strongly blue ones; the stored files show the opposite (blue Ferraris: measured 16 of the first 24
    images blue-dominant, none red-dominant)."""
    from bench.images import ImageStore

    src = _real("cars_train")
    paths = np.array(list(src.train_x) + list(src.test_x))
    labels = np.concatenate([src.train_y, src.test_y])
    sports = [i for i, n in enumerate(src.class_names) if n.startswith(("Ferrari", "Lamborghini"))]
    pick = paths[np.isin(labels, sports)][:24]
    assert len(pick) == 24

    def red_minus_blue(store: ImageStore) -> np.ndarray:
        out = []
        for i in range(len(store)):
            r, g, b = store.get(i).int().reshape(3, -1)
            out.append(
                ((r > g + 60) & (r > b + 60)).float().mean() - ((b > g + 60) & (b > r + 60)).float().mean()
            )
        return np.array(out)

    read = red_minus_blue(ImageStore(pick, "ferraris", swap_red_blue=src.swap_red_blue))
    stored = red_minus_blue(ImageStore(pick, "ferraris-stored", swap_red_blue=False))
    assert (read > 0.01).sum() >= 12 and (read < -0.01).sum() == 0
    assert (stored < -0.01).sum() >= 12


@pytest.mark.parametrize(
    "name,n,classes", [("caltech101", 9144, 102), ("pacs", 9991, 7), ("pacs_sketch", 3929, 7)]
)
def test_real_ood_sets(name, n, classes):
    src = _real(name)
    assert len(src.test_x) == n and len(src.class_names) == classes


@pytest.mark.slow
def test_real_cub100_run_from_the_shipped_archive(cli, tmp_path):
    """CI: a small end-to-end run on the real CUB subset (the archive beside the project), frozen
    EfficientNet-Lite0 at 32 px, two methods, no OOD set; the run folder labels the data and keeps the
    raw-feature reference."""
    _real("cub100", None)
    out = tmp_path / "runs"
    sets = [
        "image_size=32",
        "n_train=120",
        "n_test=60",
        "far_ood=",
        "epochs=1",
        "bootstrap_resamples=20",
        "posterior_samples=5",
        "report=false",
        "score_samples=5",
        "data_workers=0",
        "quiet=true",
        "workers=1",
        "hessian_items=120",
    ]
    code, _, stderr = cli(
        "run",
        "--preset",
        "cub100",
        "--out",
        str(out),
        "--methods",
        "plain,diag_la",
        *[a for kv in sets for a in ("--set", kv)],
    )
    assert code == 0, stderr
    (folder,) = [p for p in out.iterdir() if p.is_dir() and p.name != "cache"]
    blob = json.dumps([json.loads(f.read_text()) for f in folder.rglob("*.json")])
    assert "CUB-200-2011 (100-species subset, 227 px)" in blob and "raw_features" in blob
