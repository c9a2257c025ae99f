"""Atomic checkpoint writes and ``resume=auto`` (run names that survive requeues: ``resolvers.py``).

Checkpoints are written through :func:`~flexdit_train.runtime.atomic.atomic_write`, so a job killed
mid-write never leaves a truncated ``.ckpt`` behind; the resume resolver still validates every candidate
and picks the one with the highest global step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from flexdit_train.runtime.atomic import atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose writes are all-or-nothing (temp file + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a Lightning checkpoint, or None when it cannot be read (truncated, foreign)."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # any unreadable file is simply not a resume candidate
        log.warning("skipping unreadable checkpoint %s (%s)", path, err)
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if isinstance(step, int) and "state_dict" in ckpt else None


def checkpoint_meta(path: Path) -> dict:
    """The ``flexdit`` block of one of our Lightning checkpoints ({} when absent or unreadable)."""
    try:
        meta = torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("flexdit")
    except Exception:  # unreadable files are reported by checkpoint_step's callers
        return {}
    return meta if isinstance(meta, dict) else {}


def find_resume_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The valid checkpoint with the highest global step (newest file on ties).

    Looks in ``checkpoint_dir`` and, for Lightning's SLURM signal checkpoints (``hpc_ckpt_<n>.ckpt``,
    written into the run directory on preemption), in its parent.
    """
    directory = Path(checkpoint_dir)
    paths = [*directory.glob("*.ckpt"), *directory.parent.glob("hpc_ckpt_*.ckpt")]
    candidates = []
    for path in paths:
        if path.is_symlink() or not path.is_file():
            continue  # `last.ckpt` links point at a file that is also listed
        step = checkpoint_step(path)
        if step is not None:
            candidates.append((step, path.stat().st_mtime, path))
    return max(candidates)[2] if candidates else None


def resolve_ckpt_path(ckpt_path: str | None, resume: str | bool, checkpoint_dir: str | Path) -> str | None:
    """An explicit ``ckpt_path`` wins; ``resume=auto`` resumes from this run's newest valid checkpoint."""
    if ckpt_path:
        if not Path(ckpt_path).exists():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; fix the path or drop ckpt_path")
        return str(ckpt_path)
    if resume not in ("auto", True, False, None, "never"):
        raise ValueError(f"resume={resume!r}: use resume=auto (find this run's newest checkpoint) or resume=never")
    if resume in ("auto", True):
        found = find_resume_checkpoint(checkpoint_dir)
        if found is not None:
            log.info("resuming from %s", found)
            return str(found)
    return None
