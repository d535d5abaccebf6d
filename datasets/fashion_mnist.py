"""Fashion-MNIST (the seed's data), read offline from the Debian package, --data-dir or the cache;
far-OOD by default: MNIST digits."""

from __future__ import annotations

import socket
from pathlib import Path

from bench.data import DataSource
from bench.errors import BenchError
from bench.registry import register_dataset
from datasets.idx import find_idx_dir, load_idx_dir, network_up, user_cache_dir

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Mean and std of the Fashion-MNIST training pixels in [0, 1]; far-OOD images get the same scaling
# so they go through the network exactly as an unseen image would.
PIXEL_STATS = (0.2860, 0.3530)

HOW_TO_GET = (
    "install the Debian package (apt-get install -y dataset-fashion-mnist), "
    "or pass --data-dir DIR holding the four *-idx?-ubyte.gz files, "
    "or run once with internet access so torchvision can download them"
)


def _download(target: Path) -> Path | None:
    """torchvision download into target, only when the network answers; never hangs."""
    if not network_up():
        return None
    from torchvision.datasets import FashionMNIST

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise BenchError(f"Fashion-MNIST download failed ({e}); {HOW_TO_GET}") from None
    finally:
        socket.setdefaulttimeout(old)
    return find_idx_dir([target])


def locate_fashion_mnist(data_dir: str | None) -> Path:
    """Directory with the Fashion-MNIST IDX files: --data-dir, the Debian package, the cache,
    or a download."""
    if data_dir is not None:
        p = Path(data_dir)
        if not p.is_dir():
            raise BenchError(f"data dir {p} does not exist; {HOW_TO_GET}")
        found = find_idx_dir([p])
        if found is None:
            raise BenchError(
                f"data dir {p} has no Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...); {HOW_TO_GET}"
            )
        return found
    cache = user_cache_dir() / "fashion-mnist"
    found = find_idx_dir([DEBIAN_DIR, cache]) or _download(cache)
    if found is None:
        raise BenchError(f"Fashion-MNIST not found and no network; {HOW_TO_GET}")
    return found


@register_dataset("fashion_mnist", far_ood=("mnist_ood",))
def load_fashion_mnist(cfg) -> DataSource:
    """Fashion-MNIST 28x28 clothing images (10 classes); default far-OOD: MNIST digits."""
    arrs = load_idx_dir(locate_fashion_mnist(cfg.data_dir))
    return DataSource(
        "fashion_mnist",
        arrs["train_images"],
        arrs["train_labels"],
        arrs["test_images"],
        arrs["test_labels"],
        list(CLASS_NAMES),
        PIXEL_STATS,
    )


@register_dataset("fashion_ood")
def load_fashion_ood(cfg) -> DataSource:
    """Fashion-MNIST test images as a far-OOD set ("fashion"): from --data-dir when it holds them,
    else the Debian package or the cache (so a --data-dir meant for the ID dataset does not stop it)."""
    data_dir = cfg.data_dir if cfg.data_dir and find_idx_dir([Path(cfg.data_dir)]) else None
    src = load_fashion_mnist(cfg if data_dir == cfg.data_dir else cfg.replace(data_dir=None))
    src.name, src.ood_name = "fashion_ood", "fashion"
    return src
