"""Image shards (original JPEG/PNG bytes + ``cls``) -> pixels in [-1, 1], optionally VAE latents.

ADM center crop (see :mod:`flexdit_train.data.media`) and a random horizontal flip for training.
"""

from __future__ import annotations

import numpy as np
import torch

from flexdit_train.data.base import PixelWdsDataModule
from flexdit_train.data.media import decode_image, image_bytes, to_model_range


class ImageCodec:
    """Decode + ADM crop + random flip per sample; uint8 -> [-1, 1] per batch."""

    def __init__(self, size: int, mode: str = "RGB", random_flip: bool = True) -> None:
        self.size, self.mode, self.random_flip = size, mode, random_flip

    def array(self, sample: dict, rng: np.random.Generator, train: bool) -> np.ndarray:
        """The cropped (and maybe flipped) image as uint8 (C, H, W)."""
        array = decode_image(image_bytes(sample), self.size, self.mode)  # (H, W, C)
        if train and self.random_flip and rng.random() < 0.5:
            array = array[:, ::-1]
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def decode(self, sample: dict, rng: np.random.Generator, train: bool) -> dict:
        return {"x": self.array(sample, rng, train), "y": int(sample["cls"]), "key": sample["__key__"]}

    def finalize(self, x: torch.Tensor, generator: torch.Generator, train: bool) -> torch.Tensor:
        return to_model_range(x)  # (N, C, H, W)


class ImageWdsDataModule(PixelWdsDataModule):
    """ImageNet-style image shards at ``image_size`` pixels; with ``vae`` the batches become latents.

    Other arguments: those of :class:`~flexdit_train.data.base.PixelWdsDataModule` (shards, batch, shapes, VAE).
    """

    def __init__(self, *, image_size: int = 256, random_flip: bool = True, **kwargs) -> None:
        super().__init__(image_size=image_size, **kwargs)
        if self.image_size[0] != self.image_size[1]:
            raise ValueError(f"the ADM center crop is square: set data.image_size to one int, got {image_size}")
        self.random_flip = random_flip

    def codec(self) -> ImageCodec:
        return ImageCodec(self.image_size[0], "L" if self.pixel_channels() == 1 else "RGB", self.random_flip)
