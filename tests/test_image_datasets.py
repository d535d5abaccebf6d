"""Loaders of the colour datasets: CIFAR-10 from the shared JPEG archive (decoded once into the
cache), an ImageFolder tree and the official batches; CUB-200-2011, Cars-196 (both layouts) and SOP
on miniature fake trees of their official layouts; SVHN / MNIST / Fashion as colour far-OOD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.config import preset_config
from bench.data import conform_images, load_benchmark
from bench.errors import BenchError
from bench.registry import DATASETS
from datasets import cifar10
from tests.conftest import needs_fashion
from tests.image_trees import cars_tree, cifar_batches, cifar_tree, cub_tree, sop_tree

ARCHIVE = cifar10.shared_archive()
needs_archive = pytest.mark.skipif(ARCHIVE is None, reason="../shared/data/cifar10-jpeg.tar.gz not found")


def _cfg(**kw):
    return preset_config("smoke").replace(**{"far_ood": (), "quiet": True, **kw})


@pytest.mark.slow
@needs_archive
def test_cifar10_from_the_shared_archive_is_decoded_once_and_labelled_jpeg(monkeypatch):
    src = DATASETS.get("cifar10")(_cfg(dataset="cifar10"))  # decodes into the session's data cache (conftest)
    assert src.label == "CIFAR-10 (JPEG)" and src.class_names[0] == "airplane"
    assert src.train_x.shape == (50000, 3, 32, 32) and src.test_x.shape == (10000, 3, 32, 32)
    assert src.train_x.dtype == np.uint8 and np.bincount(src.train_y).tolist() == [5000] * 10
    assert np.bincount(src.test_y).tolist() == [1000] * 10
    # against an independent decode of one archived file (PIL)
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(ARCHIVE) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg") and "/test/" in f"/{m.name}")
        img = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")).transpose(
            2, 0, 1
        )
    cls = cifar10.CLASS_NAMES.index(member.name.split("/")[-2])
    same_class = src.test_x[src.test_y == cls]
    assert any(np.array_equal(img, x) for x in same_class), "an archived test image decodes under its label"
    mean, std = src.pixel_stats
    assert len(mean) == 3 and all(0.4 < m < 0.5 for m in mean) and all(0.2 < s < 0.3 for s in std)

    # a second load reads the cached array file, never the archive
    monkeypatch.setattr(cifar10, "decode_archive", lambda p: pytest.fail("archive decoded twice"))
    again = DATASETS.get("cifar10")(_cfg(dataset="cifar10"))
    assert np.array_equal(again.test_x, src.test_x)


def test_cifar10_image_folder_tree_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_CACHE", str(tmp_path / "cache"))
    root = cifar_tree(tmp_path / "tree")
    src = DATASETS.get("cifar10")(_cfg(dataset="cifar10", data_dir=str(root)))
    assert src.train_x.shape == (30, 3, 32, 32) and src.label == "CIFAR-10 (image folder)"
    assert sorted(set(src.train_y.tolist())) == list(range(10))
    assert list((tmp_path / "cache" / "cifar10").glob("tree-*.npz"))
    monkeypatch.setattr(cifar10, "decode_tree", lambda p: pytest.fail("tree decoded twice"))
    DATASETS.get("cifar10")(_cfg(dataset="cifar10", data_dir=str(root)))


def test_cifar10_official_batches_come_first(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # fake files cannot match the md5s
    root = cifar_batches(tmp_path)
    cifar_tree(tmp_path)  # also an image tree: the official folder wins
    src = DATASETS.get("cifar10")(_cfg(dataset="cifar10", data_dir=str(root)))
    assert (
        src.label == "CIFAR-10"
        and src.train_x.shape == (100, 3, 32, 32)
        and src.test_x.shape == (20, 3, 32, 32)
    )


def test_cifar10_missing_data_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="cifar-10-batches-py") as e:
        DATASETS.get("cifar10")(_cfg(dataset="cifar10", data_dir=str(tmp_path / "empty")))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name,make,seen,n_classes",
    [
        ("cub200", cub_tree, 100, 200),
        ("cars196", lambda r: cars_tree(r, "annos"), 98, 196),
        ("cars196", lambda r: cars_tree(r, "devkit"), 98, 196),
        ("sop", sop_tree, 11318, 22634),
    ],
)
def test_file_datasets_on_fake_official_trees(tmp_path, name, make, seen, n_classes):
    root = make(tmp_path)
    src = DATASETS.get(name)(_cfg(dataset=name, data_dir=str(root)))
    assert len(src.class_names) == n_classes and src.seen_classes == seen and src.split_by_class
    assert src.train_y.max() == seen - 1 and src.test_y.min() == seen  # the standard zero-shot split
    assert src.test_y.max() == n_classes - 1
    assert src.train_x.dtype.kind == "U" and all(map(lambda p: p.endswith((".jpg", ".JPG")), src.train_x))
    data = load_benchmark(
        _cfg(
            dataset=name,
            data_dir=str(root),
            protocol="zero_shot",
            image_size=16,
            data_workers=0,
            n_train=None,
            n_test=None,
        )
    )
    x = data.test_id.inputs(torch.arange(3))
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert set(data.test_ood) == set() and int(data.train_id.y.max()) < seen <= int(data.test_id.y.min())
    with pytest.raises(BenchError, match="protocol=zero_shot"):
        load_benchmark(_cfg(dataset=name, data_dir=str(root), image_size=16))


@pytest.mark.parametrize(
    "name,hint",
    [
        ("cub200", "CUB_200_2011/images.txt"),
        ("cars196", "cars_annos.mat"),
        ("sop", "Stanford_Online_Products/Ebay_train.txt"),
    ],
)
def test_missing_file_dataset_says_what_to_put_where(tmp_path, name, hint):
    for data_dir in (None, str(tmp_path)):
        with pytest.raises(BenchError, match=hint) as e:
            DATASETS.get(name)(_cfg(dataset=name, data_dir=data_dir))
        assert "\n" not in str(e.value) and "--data-dir" in str(e.value)


def test_file_images_need_an_input_size(tmp_path):
    root = cub_tree(tmp_path, classes=200, per_class=1)
    with pytest.raises(BenchError, match="image_size"):
        load_benchmark(_cfg(dataset="cub200", data_dir=str(root), protocol="zero_shot"))


def test_conform_images_replicates_channels_and_resizes():
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4) * 7
    same = conform_images(grey, (3, 4, 4))
    assert same.shape == (2, 3, 4, 4) and all(np.array_equal(same[:, c], grey) for c in range(3))
    big = conform_images(grey, (3, 8, 8))
    from torchvision.transforms.v2 import functional as TF

    ref = TF.resize(torch.from_numpy(grey[:, None]), [8, 8], antialias=True).numpy()
    assert big.shape == (2, 3, 8, 8) and np.array_equal(big[:, 1:2], ref)
    colour = np.stack([np.full((2, 2), v, dtype=np.uint8) for v in (10, 20, 40)])[None]
    assert conform_images(colour, (1, 2, 2)).tolist() == [[[[23, 23], [23, 23]]]]


@needs_fashion
def test_grey_far_ood_sets_are_conformed_to_colour_images():
    cfg = _cfg(dataset="synthetic_color", far_ood=("mnist_ood", "fashion_ood"), n_test=40)
    data = load_benchmark(cfg)
    assert data.test_ood["mnist"].in_shape == (3, 16, 16) == data.test_ood["fashion"].in_shape
    x = data.test_ood["mnist"].x
    # grey replicated to three channels, then standardised per channel: each channel is the same picture
    # up to a positive affine map (a zeroed, shifted or shuffled channel breaks that)
    flat = x.transpose(0, 1).reshape(3, -1).double()
    design = torch.stack([flat[0], torch.ones_like(flat[0])], 1)
    assert flat[0].std() > 0.1
    for c in (1, 2):
        slope, shift = torch.linalg.lstsq(design, flat[c, :, None]).solution[:, 0]
        assert slope > 0.1 and torch.allclose(slope * flat[0] + shift, flat[c], atol=1e-4), c
    lazy = load_benchmark(cfg.replace(image_size=24, data_workers=0))
    assert lazy.test_ood["fashion"].inputs(torch.arange(2)).shape == (2, 3, 24, 24)
    with pytest.raises(BenchError, match="inputs of shape"):
        load_benchmark(_cfg(dataset="synthetic", far_ood=("mnist_ood",)))  # images vs feature vectors


def test_colour_far_ood_default_is_svhn_when_present(tmp_path):
    from datasets.svhn import colour_far_ood

    assert colour_far_ood(_cfg(dataset="cifar10")) == ("mnist_ood", "fashion_ood")
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"")
    assert colour_far_ood(_cfg(dataset="cifar10", data_dir=str(tmp_path))) == ("svhn",)
    with pytest.raises(BenchError, match="test_32x32.mat"):
        DATASETS.get("svhn")(_cfg(dataset="cifar10"))


def test_svhn_reads_torchvision_mat(tmp_path, monkeypatch):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    import torchvision.datasets.svhn as tv_svhn

    monkeypatch.setattr(tv_svhn, "check_integrity", lambda *a, **k: True)  # a fake file cannot match the md5
    X = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)  # SVHN stores [H, W, C, N], digit 0 as label 10
    savemat(str(tmp_path / "test_32x32.mat"), {"X": X, "y": np.array([[10], [1], [2], [3], [4]])})
    src = DATASETS.get("svhn")(_cfg(dataset="cifar10", data_dir=str(tmp_path)))
    assert src.test_x.shape == (5, 3, 32, 32) and src.test_y.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(src.test_x[1], X[..., 1].transpose(2, 0, 1))


def test_pixel_statistics_equal_float64_moments_exactly():
    """The histogram route gives the same floats as the float64 moments of every pixel (both sums exact)."""
    x = np.random.default_rng(0).integers(0, 256, size=(64, 3, 9, 7), dtype=np.uint8)
    v = x.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64) / 255.0
    mean, std = cifar10.pixel_statistics(x)
    np.testing.assert_allclose(mean, v.mean(1), rtol=1e-14)
    np.testing.assert_allclose(std, v.std(1), rtol=1e-12)
