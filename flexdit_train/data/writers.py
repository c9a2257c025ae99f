"""Shard writers for image folders/lists and videos: shuffled, unique keys, one index JSON per set.

Every writer goes through :func:`write_shards`: ``wds.ShardWriter`` writes ``OUT/{prefix}-%06d.tar``
(all members of a sample next to each other) and ``OUT/{prefix}.json`` records shards, counts, classes.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds

from flexdit_train.data.index import write_index
from flexdit_train.data.media import encode_mp4, read_frames, video_info

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def write_shards(
    samples: Iterable[dict], out_dir: str | Path, prefix: str, *, maxcount: int, maxsize: float, **meta
) -> dict:
    """Write ``samples`` as ``OUT/{prefix}-%06d.tar`` plus the index ``OUT/{prefix}.json``; return the index."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob(f"{prefix}-*.tar")):
        raise FileExistsError(f"{out_dir} already holds {prefix}-*.tar shards: pass an empty directory or another --prefix")
    written: list[tuple[str, int]] = []
    # an int mtime: byte-identical shards for identical inputs, and no PAX header per member (faster reads)
    writer = wds.ShardWriter(str(out_dir / f"{prefix}-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0)
    writer.post = lambda fname: written.append((fname, writer.count))
    with writer:
        for sample in samples:
            writer.write(sample)
    if sum(count for _, count in written) == 0:
        for fname, _ in written:
            os.remove(fname)
        raise ValueError(f"no samples to write for {prefix}: check the source")
    return write_index(out_dir / f"{prefix}.json", written, prefix=prefix, **meta)


def read_classes(path: str | Path) -> list[str]:
    """Class names from an index JSON (its ``classes``) or a text file with one name per line."""
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        classes = json.loads(text).get("classes")
        if not classes:
            raise ValueError(f"{path} records no classes: pass a text file with one class name per line")
        return classes
    return [line.strip() for line in text.splitlines() if line.strip()]


def label_ids(labels: list[str], classes: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Ids of ``labels``: by position in ``classes`` when given, else ints as given or names sorted."""
    if classes is not None:
        lookup = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(labels) - set(lookup))
        if unknown:
            raise ValueError(f"labels {unknown[:3]} are not in the given classes: pass the class list of the train set")
        return [lookup[label] for label in labels], list(classes)
    if all(label.lstrip("-").isdigit() for label in labels):
        ids = [int(label) for label in labels]
        if min(ids) < 0:
            raise ValueError("integer labels must be >= 0")
        return ids, [str(i) for i in range(max(ids) + 1)]
    classes = sorted(set(labels))
    lookup = {name: i for i, name in enumerate(classes)}
    return [lookup[label] for label in labels], classes


def read_list(path: str | Path) -> list[dict]:
    """Rows of a CSV/TSV list with a header naming ``path`` and ``label`` and/or ``caption``."""
    path = Path(path)
    with path.open(newline="") as fh:
        header = fh.readline()
        fh.seek(0)
        rows = list(csv.DictReader(fh, delimiter="\t" if "\t" in header else ","))
    if not rows or "path" not in rows[0]:
        raise ValueError(f"{path} needs a header row with a 'path' column and 'label' and/or 'caption' columns")
    for row in rows:
        row["path"] = str((path.parent / row["path"]).resolve())
    return rows


def scan_folders(src: Path, suffixes: Iterable[str]) -> list[dict]:
    """``SRC/<class>/**/<file>`` rows (class-per-folder, like the ImageNet train tree), sorted."""
    suffixes = tuple(suffixes)
    rows = [
        {"path": str(path), "label": folder.name}
        for folder in sorted(p for p in src.iterdir() if p.is_dir())
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in suffixes
    ]
    if not rows:
        raise ValueError(f"no {'/'.join(suffixes)} files under {src}/<class>/: pass a class-per-folder tree or a list file")
    return rows


def collect(
    src: str | Path, suffixes: Iterable[str], classes: str | Path | None = None
) -> tuple[list[dict], list[str] | None]:
    """Rows with ``path``, optional int ``cls`` and ``caption`` from a folder tree or a list file; and classes.

    ``classes`` (an index JSON or a names file) fixes the name -> id mapping, e.g. val with train's ids.
    """
    src = Path(src)
    rows = scan_folders(src, suffixes) if src.is_dir() else read_list(src)
    labels = [row.get("label") for row in rows]
    names = read_classes(classes) if classes is not None else None
    classes = None
    if any(label not in (None, "") for label in labels):
        if any(label in (None, "") for label in labels):
            raise ValueError(f"some rows of {src} have no label: label every file or drop the 'label' column")
        ids, classes = label_ids([str(label) for label in labels], names)
        for row, cls in zip(rows, ids):
            row["cls"] = cls
    return rows, classes


def shuffled(rows: list[dict], seed: int) -> list[dict]:
    """A seeded permutation, so shards are class-mixed and the same on every run."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def image_samples(rows: list[dict], prefix: str, root: Path) -> Iterator[dict]:
    """Original image bytes (no re-encoding) + ``cls`` and/or ``txt`` caption + a small ``json`` with the source path."""
    for i, row in enumerate(rows):
        path = Path(row["path"])
        sample = {"__key__": f"{prefix}-{i:08d}", IMAGE_SUFFIXES[path.suffix.lower()]: path.read_bytes()}
        sample["json"] = {"path": os.path.relpath(path, root)}
        if "cls" in row:
            sample["cls"] = row["cls"]
        if row.get("caption"):
            sample["txt"] = row["caption"]
        yield sample


def write_image_shards(
    src: str | Path,
    out: str | Path,
    *,
    prefix: str = "train",
    maxcount: int = 1000,
    maxsize: float = 1e9,
    seed: int = 0,
    classes: str | Path | None = None,
) -> dict:
    """Image folder tree or list file (``path,label`` and/or ``caption``) -> shuffled image shards; returns the index."""
    rows, classes = collect(src, IMAGE_SUFFIXES, classes)
    unknown = [row["path"] for row in rows if Path(row["path"]).suffix.lower() not in IMAGE_SUFFIXES]
    if unknown:
        raise ValueError(f"unsupported image files such as {unknown[0]}: use {'/'.join(IMAGE_SUFFIXES)}")
    root = Path(src) if Path(src).is_dir() else Path(src).parent
    samples = image_samples(shuffled(rows, seed), prefix, root)
    meta = {"kind": "image", "classes": classes, "num_classes": len(classes) if classes else None}
    return write_shards(samples, out, prefix, maxcount=maxcount, maxsize=maxsize, **meta)


def video_samples(
    rows: list[dict], prefix: str, root: Path, frame_stride: int, max_frames: int | None, size: int | None
) -> Iterator[dict]:
    """mp4 bytes (copied, or subsampled/resized and re-encoded) + ``cls``/``txt`` + ``json`` metadata."""
    for i, row in enumerate(rows):
        path = Path(row["path"])
        data = path.read_bytes()
        info = {"path": os.path.relpath(path, root)}
        if frame_stride > 1 or max_frames or size or path.suffix.lower() != ".mp4":
            total, height, width, fps = video_info(data)
            shape = None
            if size:  # short side to ``size``, both sides even for yuv420p
                scale = size / min(height, width)
                shape = (round(height * scale / 2) * 2, round(width * scale / 2) * 2)
            frames = read_frames(data, list(range(0, total, frame_stride))[:max_frames], shape)  # (F, H, W, 3)
            data = encode_mp4(frames, fps / frame_stride)
            info.update(frames=len(frames), fps=fps / frame_stride, height=frames.shape[1], width=frames.shape[2])
        sample = {"__key__": f"{prefix}-{i:08d}", "mp4": data, "json": info}
        if "cls" in row:
            sample["cls"] = row["cls"]
        if row.get("caption"):
            sample["txt"] = row["caption"]
        yield sample


def write_video_shards(
    src: str | Path,
    out: str | Path,
    *,
    prefix: str = "train",
    maxcount: int = 100,
    maxsize: float = 1e9,
    seed: int = 0,
    frame_stride: int = 1,
    max_frames: int | None = None,
    size: int | None = None,
    classes: str | Path | None = None,
) -> dict:
    """Video folder tree or list file (``path,label`` / ``path,caption``) -> shuffled mp4 shards."""
    rows, classes = collect(src, VIDEO_SUFFIXES, classes)
    if classes is None and not any(row.get("caption") for row in rows):
        raise ValueError(f"{src} gives neither labels nor captions: use class folders or a 'label'/'caption' column")
    root = Path(src) if Path(src).is_dir() else Path(src).parent
    samples = video_samples(shuffled(rows, seed), prefix, root, frame_stride, max_frames, size)
    meta = {"kind": "video", "classes": classes, "num_classes": len(classes) if classes else None}
    return write_shards(samples, out, prefix, maxcount=maxcount, maxsize=maxsize, **meta)
