"""What a training run prints: a progress bar in steps, and no warnings that are expected and harmless.

Every silenced message is named here with the reason it does not apply, so a real problem is never hidden
among them and a new one still shows.
"""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import RichProgressBar

# (message regex, why it is expected in this project)
EXPECTED_WARNINGS = (
    # The EMA copy and a distillation teacher live inside the LightningModule and stay in eval mode on purpose
    # (label dropout off); Lightning counts their submodules.
    (r"Found \d+ module\(s\) in eval mode at the start of training", "frozen EMA / teacher networks"),
    # Data modules offer a fixed val loader for the `evaluate`-style jobs; training objectives have no
    # validation_step and the trainer configs set limit_val_batches=0.
    (r"You passed in a `val_dataloader` but have no `validation_step`", "evaluation runs as its own job"),
    # Raised inside Lightning's own pytree helper on torch >= 2.10; nothing this project calls.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "inside Lightning, fixed upstream"),
)


class _DropLitLoggerTip(logging.Filter):
    """Lightning advertises a hosted logger on every run without one; this project logs to CSV / W&B."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def silence_expected_warnings() -> None:
    """Filter the messages in :data:`EXPECTED_WARNINGS` and Lightning's litlogger tip (idempotent)."""
    for pattern, _ in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLitLoggerTip) for f in logger.filters):
        logger.addFilter(_DropLitLoggerTip())


class StepProgressBar(RichProgressBar):
    """Rich progress bar over the run's optimisation steps (``global_step`` of ``max_steps``).

    Runs here are set by ``trainer.max_steps``; an epoch is only how often the data stream is reseeded, and
    with ``max_epochs=-1`` Lightning's own bar would read "Epoch 0/-2" and restart every epoch. One task for the
    whole run, which a resumed run continues from its step.
    """

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps is not None and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "train steps"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.is_disabled:
            return
        if self.progress is not None and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
            self._update(self.train_progress_bar_id, trainer.global_step)
        self.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
