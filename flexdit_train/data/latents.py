"""Latent shards: per sample ``moments.npy`` float16 (2, 2, C, h, w) = (flip, mean|logvar) + ``cls`` + ``json``.

The reader draws one of the two stored flips and a posterior sample ``z = mean + exp(logvar / 2) * eps``
per training sample, then multiplies by the VAE scale factor; evaluation uses the unflipped mean.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch

from flexdit_train.data.base import WdsDataModule
from flexdit_train.data.index import ShardSet
from flexdit_train.data.media import MOMENTS_FIELD
from flexdit_train.data.stream import first_sample


class LatentCodec:
    """Pick a flip per sample; sample the posterior and scale per batch."""

    def __init__(self, scale_factor: float, random_flip: bool = True, sample_posterior: bool = True) -> None:
        self.scale_factor, self.random_flip, self.sample_posterior = scale_factor, random_flip, sample_posterior

    def array(self, sample: dict, rng: np.random.Generator, train: bool) -> np.ndarray:
        """The stored (mean, logvar) moments (2, C, h, w) of the image or of its flip."""
        moments = np.load(io.BytesIO(sample[MOMENTS_FIELD]))  # (2, 2, C, h, w) float16
        flip = int(rng.integers(2)) if train and self.random_flip else 0
        return moments[flip]

    def decode(self, sample: dict, rng: np.random.Generator, train: bool) -> dict:
        return {"x": self.array(sample, rng, train), "y": int(sample["cls"]), "key": sample["__key__"]}

    def finalize(self, x: torch.Tensor, generator: torch.Generator, train: bool) -> torch.Tensor:
        moments = x.float()  # (N, 2, C, h, w)
        mean, logvar = moments[:, 0], moments[:, 1]  # (N, C, h, w) each, views of a fresh tensor: in place is safe
        if train and self.sample_posterior:
            std = logvar.mul_(0.5).exp_()
            mean = mean.addcmul_(std, torch.randn(mean.shape, generator=generator))
        return mean.mul_(self.scale_factor)


def sample_latent_meta(sample: dict) -> dict:
    """``latent_shape``/``scale_factor``/``vae`` of one raw latent sample."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    moments = np.load(io.BytesIO(sample[MOMENTS_FIELD]))
    return {**meta, "latent_shape": list(moments.shape[2:])}


def check_latent_shape(latent_shape, in_channels: int, input_size: tuple[int, int]) -> None:
    """One-line error when stored latents do not have the configured shape."""
    channels, height, width = latent_shape
    if (channels, (height, width)) != (in_channels, input_size):
        raise ValueError(
            f"the latent shards hold {channels}x{height}x{width} latents: set data.in_channels={channels} and "
            f"data.input_size={height if height == width else [height, width]} (or re-encode at another --image-size)"
        )


class LatentsWdsDataModule(WdsDataModule):
    """Pre-encoded VAE latents; ``input_size``/``in_channels`` must match the stored latent shape.

    Other arguments: those of :class:`~flexdit_train.data.base.WdsDataModule` (shards, batch, shapes).
    """

    def __init__(
        self, *, random_flip: bool = True, sample_posterior: bool = True, scale_factor: float | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.random_flip = random_flip
        self.sample_posterior = sample_posterior
        self.scale_factor = scale_factor
        self.meta: dict = {}

    def check_meta(self, shard_set: ShardSet) -> None:
        meta = shard_set.meta if "latent_shape" in shard_set.meta else sample_latent_meta(first_sample(shard_set.urls))
        check_latent_shape(meta["latent_shape"], self.in_channels, self.input_size)
        super().check_meta(shard_set)
        if self.scale_factor is None:
            if "scale_factor" not in meta:
                raise ValueError("the latent shards do not record a scale factor: set data.scale_factor (0.18215 for SD-VAE)")
            self.scale_factor = float(meta["scale_factor"])
        self.meta = meta

    def codec(self) -> LatentCodec:
        return LatentCodec(self.scale_factor, self.random_flip, self.sample_posterior)
