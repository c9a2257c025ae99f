"""A callback that logs skipped training samples and stops the run past a skip rate."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class DataSkipMonitor(Callback):
    """Log ``data/samples``, ``data/skipped`` and ``data/skip_rate`` (summed over ranks) every ``every_n_steps``.

    Raises once at least ``min_samples`` were read and the rate exceeds ``max_skip_rate``; every rank
    decides on the same summed counts, so all ranks stop together instead of hanging.
    """

    def __init__(self, every_n_steps: int = 50, max_skip_rate: float = 0.01, min_samples: int = 1000) -> None:
        if not 0.0 <= max_skip_rate <= 1.0:
            raise ValueError(f"max_skip_rate is a fraction in [0, 1], got {max_skip_rate}")
        self.every_n_steps = every_n_steps
        self.max_skip_rate = max_skip_rate
        self.min_samples = min_samples

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if (trainer.global_step % self.every_n_steps) and not trainer.is_last_batch:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "skip_stats"):
            return
        stats = datamodule.skip_stats("train")
        local = torch.tensor([stats["samples"], stats["skipped"]], dtype=torch.int64, device=pl_module.device)
        samples, skipped = (int(v) for v in trainer.strategy.reduce(local, reduce_op="sum"))
        rate = skipped / (samples + skipped) if samples + skipped else 0.0
        pl_module.log_dict(
            {"data/samples": float(samples), "data/skipped": float(skipped), "data/skip_rate": rate},
            on_step=True, on_epoch=False,
        )
        if samples + skipped >= self.min_samples and rate > self.max_skip_rate:
            worst = sorted(stats["per_shard"].items(), key=lambda kv: -kv[1])[:5]
            listing = "; ".join(f"{url} ({n}x: {stats['errors'].get(url, '?')})" for url, n in worst) or "none on this rank"
            raise RuntimeError(
                f"data skip rate {rate:.2%} exceeds max_skip_rate={self.max_skip_rate:.2%} ({skipped} skipped, "
                f"{samples} read); worst shards on rank {trainer.global_rank}: {listing}. Run "
                "`python -m flexdit_train.shards verify` on the set and rewrite or drop these shards, "
                "or raise the callback's max_skip_rate"
            )
