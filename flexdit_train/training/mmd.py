"""FlexiDiT's bootstrapped distribution-matching loss (arXiv 2502.20126, §3.1, loss 2) against exposure bias.

The shared fine-tune trains every patch size on forward-noised data, but at sampling time the native
model continues from states that weak steps produced. The loss runs the actual sampler for a few steps,
weak steps first as an inference schedule does, and pulls the batch it reaches towards the forward
marginal at the same noise level:

1. two real batches x0, x0' and grid steps k1 > k2 (k2 drawn with a bias towards low noise, where the
   model and forward marginals differ most);
2. start from x0' noised to t(k1), run k1 - k2 deterministic DDIM steps of the sampler's grid, the
   first w of them (w uniform in 0..k1-k2) at the weak patch, with gradients through the whole chain;
3. minimise the MMD between the states reached and x0 noised to t(k2).

What the paper leaves open is chosen here and exposed as knobs: a multi-bandwidth Gaussian kernel on the
flattened states (bandwidths scaled by the median pairwise distance), the chain length, the grid, the
low-noise bias and the loss weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from flexdit_train.diffusion import sampling_diffusion


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.5, 1.0, 2.0)) -> torch.Tensor:
    """Unbiased squared MMD between samples x (N, ...) and y (M, ...) under a sum of Gaussian kernels
    exp(-|a - b|² / (b_i · m)), m the (detached) median squared distance of the pooled samples."""
    x, y = x.flatten(1).float(), y.flatten(1).float()  # (N, D), (M, D)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs at least 2 samples per set, got {n} and {m}")
    pooled = torch.cat([x, y])  # (N + M, D)
    d2 = torch.cdist(pooled, pooled).square()  # (N + M, N + M)
    scale = d2.detach()[~torch.eye(n + m, dtype=torch.bool, device=d2.device)].median().clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (b * scale)) for b in bandwidths)  # (N + M, N + M)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    off = lambda a, size: (a.sum() - a.diagonal().sum()) / (size * (size - 1))
    return off(kxx, n) + off(kyy, m) - 2 * kxy.mean()


@dataclass
class BootstrappedMMD:
    """Configuration and computation of the loss; ``weight`` 0 switches it off.

    ``grid_steps``: the DDIM grid the chain walks (the sampler's); ``chain_steps``: steps per chain;
    ``low_noise_bias``: k2 = floor((K - L + 1) u^bias), u uniform, so values > 1 favour low noise;
    ``every_n_steps``: add the loss on every n-th optimisation step only (it costs ``chain_steps``
    forward and backward passes of half the batch).
    """

    weight: float = 0.0
    grid_steps: int = 50
    chain_steps: int = 2
    low_noise_bias: float = 2.0
    every_n_steps: int = 1
    bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0)
    clip_denoised: bool = False

    def __post_init__(self) -> None:
        if self.weight < 0 or self.chain_steps < 1 or self.grid_steps <= self.chain_steps or self.every_n_steps < 1:
            raise ValueError(
                f"mmd needs weight >= 0, chain_steps >= 1, grid_steps > chain_steps and every_n_steps >= 1; got "
                f"weight={self.weight}, chain_steps={self.chain_steps}, grid_steps={self.grid_steps}, "
                f"every_n_steps={self.every_n_steps}"
            )
        self.bandwidths = tuple(float(b) for b in self.bandwidths)
        self._grid = None

    def active(self, step: int) -> bool:
        return self.weight > 0 and step % self.every_n_steps == 0

    def grid(self, process, learn_sigma: bool):
        """The respaced DDIM diffusion the chains walk, built once (same process as the trained one)."""
        if self._grid is None:
            self._grid = sampling_diffusion(process, f"ddim{self.grid_steps}", learn_sigma)
        return self._grid

    def draw(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """(k1, k2, weak steps): the chain's start and end indices on the grid and its number of weak steps."""
        grid_len = self.grid_steps
        k2 = int(np.floor((grid_len - self.chain_steps) * rng.random() ** self.low_noise_bias))
        k2 = min(k2, grid_len - 1 - self.chain_steps)
        return k2 + self.chain_steps, k2, int(rng.integers(0, self.chain_steps + 1))

    def loss(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        cond: dict[str, torch.Tensor],
        process,
        learn_sigma: bool,
        native_patch,
        weak_patch,
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The MMD term of one batch: the first half of ``x0`` is the target, the second half starts the chain
        (with its own condition). Returns the loss and what was drawn (for logging)."""
        grid = self.grid(process, learn_sigma)
        half = x0.shape[0] // 2
        target_x0, start_x0 = x0[:half], x0[half : 2 * half]  # (N/2, C, ...) each
        start_cond = {k: v[half : 2 * half] for k, v in cond.items()}
        k1, k2, weak_steps = self.draw(rng)
        device = x0.device
        t1 = torch.full((half,), k1, device=device, dtype=torch.long)
        t2 = torch.full((half,), k2, device=device, dtype=torch.long)
        x = grid.q_sample(start_x0, t1)  # (N/2, C, ...)
        for i, k in enumerate(range(k1, k2, -1)):
            patch = weak_patch if i < weak_steps else native_patch
            t = torch.full((half,), k, device=device, dtype=torch.long)
            x = grid.ddim_sample(partial(model, patch_size=patch), x, t, start_cond, eta=0.0,
                                 clip_denoised=self.clip_denoised)
        # ddim_sample from grid index k lands on index k - 1; the target sits at the chain's end, k2.
        target = grid.q_sample(target_x0, t2)  # (N/2, C, ...)
        value = mmd2(x, target, self.bandwidths)
        return self.weight * value, {"mmd": float(value.detach()), "mmd_t_start": float(grid.timestep_map[k1]),
                                     "mmd_weak_steps": float(weak_steps)}
