"""Per-sample randomness: noise, labels and every stochastic sampler step of sample ``i`` derive from
``(seed, i)`` alone, never from the rank, the world size or the batch a sample lands in, so sample sets
are comparable across GPU counts and compute budgets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Labels come from their own stream, (seed + offset, i), so they do not correlate with the noise.
LABEL_SEED_OFFSET = 7919


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


LABEL_MODES = ("uniform", "balanced")


def sample_labels(seed: int, indices: Sequence[int], num_classes: int, mode: str = "uniform") -> torch.Tensor:
    """Class labels (N,) of the given sample indices, independent of batch layout.

    ``uniform``: drawn from (seed + offset, i), as DiT's evaluation does. ``balanced``: sample i gets class
    i mod num_classes, so a set of n samples has n / num_classes of each class (to within one), like a
    balanced reference set; with few samples per class, uniform draws add class-proportion noise that
    moves a classifier-feature FID by more than the models differ (the MNIST protocol uses balanced).
    """
    if mode == "balanced":
        return torch.tensor([int(i) % num_classes for i in indices], dtype=torch.long)
    if mode != "uniform":
        raise ValueError(f"labels={mode!r} is not one of {LABEL_MODES}")
    labels = [
        int(torch.randint(num_classes, (1,), generator=sample_generator(seed + LABEL_SEED_OFFSET, i)).item())
        for i in indices
    ]
    return torch.tensor(labels, dtype=torch.long)


def seed_protocol(num_samples: int, labels: str = "uniform") -> dict[str, str]:
    """How the noise and the labels of samples ``0..num_samples-1`` were drawn, for cards."""
    how = f"uniform, sample i: (seed + {LABEL_SEED_OFFSET}, i)" if labels == "uniform" else "balanced: i mod classes"
    return {
        "noise": "sample i: SeedSequence([seed, i])",
        "labels": how,
        "indices": f"0..{num_samples - 1}",
    }
