"""Shard-set specs and the JSON index our writers put next to the shards.

A spec is an index JSON (``train.json``: shard names relative to it, per-shard counts, classes), a brace
or glob pattern (``/data/train-{000000..000099}.tar``, ``/data/train-*.tar``), or a list of paths. For
patterns and lists, counts come from any of our index files found beside the shards.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from flexdit_train.runtime.atomic import atomic_write

INDEX_FORMAT = "flexdit-wds-1"


@dataclass
class ShardSet:
    """Resolved shards: absolute ``urls``, optional per-shard ``counts`` and the index ``meta`` (if any)."""

    urls: list[str]
    counts: dict[str, int] | None = None
    meta: dict = field(default_factory=dict)

    def count(self, urls: list[str]) -> int:
        """Total samples in ``urls`` (counting tar members where no index is known)."""
        counts = self.counts or {}
        return sum(counts[u] if u in counts else count_samples(u) for u in urls)


def write_index(path: str | Path, shards: list[tuple[str, int]], **meta) -> dict:
    """Write ``path`` atomically: ``{"format", "shards": [{"url", "count"}], "total", **meta}``."""
    path = Path(path)
    index = {
        "format": INDEX_FORMAT,
        "shards": [{"url": os.path.relpath(url, path.parent), "count": count} for url, count in shards],
        "total": sum(count for _, count in shards),
        **meta,
    }
    text = json.dumps(index, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return index


def read_index(path: str | Path) -> ShardSet:
    """Load one of our index files."""
    path = Path(path)
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not a flexdit shard index: pass a shard pattern such as '/data/train-*.tar'")
    urls = [str((path.parent / s["url"]).resolve()) for s in index["shards"]]
    counts = {u: int(s["count"]) for u, s in zip(urls, index["shards"])}
    meta = {k: v for k, v in index.items() if k not in ("shards", "format")}
    return ShardSet(urls, counts, meta)


def _counts_beside(urls: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for folder in sorted({os.path.dirname(u) for u in urls}):
        for candidate in sorted(glob.glob(os.path.join(folder, "*.json"))):
            try:
                counts.update(read_index(candidate).counts or {})
            except (ValueError, KeyError, json.JSONDecodeError):
                continue  # not one of our index files
    return counts


def resolve_shards(spec: str | os.PathLike | list) -> ShardSet:
    """Expand an index file, pattern or list into a :class:`ShardSet` (errors name the fix)."""
    if isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".json"):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"shard index {spec} not found: write the shards with `python -m flexdit_train.shards`")
        return read_index(spec)
    if isinstance(spec, (str, os.PathLike)):
        if os.path.isdir(spec):
            raise ValueError(f"{spec} is a directory: pass its index JSON (e.g. {spec}/train.json) or a '*.tar' pattern")
        urls = []
        for pattern in wds.shardlists.expand_urls(str(spec)):
            urls.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
    else:
        urls = [str(u) for u in spec]
    urls = [os.path.abspath(u) for u in urls]
    missing = [u for u in urls if not os.path.exists(u)]
    if not urls or missing:
        raise FileNotFoundError(f"no shards match {spec!r} (missing: {missing[:3]}): check the path or write them first")
    counts = _counts_beside(urls)
    known = {u: counts[u] for u in urls if u in counts}
    return ShardSet(urls, known or None)


def count_samples(url: str) -> int:
    """Number of distinct sample keys in one tar (reads headers only)."""
    keys = set()
    with tarfile.open(url, "r") as tar:
        for member in tar:
            if member.isreg():
                keys.add(wds.tariterators.base_plus_ext(member.name)[0])
    keys.discard(None)
    return len(keys)
