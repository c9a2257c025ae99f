"""Reference statistics for FID (and reference features for KID / precision-recall).

A reference spec is one of:
- an ADM-layout npz with ``mu``/``sigma`` (e.g. ``VIRTUAL_imagenet256_labeled.npz``): FID uses the stored
  statistics; its ``arr_0`` images, when present, give the features for KID and P/R;
- an npz of images (``arr_0`` uint8 NHWC), an image folder, or a shard set (index JSON or ``*.tar``
  pattern): statistics are computed once with the evaluation's extractor and cached;
- ``mnist:train`` / ``mnist:val``: the bundled MNIST split.

Computed references are cached as ``<cache_dir>/reference/<source hash>-<extractor key>-<variant>.npz``
(variant: crop size and channels for decoded folders and shards, ``native`` for arrays).
Single files are hashed by content; folders and shard sets by file names, sizes and mtimes, so a
lookup never rereads a terabyte of images.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flexdit_train.evaluation.features import Extractor, file_sha256, iter_features
from flexdit_train.evaluation.frechet import RunningStats
from flexdit_train.runtime.atomic import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MNIST_PREFIX = "mnist:"
MNIST_SPLITS = ("train", "val")


@dataclass
class Reference:
    """FID statistics of a reference set and, when it has images, a feature subset for KID and P/R."""

    source: str
    kind: str
    sha256: str
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    features: torch.Tensor | None  # (M, D) at the KID / P-R layer, or None for statistics-only files
    num_images: int | None  # images behind mu / sigma; None when a statistics file does not say
    stats_from_file: bool
    cache: str | None = None

    def card(self) -> dict:
        """The reference's entry in the eval card."""
        return {
            "source": self.source,
            "kind": self.kind,
            "sha256": self.sha256,
            "num_images": self.num_images,
            "statistics": "stored in the file" if self.stats_from_file else "computed",
            "num_features": None if self.features is None else len(self.features),
            "cache": self.cache,
        }


def reference_kind(spec: str) -> str:
    """Classify a reference spec without reading its images; a one-line error names the accepted forms."""
    spec = str(spec)
    if spec.startswith(MNIST_PREFIX):
        if spec[len(MNIST_PREFIX) :] not in MNIST_SPLITS:
            raise ValueError(f"unknown MNIST reference {spec!r}: use mnist:train or mnist:val")
        return "mnist"
    if spec.endswith(".json") or ".tar" in spec:
        return "shards"
    path = Path(spec).expanduser()
    if path.is_dir():
        return "image-folder"
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            if {"mu", "sigma"} <= set(data.files):
                return "npz-stats"
            if "arr_0" in data.files:
                return "npz-images"
        raise ValueError(f"{spec} holds neither mu/sigma nor arr_0 images: pass an ADM reference or sample npz")
    raise FileNotFoundError(
        f"reference {spec!r} not found: pass an ADM .npz (mu/sigma), an .npz of images, an image folder, "
        "a shard index .json / '*.tar' pattern, or mnist:train / mnist:val"
    )


def source_hash(spec: str, kind: str) -> str:
    """sha256 of a file's bytes, or of (name, size, mtime) for folders and shard sets."""
    digest = hashlib.sha256(kind.encode())
    if kind == "mnist":
        from importlib import resources

        from flexdit_train.data.mnist import MNIST_RESOURCE

        package, name = MNIST_RESOURCE
        digest.update(resources.files(package).joinpath(name).read_bytes())
        digest.update(spec.encode())
        return digest.hexdigest()
    if kind in ("npz-stats", "npz-images"):
        return file_sha256(spec)
    files = _image_files(Path(spec)) if kind == "image-folder" else [Path(u) for u in _shard_urls(spec)]
    if kind == "shards" and spec.endswith(".json"):
        digest.update(Path(spec).read_bytes())
    for path in files:
        st = path.stat()
        digest.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) under {folder}: check the reference path")
    return files


def _shard_urls(spec: str) -> list[str]:
    from flexdit_train.data.index import resolve_shards

    return resolve_shards(spec).urls


