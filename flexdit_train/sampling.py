"""Reproducible sampling helpers: per-sample seeds, guided denoisers, image conversion and grids.

Noise, labels and every stochastic sampler step of sample ``i`` derive from ``(seed, i)`` alone, never
from the rank, the world size or the batch a sample lands in, so sample sets are comparable across
GPU counts and compute budgets. Models are image (N, C, H, W) or video (N, C, F, H, W) DiTs conditioned
on class labels (``y``) or caption embeddings (``text_emb``, ``text_mask``; null branch ``model.null_text``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flexdit_train.models.arch import arch_of
from flexdit_train.models.dit import apply_guidance


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


def weak_guidance_scale(cfg_scale: float, ratio: float = 2.5) -> float:
    """Scale s2 of weak-conditional guidance from the CFG scale s1 via (1 - s1) / (1 - s2) = ratio."""
    return 1.0 - (1.0 - cfg_scale) / ratio


def patch_volume(patch: Any) -> int:
    """Pixels (latent cells) per token: larger = weaker; an int p is a p x p patch."""
    return math.prod(patch) if isinstance(patch, tuple) else patch * patch


def cat_conditions(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two conditions with the same keys stacked along the batch."""
    return {k: torch.cat([a[k], b[k]]) for k in a}


class ScheduledDenoiser(nn.Module):
    """``model(x, t, **cond)`` -> one guided prediction, with each step's patch sizes taken from a schedule.

    ``cond_patch_sizes[k]`` / ``guidance_patch_sizes[k]`` are the patch sizes of the conditional and the
    guidance branch at sampling step k (k = 0 is the noisiest step). Per step:
    - no guidance branch (or ``cfg_scale == 1``): the conditional prediction alone;
    - both branches at the same size: standard CFG, eps = uncond + s1 * (cond - uncond), run as one
      doubled batch;
    - guidance branch weaker than the conditional one: with ``guidance="weak_conditional"`` the guidance
      term is the weak *conditional* prediction and the scale is s2 (FlexiDiT §3.4); with
      ``guidance="standard"`` it is the null-condition prediction at the weak size, scale s1.
    "Weaker" means more pixels per token (:func:`patch_volume`). The condition is ``y`` (labels) or
    ``text_emb``/``text_mask``. ``guide_all_channels=False`` guides only the first 3 eps channels (DiT's
    reproducibility quirk), True all; None follows the arch (DiT: 3, video and text DiTs: all). Unguided
    channels and the learned variance come from the conditional branch.
    """

    def __init__(
        self,
        model: nn.Module,
        timestep_map: Sequence[int],
        cond_patch_sizes: Sequence[Any],
        guidance_patch_sizes: Sequence[Any] | None,
        cfg_scale: float = 1.0,
        guidance: str = "weak_conditional",
        weak_scale: float | None = None,
        guide_all_channels: bool | None = None,
    ):
        super().__init__()
        steps = len(timestep_map)
        if len(cond_patch_sizes) != steps or (guidance_patch_sizes is not None and len(guidance_patch_sizes) != steps):
            raise ValueError(
                f"the schedule has {len(cond_patch_sizes)} steps but the sampler runs {steps}; "
                "build the budget schedule for the same number of sampling steps"
            )
        if guidance not in ("standard", "weak_conditional"):
            raise ValueError(f"unknown guidance mode {guidance!r}; use 'standard' or 'weak_conditional'")
        if guidance_patch_sizes is not None:
            for k, (pc, pg) in enumerate(zip(cond_patch_sizes, guidance_patch_sizes)):
                if patch_volume(pg) < patch_volume(pc):
                    raise ValueError(
                        f"step {k}: the guidance branch (patch {pg}) is more powerful than the conditional "
                        f"one (patch {pc}); powerful guidance steps must be a subset of conditional ones"
                    )
        self.model = model
        # Sampling visits respaced steps from the last (noisiest) to the first.
        self.step_of_timestep = {int(timestep_map[steps - 1 - k]): k for k in range(steps)}
        self.cond_patch_sizes = list(cond_patch_sizes)
        self.guidance_patch_sizes = None if cfg_scale == 1.0 or guidance_patch_sizes is None else list(guidance_patch_sizes)
        self.cfg_scale = cfg_scale
        self.guidance = guidance
        self.weak_scale = weak_guidance_scale(cfg_scale) if weak_scale is None else weak_scale
        self.arch = arch_of(model)
        self.guided_channels = self.arch.guided_channels(model, guide_all_channels)

    def combine(self, cond: torch.Tensor, guide: torch.Tensor, scale: float) -> torch.Tensor:
        return apply_guidance(cond, guide, scale, self.guided_channels)  # (N, C_out, ...)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **cond) -> torch.Tensor:
        if y is not None:
            cond["y"] = y
        k = self.step_of_timestep[int(t[0])]
        p_cond = self.cond_patch_sizes[k]
        if self.guidance_patch_sizes is None:
            return self.model(x, t, **cond, patch_size=p_cond)
        p_guide = self.guidance_patch_sizes[k]
        null = self.arch.null_condition(self.model, cond)
        if p_guide == p_cond:
            both = self.model(torch.cat([x, x]), torch.cat([t, t]), **cat_conditions(cond, null), patch_size=p_cond)
            out, uncond = both.chunk(2)  # (N, C_out, ...) each
            return self.combine(out, uncond, self.cfg_scale)
        out = self.model(x, t, **cond, patch_size=p_cond)  # (N, C_out, ...)
        if self.guidance == "weak_conditional":
            return self.combine(out, self.model(x, t, **cond, patch_size=p_guide), self.weak_scale)
        return self.combine(out, self.model(x, t, **null, patch_size=p_guide), self.cfg_scale)


