"""A tiny synthetic colour image dataset for tests: 10 classes of 3x16x16 images, each class a
coloured square on a noisy background at a random position; far-OOD: colour noise images."""

from __future__ import annotations

import numpy as np

from bench.data import DataSource
from bench.registry import register_dataset

N_CLASSES, SIZE, SQUARE = 10, 16, 8


def _images(rng: np.random.Generator, y: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """uint8 [N, 3, SIZE, SIZE]: background noise around 40, the class colour in a random square."""
    n = len(y)
    x = rng.normal(40, 20, size=(n, 3, SIZE, SIZE))
    off = rng.integers(0, SIZE - SQUARE + 1, size=(n, 2))
    for i in range(n):
        r, c = off[i]
        x[i, :, r : r + SQUARE, c : c + SQUARE] = colours[y[i]][:, None, None] + rng.normal(
            0, 15, size=(3, SQUARE, SQUARE)
        )
    return np.clip(x, 0, 255).astype(np.uint8)


@register_dataset("synthetic_color", far_ood=("synthetic_color_noise",))
def load_synthetic_color(cfg) -> DataSource:
    """Ten classes of tiny colour images (3x16x16, a few hundred; for tests); far-OOD: colour noise."""
    rng = np.random.default_rng(2024)
    colours = rng.uniform(60, 255, size=(N_CLASSES, 3))
    n_train, n_test = int((cfg.n_train or 300) * 1.5), int((cfg.n_test or 150) * 1.5)
    y_train, y_test = rng.integers(0, N_CLASSES, n_train), rng.integers(0, N_CLASSES, n_test)
    train_x, test_x = _images(rng, y_train, colours), _images(rng, y_test, colours)
    return DataSource(
        "synthetic_color",
        train_x,
        y_train,
        test_x,
        y_test,
        [f"colour{i}" for i in range(N_CLASSES)],
        ((0.25,) * 3, (0.2,) * 3),
    )


@register_dataset("synthetic_color_noise")
def load_synthetic_color_noise(cfg) -> DataSource:
    """Uniform colour noise images 3x16x16 (far-OOD for `synthetic_color`; label -1)."""
    rng = np.random.default_rng(4242)
    n = cfg.n_test or 150
    x = rng.integers(0, 256, size=(2 * n, 3, SIZE, SIZE), dtype=np.uint8)
    y = np.full(2 * n, -1, dtype=np.int64)
    return DataSource(
        "synthetic_color_noise",
        x[:n],
        y[:n],
        x[n:],
        y[n:],
        ["noise"],
        ((0.5,) * 3, (0.29,) * 3),
        ood_name="noise",
    )
