"""Learning-rate schedules as ``_partial_`` Hydra targets: ``lr_scheduler(optimizer) -> LRScheduler``.

One schedule covers what the recipes need: a linear warmup, then either a constant LR (DiT's recipe), a
cosine decay that ends with the run (a run that must end converged in a fixed number of steps) or a linear
decay (EDT's recipe: 5e-4 down to 5e-5 over 400k steps). Chaining torch's ``LinearLR`` and
``CosineAnnealingLR`` through ``SequentialLR`` cannot be written as one Hydra node (every sub-scheduler needs
the optimizer). The factor is a picklable object, so ``LambdaLR`` resumes
from its step count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

DECAYS = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class WarmupDecay:
    """LR factor at step s: linear from ``start_factor`` to 1 over ``warmup_steps``; then 1 (``constant``) or
    a cosine (``cosine``) or a straight line (``linear``) from 1 down to ``final_factor`` at ``total_steps``,
    constant afterwards: a run continued past its schedule keeps the final LR instead of restarting the cycle.
    A run shorter than its warmup (a smoke test) only warms up."""

    warmup_steps: int = 0
    decay: str = "constant"
    total_steps: int | None = None
    final_factor: float = 0.0
    start_factor: float = 0.01

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"lr_scheduler.decay={self.decay!r} is not one of {DECAYS}")
        if self.warmup_steps < 0:
            raise ValueError(f"lr_scheduler.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay != "constant" and (self.total_steps is None or self.total_steps < 1):
            raise ValueError(
                f"a {self.decay} decay needs total_steps >= 1, got {self.total_steps}; set lr_scheduler.total_steps "
                "(default: trainer.max_steps)"
            )
        if not 0.0 <= self.final_factor <= 1.0 or not 0.0 < self.start_factor <= 1.0:
            raise ValueError(
                f"lr_scheduler.final_factor must lie in [0, 1] and start_factor in (0, 1], got "
                f"{self.final_factor} and {self.start_factor}"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        span = self.total_steps - self.warmup_steps
        progress = 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "linear":
            return 1.0 - (1.0 - self.final_factor) * progress
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_decay(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int = 0,
    decay: str = "constant",
    total_steps: int | None = None,
    final_factor: float = 0.0,
    start_factor: float = 0.01,
) -> LambdaLR:
    """Linear warmup, then a constant LR or a cosine / linear decay to ``final_factor`` x the base LR at ``total_steps``."""
    total = None if total_steps is None else int(total_steps)
    return LambdaLR(optimizer, WarmupDecay(int(warmup_steps), str(decay), total, float(final_factor),
                                           float(start_factor)))
