"""All-or-nothing file writes: checkpoints, exports, cards, tables, caches, shards and shard indexes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` fills a temp file next to ``path``, which :func:`publish` then moves over ``path``.

    The temp name keeps ``path``'s suffix, so writers that append one (``np.savez``) write where they are
    told; the temp file is removed when ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(str(tmp))
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a fully written ``tmp`` over ``path`` (same filesystem) after forcing its data to disk.

    Readers, and a job resumed after a kill or a crash, see the old file or the whole new one, never half
    of one: without the fsync a crash right after the rename could leave ``path`` renamed but empty.
    """
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
