"""Classifier-free guidance as a plain model callable, so the samplers stay guidance-agnostic."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flexdit_train.diffusion.gaussian_diffusion import ModelFn


def cfg_model_fn(
    model: nn.Module, cfg_scale: float, null_label: int | None = None, guide_all_channels: bool | None = None
) -> ModelFn:
    """Wrap a DiT's ``forward_with_cfg`` into ``fn(x, t, y, **kwargs) -> (N, C_out, ...)``.

    Follows the DiT recipe (batch doubled, labels ``[y, null]``) but hides the doubling: the caller
    samples N items with N generators. ``null_label`` defaults to ``model.null_class``; by default
    the arch decides the guided channels (a DiT: the first 3, as in the official sampler).
    """
    null = model.null_class if null_label is None else null_label

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        n = x.shape[0]
        x_in = torch.cat([x, x], dim=0)  # (2N, C, ...)
        t_in = torch.cat([t, t], dim=0)  # (2N,)
        y_in = torch.cat([y, torch.full_like(y, null)], dim=0)  # (2N,)
        out = model.forward_with_cfg(
            x_in, t_in, y_in, cfg_scale, guide_all_channels=guide_all_channels, **kwargs
        )  # (2N, C_out, ...), both halves carry the guided eps
        # The first half is the conditional branch: its variance channels are the conditional ones.
        return out[:n]

    return guided
