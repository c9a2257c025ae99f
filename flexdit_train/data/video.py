"""Video shards (``mp4`` bytes + ``cls`` and/or ``txt`` caption) -> clips (C, F, H, W) in [-1, 1].

Clips have a fixed frame count and stride (random start for training, centered for evaluation), the
short side resized to cover ``image_size`` and a crop (decoding in :mod:`flexdit_train.data.media`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flexdit_train.data.base import PixelWdsDataModule
from flexdit_train.data.media import clip_indices, cover_size, read_frames, to_model_range, video_info


class VideoCodec:
    """Clip selection, resize/crop and flip per sample; uint8 -> [-1, 1] per batch."""

    def __init__(self, num_frames: int, frame_stride: int, size: tuple[int, int], random_crop: bool, random_flip: bool) -> None:
        self.num_frames, self.frame_stride, self.size = num_frames, frame_stride, size
        self.random_crop, self.random_flip = random_crop, random_flip

    def decode(self, sample: dict, rng: np.random.Generator, train: bool) -> dict:
        data = sample["mp4"]
        total, height, width, _ = video_info(data)
        indices = clip_indices(total, self.num_frames, self.frame_stride, rng if train else None)
        frames = read_frames(data, indices, cover_size(height, width, self.size))  # (F, h, w, 3)
        room_y, room_x = frames.shape[1] - self.size[0], frames.shape[2] - self.size[1]
        if train and self.random_crop:
            top, left = int(rng.integers(room_y + 1)), int(rng.integers(room_x + 1))
        else:
            top, left = room_y // 2, room_x // 2
        clip = frames[:, top : top + self.size[0], left : left + self.size[1]]  # (F, H, W, 3)
        if train and self.random_flip and rng.random() < 0.5:
            clip = clip[:, :, ::-1]
        row = {"x": np.ascontiguousarray(clip.transpose(3, 0, 1, 2)), "key": sample["__key__"]}  # (3, F, H, W)
        row["y"] = int(sample["cls"]) if "cls" in sample else 0
        if "txt" in sample:
            row["caption"] = sample["txt"].decode("utf-8")
        return row

    def finalize(self, x: torch.Tensor, generator: torch.Generator, train: bool) -> torch.Tensor:
        return to_model_range(x)  # (N, 3, F, H, W)


class VideoWdsDataModule(PixelWdsDataModule):
    """Clips of ``num_frames`` frames every ``frame_stride`` frames at ``image_size``; optional VAE latents.

    Samples without ``cls`` (caption-only sets) get label 0; captions are passed on as ``batch["caption"]``
    (None for samples without one). Other arguments: those of :class:`~flexdit_train.data.base.PixelWdsDataModule`.
    """

    def __init__(
        self,
        *,
        num_frames: int = 16,
        frame_stride: int = 3,
        image_size: int | Sequence[int] = 256,
        random_crop: bool = False,
        random_flip: bool = True,
        shuffle_buffer: int = 100,
        **kwargs,
    ) -> None:
        super().__init__(image_size=image_size, shuffle_buffer=shuffle_buffer, **kwargs)
        if num_frames < 1 or frame_stride < 1:
            raise ValueError(f"num_frames and frame_stride must be >= 1, got {num_frames}, {frame_stride}")
        self.num_frames, self.frame_stride = num_frames, frame_stride
        self.random_crop, self.random_flip = random_crop, random_flip

    def codec(self) -> VideoCodec:
        return VideoCodec(self.num_frames, self.frame_stride, self.image_size, self.random_crop, self.random_flip)