@torch.no_grad()
def generate(
    model: nn.Module,
    diffusion,
    condition: torch.Tensor | Mapping[str, torch.Tensor],
    seed: int,
    indices: Sequence[int],
    *,
    cond_patch_sizes: Sequence[Any] | None = None,
    guidance_patch_sizes: Sequence[Any] | None = None,
    cfg_scale: float = 1.0,
    guidance: str = "weak_conditional",
    weak_scale: float | None = None,
    guide_all_channels: bool | None = None,
    method: str | None = None,
    clip_denoised: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Sample model-space outputs (N, C, H, W) or videos (N, C, F, H, W) with per-sample-index noise.

    ``condition``: (N,) class labels, or a dict of condition tensors (text DiTs: ``text_emb``
    (N, L, D_text) and ``text_mask`` (N, L), both required). Without patch schedules every step runs at
    the native size, and the guidance branch exists whenever ``cfg_scale != 1``.
    """
    device = next(model.parameters()).device
    steps = len(diffusion.timestep_map)
    cond_patch_sizes = cond_patch_sizes or [model.native_patch_size] * steps
    if guidance_patch_sizes is None and cfg_scale != 1.0:
        guidance_patch_sizes = list(cond_patch_sizes)
    denoiser = ScheduledDenoiser(
        model, diffusion.timestep_map, cond_patch_sizes, guidance_patch_sizes, cfg_scale, guidance, weak_scale,
        guide_all_channels,
    )
    shape = (model.in_channels, *model.input_size)
    noise, generators = sample_noise(seed, indices, shape, device)
    cond = {"y": condition} if isinstance(condition, torch.Tensor) else dict(condition)
    return diffusion.sample(
        denoiser,
        noise,
        {k: v.to(device) for k, v in cond.items()},
        method=method,
        clip_denoised=clip_denoised,
        progress=progress,
        generator=generators,
    )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) or (N, C, F, H, W) -> uint8 channels-last (N, H, W, C) or (N, F, H, W, C)
    with ADM round-to-nearest quantisation."""
    return (127.5 * images + 128.0).clamp(0, 255).to(torch.uint8).movedim(1, -1).contiguous()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a PNG grid of [-1, 1] images (N, C, H, W), or of videos (N, C, F, H, W) one per row of
    frames; returns the path."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if images.dim() == 5:
        nrow = images.shape[2]
        images = images.transpose(1, 2).flatten(0, 1)  # (N·F, C, H, W), each video's frames in a row
    nrow = nrow or max(1, int(round(len(images) ** 0.5)))
    save_image(images.float().cpu(), str(path), nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
    return path
