"""A diffusion that walks a subset of a longer chain's timesteps (fewer sampling steps, same network)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from flexdit_train.diffusion.gaussian_diffusion import GaussianDiffusion


class SpacedDiffusion(GaussianDiffusion):
    """Keeps the steps ``use_timesteps`` of the chain defined by ``betas``.

    Betas are recomputed so that the kept steps have exactly the original alphas_cumprod; step
    indices 0..K-1 are mapped back to the original timesteps before every network call.
    """

    def __init__(self, use_timesteps: Iterable[int], betas: Sequence[float] | np.ndarray, **kwargs: Any):
        base_alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        kept = np.array(sorted(set(use_timesteps)), dtype=np.int64)
        if len(kept) == 0 or kept[0] < 0 or kept[-1] >= len(base_alphas_cumprod):
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{len(base_alphas_cumprod) - 1}")
        kept_alphas_cumprod = base_alphas_cumprod[kept]  # (K,)
        # abar_k = prod of the kept alphas, so alpha_k = abar_k / abar_{k-1} and beta_k = 1 - alpha_k.
        previous = np.append(1.0, kept_alphas_cumprod[:-1])
        super().__init__(1.0 - kept_alphas_cumprod / previous, **kwargs)
        self.original_num_timesteps = len(base_alphas_cumprod)
        self._timestep_map = kept
