"""A callback that counts lost training samples, stops a run whose data are mostly broken, and says so."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from flexdit_train.runtime.errors import UserError

COUNTS = ("samples", "met", "skipped")  # read; of the shards read to their end; lost (missing + undecodable)


class DataSkipMonitor(Callback):
    """Log ``data/samples``, ``data/skipped`` (samples lost) and ``data/skip_rate`` (their share of the samples
    of the shards read to their end), summed over ranks, every ``every_n_steps``.

    Raises a one-line error once at least ``min_samples`` were met and the rate exceeds ``max_skip_rate``;
    every rank decides on the same summed counts, so all ranks stop together instead of hanging. Totals
    travel in checkpoints, so a resumed run keeps counting where it stopped; the end of training prints one
    line with what was lost.
    """

    def __init__(self, every_n_steps: int = 50, max_skip_rate: float = 0.01, min_samples: int = 1000) -> None:
        if not 0.0 <= max_skip_rate <= 1.0:
            raise ValueError(f"max_skip_rate is a fraction in [0, 1], got {max_skip_rate}")
        self.every_n_steps = every_n_steps
        self.max_skip_rate = max_skip_rate
        self.min_samples = min_samples
        self.base = dict.fromkeys(COUNTS, 0)  # totals of earlier sessions of this run (from the checkpoint)
        self._trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def totals(self, trainer: Trainer, device: torch.device) -> tuple[dict[str, int], dict]:
        """Run totals summed over ranks (a collective: every rank must call it), and this rank's stats."""
        datamodule = trainer.datamodule
        stats = datamodule.skip_stats("train") if datamodule is not None and hasattr(datamodule, "skip_stats") else {}
        local = torch.tensor([int(stats.get(k, 0)) for k in COUNTS], dtype=torch.int64, device=device)
        summed = [int(v) for v in trainer.strategy.reduce(local, reduce_op="sum")]
        return {k: self.base[k] + v for k, v in zip(COUNTS, summed)}, stats

    @staticmethod
    def rate(totals: dict[str, int]) -> float:
        return min(1.0, totals["skipped"] / totals["met"]) if totals["met"] else 0.0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if (trainer.global_step % self.every_n_steps) and not trainer.is_last_batch:
            return
        if trainer.datamodule is None or not hasattr(trainer.datamodule, "skip_stats"):
            return
        totals, stats = self.totals(trainer, pl_module.device)
        rate = self.rate(totals)
        pl_module.log_dict(
            {"data/samples": float(totals["samples"]), "data/skipped": float(totals["skipped"]), "data/skip_rate": rate},
            on_step=True, on_epoch=False,
        )
        if totals["met"] >= self.min_samples and rate > self.max_skip_rate:
            worst = sorted(stats.get("per_shard", {}).items(), key=lambda kv: -kv[1])[:3]
            listing = "; ".join(f"{url} ({n} lost: {stats['errors'].get(url, '?')[:80]})" for url, n in worst)
            raise UserError(
                f"{rate:.1%} of the training samples were lost ({totals['skipped']} of "
                f"{totals['met']}), above max_skip_rate={self.max_skip_rate:.1%}; worst shards on "
                f"rank {trainer.global_rank}: {listing or 'none on this rank'}. Run `python -m flexdit_train.shards "
                "verify` on the set and rewrite or drop these shards, or raise callbacks.data_skips.max_skip_rate"
            )

    def state_dict(self) -> dict:
        # Called on every rank while a checkpoint is assembled, so the collective is safe here.
        trainer = self._trainer
        if trainer is None or trainer.datamodule is None or not hasattr(trainer.datamodule, "skip_stats"):
            return dict(self.base)
        totals, _ = self.totals(trainer, trainer.strategy.root_device)
        return totals

    def load_state_dict(self, state: dict) -> None:
        self.base = {k: int(state.get(k, 0)) for k in COUNTS}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.datamodule is None or not hasattr(trainer.datamodule, "skip_stats"):
            return
        totals, _ = self.totals(trainer, pl_module.device)
        if trainer.is_global_zero:
            lost = f"data: {totals['skipped']} of {totals['met']} samples read from the training shards lost"
            cause = ", missing from damaged shards or undecodable (per shard: the warnings above)"
            print(f"{lost} ({self.rate(totals):.2%}){cause if totals['skipped'] else ''}", flush=True)
