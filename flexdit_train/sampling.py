"""Reproducible sampling helpers: per-sample seeds, guided denoisers, image conversion and grids.

Noise, labels and every stochastic sampler step of sample ``i`` derive from ``(seed, i)`` alone, never
from the rank, the world size or the batch a sample lands in, so sample sets are comparable across
GPU counts and compute budgets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn


def sample_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, sample index) through NumPy's SeedSequence hashing."""
    state = int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state & ((1 << 63) - 1))


def sample_noise(
    seed: int, indices: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Initial noise (N, *shape) for the given global sample indices, and the generators that continue them."""
    generators = [sample_generator(seed, i, device) for i in indices]
    noise = torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in generators])
    return noise, generators  # noise: (N, *shape)


def sample_labels(seed: int, indices: Sequence[int], num_classes: int) -> torch.Tensor:
    """Uniform class labels (N,) derived from (seed, index), independent of batch layout."""
    labels = [
        int(torch.randint(num_classes, (1,), generator=sample_generator(seed + 7919, i)).item()) for i in indices
    ]
    return torch.tensor(labels, dtype=torch.long)


class GuidedDenoiser(nn.Module):
    """``model(x, t, y)`` -> classifier-free-guided output for a batch of conditional samples.

    The conditional and null-label branches run as one doubled batch; ``guide_all_channels=False``
    reproduces DiT's guidance of the first 3 eps channels only.
    """

    def __init__(self, model: nn.Module, cfg_scale: float, guide_all_channels: bool = False):
        super().__init__()
        self.model = model
        self.cfg_scale = cfg_scale
        self.guide_all_channels = guide_all_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.cfg_scale == 1.0:
            return self.model(x, t, y, **kwargs)
        null = torch.full_like(y, self.model.null_class)
        out = self.model.forward_with_cfg(
            torch.cat([x, x]),  # (2N, C, H, W)
            torch.cat([t, t]),
            torch.cat([y, null]),
            self.cfg_scale,
            guide_all_channels=self.guide_all_channels,
            **kwargs,
        )  # (2N, C_out, H, W)
        return out[: len(x)]


@torch.no_grad()
def generate(
    model: nn.Module,
    diffusion,
    labels: torch.Tensor,
    seed: int,
    indices: Sequence[int],
    *,
    cfg_scale: float = 1.0,
    guide_all_channels: bool = False,
    method: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample model-space outputs (N, C, H, W) for ``labels`` with per-sample-index noise."""
    device = next(model.parameters()).device
    shape = (model.in_channels, *model.input_size)
    noise, generators = sample_noise(seed, indices, shape, device)
    denoiser = GuidedDenoiser(model, cfg_scale, guide_all_channels)
    return diffusion.sample(
        denoiser, noise, {"y": labels.to(device)}, method=method, progress=progress, generator=generators
    )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, C) with ADM round-to-nearest quantisation."""
    return (127.5 * images + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a PNG grid of [-1, 1] images (N, C, H, W); returns the path."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(round(len(images) ** 0.5)))
    save_image(images.float().cpu(), str(path), nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
    return path
