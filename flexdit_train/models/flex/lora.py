"""LoRA adapters per patch size: the flexible model's LoRA mode leaves every original weight untouched.

FlexiDiT's LoRA setting (arXiv 2502.20126, §3.2): the pre-trained network is frozen and each new patch size
gets low-rank adapters on the self-attention and feed-forward linears of every block; adaLN modulation and
cross-attention (text models) get none and stay frozen, so the native patch computes the original model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# (submodule, linear) of every block that gets adapters: self-attention qkv/proj and the MLP.
LORA_TARGETS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))


class LoRAAdapter(nn.Module):
    """Low-rank update ``scale * B @ A``; B starts at zero so the adapted layer starts unchanged."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, like: torch.Tensor):
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=like.device, dtype=like.dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=like.device, dtype=like.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear / peft

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.scale  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale  # (out, in)


class LoRALinear(nn.Linear):
    """An nn.Linear that keeps the original ``weight``/``bias`` (and keys) plus one adapter per patch size.

    ``active`` ("p4", "p2x2x2", ... or None for the plain layer) is switched around each block call by
    :func:`lora_block_forward`; adapters live under ``lora.<key>.{A,B}``.
    """

    def __init__(self, base: nn.Linear, keys: Iterable[str], rank: int, alpha: float):
        # Built on the meta device (nothing allocated): the original Parameters are assigned right away.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.lora = nn.ModuleDict(
            {k: LoRAAdapter(base.in_features, base.out_features, rank, alpha, base.weight) for k in keys}
        )
        self.active: str | None = None
        self.merged: tuple[str, torch.Tensor] | None = None  # (key, W + BA), a copy outside the state dict

    def merge(self, key: str) -> None:
        self.merged = (key, (self.weight + self.lora[key].delta_weight()).detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            return F.linear(x, self.weight, self.bias)
        if self.merged is not None and self.merged[0] == self.active:
            return F.linear(x, self.merged[1], self.bias)
        return F.linear(x, self.weight, self.bias) + self.lora[self.active](x)


def attach_adapters(blocks: Iterable[nn.Module], keys: list[str], rank: int, alpha: float) -> None:
    """Replace the :data:`LORA_TARGETS` linears of every block by :class:`LoRALinear` with adapters ``keys``."""
    for block in blocks:
        for part, name in LORA_TARGETS:
            parent = getattr(block, part)
            setattr(parent, name, LoRALinear(getattr(parent, name), keys, rank, alpha))


def lora_block_forward(block: nn.Module, lora_key: str | None, *args: Any) -> torch.Tensor:
    """``block(*args)`` with the LoRA set ``lora_key`` switched on for exactly this call.

    The switch is made inside the function that activation checkpointing re-runs, so the recomputed
    forward uses the same adapters, and it is reset afterwards so no state leaks into later calls.
    """
    if lora_key is None:
        return block(*args)
    layers = [m for m in block.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.active = lora_key
    try:
        return block(*args)  # (N, T, D)
    finally:
        for m in layers:
            m.active = None
