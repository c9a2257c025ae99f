"""Tiny models shared by several test files."""

from __future__ import annotations

import torch

from flexdit_train.models import DiT


def pretrained_like(seed: int = 0) -> DiT:
    """A tiny DiT whose zero-initialised layers got values, standing in for a pretrained static model."""
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=5)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model
