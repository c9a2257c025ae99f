"""Gaussian log-likelihood helpers for the variational bound, layout-agnostic (any trailing dims)."""

from __future__ import annotations

import math

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the batch dim: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Tanh approximation of the standard normal CDF (the one iDDPM/DiT use, so decoder NLLs match theirs)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, num_bins: int = 256
) -> torch.Tensor:
    """Elementwise log-probability of data in [-1, 1] quantised to ``num_bins`` levels under N(means, scales).

    The outermost bins extend to -inf / +inf so the probabilities sum to one.
    """
    half_bin = 1.0 / (num_bins - 1)  # the bins are 2 / (num_bins - 1) wide
    inv_std = torch.exp(-log_scales)
    centered = x - means
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    # The 1e-12 floor keeps log() finite when the model is confidently wrong.
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin_mass = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    # For 256 bins, 0.999 sits between the edge level (+-1) and its neighbour (+-(1 - 2/255)).
    return torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin_mass)
    )
