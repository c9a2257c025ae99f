"""Exponential moving average of model weights, kept in fp32 whatever the training precision."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen fp32 copy of ``model`` in eval mode (eval matters: it turns off label dropout)."""
    ema = copy.deepcopy(model).float()
    ema.requires_grad_(False)
    return ema.eval()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, over the model's trainable parameters.

    Parameters are paired by name. Frozen parameters (``pos_embed``, the base weights under LoRA) never
    change, so they are skipped rather than copied every step. The shadow stays fp32: a bf16 shadow
    with decay 0.9999 rounds every update away.
    """
    ema_params = dict(ema.named_parameters())
    pairs = [(local(ema_params[name]), local(p.detach())) for name, p in model.named_parameters() if p.requires_grad]
    if not pairs:
        return
    shadows, currents = zip(*pairs)
    currents = [c.to(s.dtype) for s, c in zip(shadows, currents)]
    torch._foreach_lerp_(list(shadows), currents, 1.0 - decay)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 (DTensor) parameter, the tensor itself otherwise.

    Model and EMA are sharded identically, so updating local shards is the exact EMA with no
    communication.
    """
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
