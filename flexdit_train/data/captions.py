"""Caption-embedding shards (text-to-image): image latents or pixels + pre-computed text-encoder states.

Shards come from ``python -m flexdit_train.shards text-embeddings`` run on caption shards (images, or
their latents from ``shards latents``). Batches are ``{"x", "text_emb" float32 (N, L, D), "text_mask"
bool (N, L), "key"}``; whether ``x`` is a latent (``moments.npy``, read as in
:mod:`flexdit_train.data.latents`) or pixels (optionally VAE-encoded on the fly) is read off the shards.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from flexdit_train.data.base import PixelWdsDataModule, WdsDataModule
from flexdit_train.data.images import ImageCodec
from flexdit_train.data.index import ShardSet, resolve_shards
from flexdit_train.data.latents import LatentCodec, check_latent_shape, sample_latent_meta
from flexdit_train.data.media import MOMENTS_FIELD, TEXT_EMB_FIELD, TEXT_MASK_FIELD
from flexdit_train.data.stream import first_sample

EMBED_HINT = "python -m flexdit_train.shards text-embeddings SHARDS OUT --encoder PATH"


class CaptionCodec:
    """The image part through a latent or image codec; the stored caption embedding and mask as they are."""

    def __init__(self, image: LatentCodec | ImageCodec) -> None:
        self.image = image

    def decode(self, sample: dict, rng: np.random.Generator, train: bool) -> dict:
        emb = np.load(io.BytesIO(sample[TEXT_EMB_FIELD])).astype(np.float32)  # (L, D)
        mask = np.load(io.BytesIO(sample[TEXT_MASK_FIELD])).astype(bool)  # (L,)
        return {"x": self.image.array(sample, rng, train), "text_emb": emb, "text_mask": mask, "key": sample["__key__"]}

    def finalize(self, x: torch.Tensor, generator: torch.Generator, train: bool) -> torch.Tensor:
        return self.image.finalize(x, generator, train)


def check_text_fields(sample: dict, text_len: int, text_channels: int) -> None:
    """One-line errors for shards without caption embeddings or with another encoder's shape."""
    if TEXT_EMB_FIELD not in sample:
        held = "captions but no text embeddings" if "txt" in sample else "neither captions nor text embeddings"
        raise ValueError(
            f"the shards hold {held}: encode the captions with `{EMBED_HINT}` and train on OUT "
            "(caption shards: imagefolder/video with a 'caption' column)"
        )
    length, channels = np.load(io.BytesIO(sample[TEXT_EMB_FIELD])).shape
    if (length, channels) != (text_len, text_channels):
        raise ValueError(
            f"the text embeddings are {length} tokens x {channels} channels: set data.text_len={length} and "
            f"data.text_channels={channels} (the model's text_len and caption_channels follow them)"
        )


class CaptionEmbeddingsWdsDataModule(PixelWdsDataModule):
    """Image latents or pixels with caption embeddings for a text DiT (``text_len`` x ``text_channels``).

    Latent shards give scaled posterior samples as the latents reader does (scale factor from the shards
    unless ``vae_scale_factor``); pixel shards are ADM-cropped to ``image_size`` and VAE-encoded when
    ``vae`` is set. Other arguments: those of :class:`~flexdit_train.data.base.PixelWdsDataModule`.
    """

    def __init__(
        self,
        *,
        text_len: int,
        text_channels: int,
        image_size: int = 256,
        random_flip: bool = False,
        sample_posterior: bool = True,
        **kwargs,
    ) -> None:
        # Captions, not classes, condition the model: the base class's label checks see one class.
        super().__init__(image_size=image_size, num_classes=1, **kwargs)
        if self.image_size[0] != self.image_size[1]:
            raise ValueError(f"the ADM center crop is square: set data.image_size to one int, got {image_size}")
        self.text_len, self.text_channels = text_len, text_channels
        self.random_flip, self.sample_posterior = random_flip, sample_posterior
        self.latents = False  # set from the shards in prepare_streams

    def prepare_streams(self) -> None:
        spec = self.train_shards if self.train_shards is not None else self.val_shards
        if spec is None:
            raise ValueError(f"{type(self).__name__} has no shards: set data.train_shards")
        sample = first_sample(resolve_shards(spec).urls)
        check_text_fields(sample, self.text_len, self.text_channels)
        self.latents = MOMENTS_FIELD in sample
        if not self.latents:
            super().prepare_streams()
            return
        if self.vae_spec is not None:
            raise ValueError("the caption shards hold VAE latents already: set data.vae=null")
        meta = sample_latent_meta(sample)
        check_latent_shape(meta["latent_shape"], self.in_channels, self.input_size)
        if self.vae_scale_factor is None:
            if "scale_factor" not in meta:
                raise ValueError("the latent shards do not record a scale factor: set data.vae_scale_factor")
            self.vae_scale_factor = float(meta["scale_factor"])
        WdsDataModule.prepare_streams(self)  # latents need none of the pixel/VAE set-up

    def check_meta(self, shard_set: ShardSet) -> None:
        """Caption sets have no class count to check (labelled images may carry captions too)."""

    def codec(self) -> CaptionCodec:
        if self.latents:
            return CaptionCodec(LatentCodec(self.vae_scale_factor, self.random_flip, self.sample_posterior))
        return CaptionCodec(ImageCodec(self.image_size[0], "RGB", self.random_flip))
