"""Random draws from None, one generator, or one generator per sample (batch-independent seeding)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int],
    generator: Generators,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal tensor of ``shape``; with a list of generators, row i comes from generator i only.

    Values are drawn on each generator's own device and then moved, so CPU generators can seed GPU runs.
    """
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
    return torch.stack(rows).to(device)  # (N, ...)


def randint(high: int, n: int, generator: Generators, device: torch.device | str) -> torch.Tensor:
    """(n,) int64 uniform over [0, high), with the same generator conventions as :func:`randn`."""
    if generator is None:
        return torch.randint(0, high, (n,), device=device)
    if isinstance(generator, torch.Generator):
        return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device)
    if len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for a batch of {n}; pass one per sample")
    rows = [torch.randint(0, high, (1,), generator=g, device=g.device) for g in generator]
    return torch.cat(rows).to(device)  # (n,)