def iter_images(spec: str, kind: str, image_size: int, channels: int, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, C, H, W) batches of the reference images; folders and shards are ADM-cropped to ``image_size``."""
    mode = "L" if channels == 1 else "RGB"
    if kind in ("npz-stats", "npz-images", "mnist"):
        if kind == "mnist":
            from flexdit_train.evaluation.mnist_classifier import split_images

            images = split_images(spec[len(MNIST_PREFIX) :])[0]  # (N, 32, 32, 1)
        else:
            with np.load(spec) as data:
                images = data["arr_0"]  # (N, H, W, C) or (N, H, W)
        images = images[..., None] if images.ndim == 3 else images
        for start in range(0, len(images), batch_size):
            yield torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        return
    from flexdit_train.data.media import decode_image, image_bytes

    if kind == "image-folder":
        encoded = (path.read_bytes() for path in _image_files(Path(spec)))
    else:
        encoded = (image_bytes(sample) for sample in _strict_shard_samples(spec))
    batch: list[np.ndarray] = []
    for data in encoded:
        batch.append(decode_image(data, image_size, mode))  # (H, W, C)
        if len(batch) == batch_size:
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def _strict_shard_samples(spec: str) -> Iterator[dict]:
    """Every sample of the shards in order; a damaged or short shard is an error (a reference must be complete)."""
    from flexdit_train.data.index import resolve_shards
    from flexdit_train.data.stream import WorkerStats, read_shards

    shard_set, stats = resolve_shards(spec), WorkerStats()
    yield from read_shards([{"url": u} for u in shard_set.urls], stats, counts=shard_set.counts)
    if stats.skipped:
        url, message = next(iter(stats.errors.items()))
        raise ValueError(
            f"reference shard {url} is damaged ({message}): run `python -m flexdit_train.shards verify` and rewrite it"
        )


def _count_images(spec: str, kind: str) -> int:
    if kind == "mnist":
        from flexdit_train.evaluation.mnist_classifier import split_images

        return len(split_images(spec[len(MNIST_PREFIX) :])[1])
    if kind == "image-folder":
        return len(_image_files(Path(spec)))
    if kind == "shards":
        from flexdit_train.data.index import resolve_shards

        shard_set = resolve_shards(spec)
        return shard_set.count(shard_set.urls)
    # Read the length from the .npy header: loading a 10k-image ADM batch just to count it costs gigabytes.
    with zipfile.ZipFile(spec) as archive, archive.open("arr_0.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return header(f)[0][0]


def compute_reference(
    spec: str,
    kind: str,
    extractor: Extractor,
    *,
    image_size: int,
    channels: int,
    device: torch.device,
    batch_size: int,
    max_features: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor, int]:
    """Stream the images once: (mu, sigma) over all of them and the features of a seeded random subset."""
    total = _count_images(spec, kind)
    keep = np.sort(np.random.default_rng(seed).choice(total, size=min(total, max_features), replace=False))
    fid_layer, subset_layer = extractor.layer("fid"), extractor.layer("kid")
    stats, kept, seen = RunningStats(), [], 0
    batches = iter_images(spec, kind, image_size, channels, batch_size)
    for features in iter_features(extractor, batches, {fid_layer, subset_layer}, device):
        n = len(features[fid_layer])
        stats.update(features[fid_layer])
        rows = keep[(keep >= seen) & (keep < seen + n)] - seen
        kept.append(features[subset_layer][torch.from_numpy(rows)])
        seen += n
    mu, sigma = stats.statistics()
    return mu, sigma, torch.cat(kept), seen


def load_reference(
    spec: str,
    extractor: Extractor,
    *,
    cache_dir: str | os.PathLike,
    image_size: int,
    channels: int,
    device: torch.device,
    batch_size: int = 64,
    max_features: int = 10000,
    seed: int = 0,
) -> Reference:
    """The :class:`Reference` of ``spec`` for ``extractor``, from the file, the cache or computed (then cached)."""
    spec = str(spec)
    kind = reference_kind(spec)
    sha = source_hash(spec, kind)
    kwargs = dict(image_size=image_size, channels=channels, device=device, batch_size=batch_size,
                  max_features=max_features, seed=seed)
    if kind == "npz-stats":
        with np.load(spec) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            has_images = "arr_0" in data.files
        features, cache = None, None
        if has_images:
            # ADM's stored statistics win for FID; its reference batch only feeds KID and P/R.
            _, _, features, _, cache = _cached(spec, "npz-images", sha, extractor, kwargs, cache_dir)
        return Reference(spec, kind, sha, mu, sigma, features, None, True, cache)
    mu, sigma, features, count, cache = _cached(spec, kind, sha, extractor, kwargs, cache_dir)
    return Reference(spec, kind, sha, mu, sigma, features, count, False, cache)


def _cached(spec: str, kind: str, sha: str, extractor: Extractor, kwargs: dict, cache_dir) -> tuple:
    """(mu, sigma, features, count, cache path) from the cache, computing and writing it on a miss."""
    # Only decoded folders and shards depend on the crop size and colour mode; arrays are used as stored.
    variant = f"{kwargs['image_size']}px-c{kwargs['channels']}" if kind in ("image-folder", "shards") else "native"
    path = Path(cache_dir) / "reference" / f"{sha[:24]}-{extractor.key}-{variant}.npz"
    if path.exists():
        with np.load(path) as data:
            return data["mu"], data["sigma"], torch.from_numpy(data["features"]), int(data["count"]), str(path)
    mu, sigma, features, count = compute_reference(spec, kind, extractor, **kwargs)
    atomic_write(path, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma, features=features.numpy(), count=count,
                                            source=spec))
    return mu, sigma, features, count, str(path)
