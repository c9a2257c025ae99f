"""A checkpoint IO that runs out of disk space in the middle of one checkpoint write, for survival tests."""

from __future__ import annotations

import errno

import torch

from flexdit_train.runtime.atomic import atomic_write
from flexdit_train.runtime.runs import AtomicCheckpointIO


class FullDiskAt(AtomicCheckpointIO):
    """Writes the checkpoint of ``at_step`` half-way, then fails as a full disk does (ENOSPC)."""

    def __init__(self, at_step: int):
        super().__init__()
        self.at_step = at_step

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if checkpoint.get("global_step") != self.at_step:
            return super().save_checkpoint(checkpoint, path, storage_options)

        def fill_then_fail(tmp: str) -> None:
            torch.save(checkpoint, tmp)
            with open(tmp, "r+b") as f:  # what a full disk leaves: a prefix of the file
                f.truncate(f.seek(0, 2) // 2)
            raise OSError(errno.ENOSPC, "No space left on device", tmp)

        atomic_write(path, fill_then_fail)
