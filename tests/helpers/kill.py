"""A callback that SIGKILLs its own training process once, for kill-and-resume tests."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L


class KillOnce(L.Callback):
    """SIGKILL this process at ``at_step`` unless ``marker`` exists (so the rerun of the same command survives).

    Lightning runs checkpoint callbacks after the others, so a checkpoint due at an earlier step is on
    disk by then; nothing gets a chance to clean up, as with a preempted or OOM-killed job.
    """

    def __init__(self, at_step: int, marker: str):
        self.at_step = at_step
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step and not self.marker.exists():
            self.marker.write_text(str(self.at_step))
            os.kill(os.getpid(), signal.SIGKILL)
