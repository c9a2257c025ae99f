"""Fréchet distance in float64, streamed feature statistics, and sample-count-carrying metric names."""

from __future__ import annotations

import numpy as np
import torch


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) clamp to 0."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), all in float64.

    tr((S1 S2)^(1/2)) equals tr((A S2 A)^(1/2)) with A = S1^(1/2); A S2 A is symmetric PSD, so two
    eigendecompositions with clamping replace scipy's slow, sometimes complex ``sqrtm``.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}; "
            "compute both with the same feature extractor and layer"
        )
    root1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


class RunningStats:
    """Mean and unbiased covariance of features fed in batches, accumulated in float64.

    Sums are taken around the first batch's mean, so large feature means cost no precision.
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        x = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features, np.float64)  # (B, D)
        if x.ndim != 2 or not len(x):
            return
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.total = np.zeros_like(self.shift)
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        centred = x - self.shift  # (B, D)
        self.total += centred.sum(axis=0)
        self.outer += centred.T @ centred
        self.count += len(x)

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) in float64."""
        if self.count < 2:
            raise ValueError(f"feature statistics need at least 2 images, got {self.count}; evaluate more samples")
        mean = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return self.shift + mean, sigma


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 of features (N, D)."""
    stats = RunningStats()
    stats.update(features)
    return stats.statistics()


def fid_label(num_samples: int) -> str:
    """Metric name carrying the sample count: 50000 -> ``fid50k``, 2500 -> ``fid2.5k``, 640 -> ``fid640``.

    FID is biased in n, so only an n = 50,000 number is ever called ``fid50k``.
    """
    n = int(num_samples)
    if n >= 1000 and n % 100 == 0:
        return f"fid{n / 1000:g}k"
    return f"fid{n}"
