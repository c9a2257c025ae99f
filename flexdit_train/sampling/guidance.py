"""Guidance under a compute budget: each sampling step's conditional and guidance branch at their patch sizes.

Both guidance kinds use the one formula :func:`flexdit_train.models.dit.apply_guidance` (it lives with the
networks because their ``forward_with_cfg``, DiT's API, needs it too): classifier-free guidance against
the null condition, and FlexiDiT's weak-conditional guidance against the weak model's conditional
prediction (§3.4 of the paper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from flexdit_train.models.arch import arch_of
from flexdit_train.models.dit import apply_guidance
from flexdit_train.sampling.cache import BlockCache, check_block_plan
from flexdit_train.sampling.schedule import patch_volume


def weak_guidance_scale(cfg_scale: float, ratio: float = 2.5) -> float:
    """Scale s2 of weak-conditional guidance from the CFG scale s1 via (1 - s1) / (1 - s2) = ratio."""
    return 1.0 - (1.0 - cfg_scale) / ratio


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
    channels and the learned variance come from the conditional branch. ``block_plan`` (one string per step,
    :mod:`flexdit_train.sampling.cache`) makes the steps compute, reuse or forecast their blocks; the model
    must run under :func:`flexdit_train.sampling.cache.installed` with :attr:`cache` meanwhile. ``sparse_grids``
    (one per step; None: none passed) is a SparseDiT's sparse grid side, given to both branches as ``sparse_grid``.
    """

    def __init__(
        self,
        model: nn.Module,
        timestep_map: Sequence[float],
        cond_patch_sizes: Sequence[Any],
        guidance_patch_sizes: Sequence[Any] | None,
        cfg_scale: float = 1.0,
        guidance: str = "weak_conditional",
        weak_scale: float | None = None,
        guide_all_channels: bool | None = None,
        block_plan: Sequence[str] | None = None,
        sparse_grids: Sequence[int] | None = None,
    ):
        super().__init__()
        steps = len(timestep_map)
        if sparse_grids is not None and len(sparse_grids) != steps:
            raise ValueError(
                f"the schedule has {len(sparse_grids)} sparse grids but the sampler runs {steps} steps; "
                "build the budget schedule for the same number of sampling steps"
            )
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
        # Sampling visits respaced steps from the last (noisiest) to the first. Keys are floats: DDPM passes
        # integer timesteps, flow matching the exact float32 network times of its grid (timestep_map entries).
        self.step_of_timestep = {float(timestep_map[steps - 1 - k]): k for k in range(steps)}
        self.cond_patch_sizes = list(cond_patch_sizes)
        self.guidance_patch_sizes = None if cfg_scale == 1.0 or guidance_patch_sizes is None else list(guidance_patch_sizes)
        self.cfg_scale = cfg_scale
        self.guidance = guidance
        self.weak_scale = weak_guidance_scale(cfg_scale) if weak_scale is None else weak_scale
        self.arch = arch_of(model)
        self.guided_channels = self.arch.guided_channels(model, guide_all_channels)
        self.cache = None if block_plan is None else BlockCache(check_block_plan(block_plan, steps))
        self.sparse_grids = None if sparse_grids is None else [int(g) for g in sparse_grids]

    def _run(self, step: int, branches: str, x: torch.Tensor, t: torch.Tensor, patch: Any, **cond) -> torch.Tensor:
        """One network call of ``step`` carrying ``branches``; a block plan caches per branches and patch size."""
        if self.sparse_grids is not None:
            cond = {**cond, "sparse_grid": self.sparse_grids[step]}
        if self.cache is None:
            return self.model(x, t, **cond, patch_size=patch)
        with self.cache.call(step, (branches, patch)):
            return self.model(x, t, **cond, patch_size=patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **cond) -> torch.Tensor:
        if y is not None:
            cond["y"] = y
        k = self.step_of_timestep[float(t[0])]
        p_cond = self.cond_patch_sizes[k]
        if self.guidance_patch_sizes is None:
            return self._run(k, "cond", x, t, p_cond, **cond)
        p_guide = self.guidance_patch_sizes[k]
        null = self.arch.null_condition(self.model, cond)
        if p_guide == p_cond:
            both = self._run(k, "both", torch.cat([x, x]), torch.cat([t, t]), p_cond, **cat_conditions(cond, null))
            out, uncond = both.chunk(2)  # (N, C_out, ...) each
            return apply_guidance(out, uncond, self.cfg_scale, self.guided_channels)
        out = self._run(k, "cond", x, t, p_cond, **cond)  # (N, C_out, ...)
        if self.guidance == "weak_conditional":
            weak = self._run(k, "guidance", x, t, p_guide, **cond)  # (N, C_out, ...)
            return apply_guidance(out, weak, self.weak_scale, self.guided_channels)
        uncond = self._run(k, "guidance", x, t, p_guide, **null)  # (N, C_out, ...)
        return apply_guidance(out, uncond, self.cfg_scale, self.guided_channels)
