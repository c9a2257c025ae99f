"""SparseDiT's timestep-aware training draw (arXiv 2412.06028) as an objective.

A sampler runs a SparseDiT with few sparse tokens at the noisiest steps and more towards the end
(:class:`flexdit_train.sampling.schedule.SparseDensity`). Training matches it per sample: each sample's timestep t
maps to the sparse grid the density schedule gives the sampling step that denoises from t (progress 1 - noise level,
the noise level being t / (T_train - 1) for DDPM and t itself for flow matching), and the batch runs as one forward
per distinct grid (at most max_grid - min_grid + 1 of them), the per-sample losses put back in batch order. The
paper's own training "gate" is not described in enough detail to reproduce; this draw is exact instead.

With ``fixed_grid`` set every sample trains at that one grid (the release's fixed 8x8 at 256 px).
"""

from __future__ import annotations

from typing import Any

import torch

from flexdit_train.flops import cost_model
from flexdit_train.sampling.schedule import SparseDensity
from flexdit_train.training.module import DiffusionModule


def noise_level(diffusion: Any, t: torch.Tensor) -> torch.Tensor:
    """(N,) noise level in [0, 1] (1 = pure noise) of training times: DDPM step indices over the chain, flow t."""
    steps = getattr(diffusion, "num_timesteps", None)
    return t.float() / max(1, steps - 1) if steps is not None else t.float()


class SparseDensityModule(DiffusionModule):
    """:class:`DiffusionModule` whose samples each run at the sparse grid of their timestep."""

    def __init__(self, *args: Any, min_grid: int | None = None, max_grid: int | None = None,
                 hold_fraction: float | None = None, fixed_grid: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.density = SparseDensity.of_model(self.model.config, min_grid, max_grid, hold_fraction)
        self.fixed_grid = None if fixed_grid is None else int(fixed_grid)
        self._last_grids: list[int] = []

    def sparse_grids(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) int sparse grid side of each training time ``t``."""
        if self.fixed_grid is not None:
            return torch.full(t.shape, self.fixed_grid, dtype=torch.long)
        levels = noise_level(self.diffusion, t).tolist()
        return torch.tensor([self.density.grid_at_noise(level) for level in levels], dtype=torch.long)

    def compute_losses(self, batch: dict, patch_size: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0 = batch["x"]
        n = x0.shape[0]
        t = self.sample_timesteps(n, x0.device, patch_size)  # (N,)
        noise = torch.randn_like(x0)  # one draw for the whole batch, split by grid below
        cond = self.model_cond(batch, patch_size)
        grids = self.sparse_grids(t.cpu())  # (N,)
        self._last_grids = grids.tolist()
        order, parts = [], []
        for grid in grids.unique().tolist():
            rows = (grids == grid).nonzero().squeeze(1).to(x0.device)  # (n_g,)
            sub = {k: v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v for k, v in cond.items()}
            parts.append(self.diffusion.training_losses(
                self.model, x0[rows], t[rows], cond={**sub, "sparse_grid": grid}, noise=noise[rows]))
            order.append(rows)
        inverse = torch.empty(n, dtype=torch.long, device=x0.device)
        inverse[torch.cat(order)] = torch.arange(n, device=x0.device)
        terms = {key: torch.cat([part[key] for part in parts])[inverse] for key in parts[0]}  # batch order
        if self._trainer is not None:
            self.log("train/sparse_grid", float(grids.float().mean()), rank_zero_only=True)
        return t, terms

    def step_flops(self, x: torch.Tensor, patch_size: Any) -> float:
        """Fwd + bwd hardware FLOPs of the last batch, each sample at its own sparse grid."""
        if not self._last_grids:
            return super().step_flops(x, patch_size)
        cost = cost_model(self.model, tuple(x.shape[2:]))
        patch = self.model.native_patch_size if patch_size is None else patch_size
        return float(sum(3 * 2 * cost(patch, sparse_grid=g) for g in self._last_grids))
