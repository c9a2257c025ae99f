"""EDT's Attention Modulation Matrix (AMM, arXiv 2410.23788): a training-free locality prior for attention.

In chosen blocks the post-softmax attention map is multiplied element-wise (no renormalisation) by a fixed
matrix over token pairs of the 2-D token grid::

    M_ij = 0.5 * exp(cos(2π d_ij / T))     d_ij: Euclidean grid distance of tokens i and j

For an n x n grid, T = 4 (n - 1) √2 and entries below the value at radius R = √(2² + (n - 1)²) are zeroed
(in EDT's code R is the distance from token 0 to token 3n - 1: two rows down, last column). Near tokens are
up-weighted (x0.5e = 1.359 at d = 0) and far ones cut, so an AMM block "sketches" locally between global
blocks.

Non-square n_h x n_w grids (our generalisation; EDT only defines n x n): T = 4 · d_max with d_max =
√((n_h - 1)² + (n_w - 1)²) the grid diagonal (for n x n: (n - 1)√2, EDT's T), and R = √(2² + (n_long - 1)²)
with n_long = max(n_h, n_w) (for n x n: EDT's R). Every distance is at most d_max < T / 2, where cos is
decreasing, so the cut keeps exactly the pairs with d_ij <= R. A 1 x 1 grid has no distances: M = [[0.5 e]].

:class:`AttentionModulation` is what a model installs (``PatchModel.set_attention_modulation``): it tracks
the token grid of the running forward (it changes with the patch size of a flexible model) and caches one
matrix per grid; :func:`modulated_attention` is the explicit-softmax attention that AMM blocks run instead
of SDPA.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def grid_distances(grid_hw: tuple[int, int]) -> torch.Tensor:
    """(T, T) float64 Euclidean distances between the tokens of a row-major (n_h, n_w) grid."""
    n_h, n_w = grid_hw
    rows, cols = torch.meshgrid(
        torch.arange(n_h, dtype=torch.float64), torch.arange(n_w, dtype=torch.float64), indexing="ij"
    )  # (n_h, n_w) each
    rows, cols = rows.reshape(-1), cols.reshape(-1)  # (T,) each
    return torch.sqrt((rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2)  # (T, T)


def amm_period(grid_hw: tuple[int, int]) -> float:
    """T = 4 · grid diagonal (n x n: 4 (n - 1) √2)."""
    n_h, n_w = grid_hw
    return 4.0 * math.hypot(n_h - 1, n_w - 1)


def amm_radius(grid_hw: tuple[int, int]) -> float:
    """R = √(2² + (n_long - 1)²): the cut-off distance (n x n: EDT's √(4 + (n - 1)²))."""
    return math.hypot(2, max(grid_hw) - 1)


def amm_value(distance: float | torch.Tensor, period: float) -> torch.Tensor:
    """0.5 · exp(cos(2π d / T)) in float64."""
    d = torch.as_tensor(distance, dtype=torch.float64)
    return 0.5 * torch.exp(torch.cos(2 * math.pi * d / period))


def modulation_matrix(grid_hw: Sequence[int]) -> torch.Tensor:
    """The (T, T) float32 AMM of a row-major (n_h, n_w) token grid, symmetric, zero beyond the radius R."""
    grid = (int(grid_hw[0]), int(grid_hw[1]))
    if min(grid) < 1:
        raise ValueError(f"AMM needs a token grid of positive sides, got {grid}")
    distances = grid_distances(grid)  # (T, T)
    if max(grid) == 1:
        return torch.full((1, 1), 0.5 * math.e)
    period = amm_period(grid)
    matrix = amm_value(distances, period)  # (T, T)
    matrix[matrix < amm_value(amm_radius(grid), period)] = 0.0
    return matrix.float()


def modulated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, modulation: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q kᵀ / √hd + bias) ⊙ M, then · v: the post-softmax map modulated, not renormalised.

    q, k, v: (N, H, T, hd); modulation: (T, T); bias: None or (H, T, T) added to the logits.
    """
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, H, T, T)
    if bias is not None:
        logits = logits + bias
    # softmax in fp32 as SDPA's kernels do; the map goes back to v's dtype for the second matmul
    attn = logits.float().softmax(dim=-1) * modulation.float()  # (N, H, T, T)
    return attn.to(v.dtype) @ v  # (N, H, T, hd)


class AttentionModulation:
    """The AMM state one model shares between its AMM blocks: the current base token grid and the matrices.

    ``grid`` is the token grid of the model's input (set before every forward by the model's hook); a block
    whose tokens sit on a grid ``downsample`` times coarser (EDT's inner stages) asks for that grid's matrix.
    Matrices are cached per (grid, device).
    """

    def __init__(self) -> None:
        self.grid: tuple[int, int] | None = None
        self._cache: dict[tuple, torch.Tensor] = {}

    def matrix(self, tokens: int, device: torch.device, downsample: int = 1) -> torch.Tensor:
        """(T, T) matrix of the current grid divided by ``downsample``; checks it has ``tokens`` tokens."""
        if self.grid is None:
            raise RuntimeError("attention modulation has no token grid: the model's forward sets it")
        grid = (self.grid[0] // downsample, self.grid[1] // downsample)
        if grid[0] * grid[1] != tokens:
            raise ValueError(
                f"AMM block sees {tokens} tokens, the {grid[0]}x{grid[1]} grid has {grid[0] * grid[1]}; "
                "AMM needs one token per grid cell (no extra tokens)"
            )
        key = (grid, device)
        if torch.compiler.is_compiling():
            return modulation_matrix(grid).to(device)
        if key not in self._cache:
            self._cache[key] = modulation_matrix(grid).to(device)
        return self._cache[key]


def attention_layers_of(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """(attention module, grid downsampling factor) of every block, 1-indexed block b = entry b - 1."""
    layers = getattr(model, "attention_layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} does not support attention modulation (AMM)")
    return layers()


@contextmanager
def attention_modulation(model: nn.Module, blocks: Sequence[int] | None) -> Iterator[nn.Module]:
    """``with attention_modulation(model, [8, 11]):`` AMM in those blocks, the previous setting restored after."""
    previous = tuple(getattr(model, "amm_blocks", ()))
    model.set_attention_modulation(blocks)
    try:
        yield model
    finally:
        model.set_attention_modulation(previous)
