"""Flexible-patch models for every arch: :func:`flexify` and the classes it builds (see :mod:`.patches`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from flexdit_train.models.arch import arch_of
from flexdit_train.models.flex.patches import FlexDiT, FlexPatches, FlexTextDiT, FlexVideoDiT


def flexify(model: nn.Module, **options: Any) -> FlexPatches:
    """Make ``model`` (image, video or text DiT) run at more patch sizes: its arch's flexible class.

    ``options`` are :class:`FlexPatches`' (``patch_sizes``, ``mode``, ``lora_rank``, ``lora_alpha``,
    ``underlying_patch_size``, ``patch_size_norm``); unset ones take the arch's defaults: (2, 4), shared,
    rank 32 for the image DiT; native, 2x temporal and 2x spatial, shared, rank 64 for the video DiT;
    (2, 4), LoRA, rank 32 for the text DiT. The result adopts ``model``'s modules (deep-copy it first to
    keep an independent original).
    """
    return arch_of(model).flexible(model, **options)


__all__ = ["FlexDiT", "FlexPatches", "FlexTextDiT", "FlexVideoDiT", "flexify"]
