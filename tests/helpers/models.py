"""Tiny models shared by several test files."""

from __future__ import annotations

import torch

from flexdit_train.models import DiT


def randomize_zero_inits(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """adaLN-Zero makes a fresh model output zeros; give the zero-init layers values to test numerics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def pretrained_like(seed: int = 0) -> DiT:
    """A tiny DiT whose zero-initialised layers got values, standing in for a pretrained static model."""
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=5)
    return randomize_zero_inits(model, seed, scale=0.1)


def perturbed_dit(seed: int = 0, perturb: bool = True) -> DiT:
    """A 2-block, width-64 DiT on 4x8x8 latents; ``perturb`` breaks the zero init so outputs are non-trivial."""
    torch.manual_seed(seed)
    model = DiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10
    )
    return (perturb_trainable(model, seed + 1) if perturb else model).eval()


def perturb_trainable(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every trainable weight: adaLN-Zero and zero output layers then give non-trivial outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return model
