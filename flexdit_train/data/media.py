"""Lightning-free media helpers shared by readers and writers: image/video decoding and the latent format.

Images follow the ADM/DiT preprocessing: box-downsample by 2 while the short side is >= 2x the target,
bicubic resize of the short side to the target, center crop. Video goes through PyAV; containers are
closed right after use (decoder leaks in long-lived loader workers are a known failure of video loaders).
"""

from __future__ import annotations

import io
import math
from fractions import Fraction

import av
import numpy as np
import torch
from PIL import Image

MOMENTS_FIELD = "moments.npy"  # latent shards: float16 (2, 2, C, h, w) = (flip, mean|logvar, C, h, w)
TEXT_EMB_FIELD = "text_emb.npy"  # caption shards after `shards text-embeddings`: float16 (L, D) encoder states
TEXT_MASK_FIELD = "text_mask.npy"  # bool (L,): True for real tokens, False for padding
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp")


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM center crop to ``size`` x ``size``: BOX halvings, one BICUBIC resize, then a center crop."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a sample, whichever image extension it was stored under."""
    for name in IMAGE_FIELDS:
        if name in sample:
            return sample[name]
    raise KeyError(f"sample {sample.get('__key__')} has no image member ({'/'.join(IMAGE_FIELDS)})")


def decode_image(data: bytes, size: int, mode: str = "RGB") -> np.ndarray:
    """Encoded bytes -> ADM-cropped uint8 (H, W, C)."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert(mode)  # forces the decode: truncated files raise here
    array = np.asarray(adm_center_crop(image, size))
    return array.reshape(size, size, -1)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def clip_indices(total: int, num_frames: int, stride: int, rng: np.random.Generator | None) -> list[int]:
    """Frame indices of one clip: random (``rng``) or centered start; short videos repeat their last frame."""
    span = (num_frames - 1) * stride + 1
    room = max(0, total - span)
    start = int(rng.integers(room + 1)) if rng is not None else room // 2
    return [min(start + i * stride, total - 1) for i in range(num_frames)]


def cover_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The smallest (h, w) with the source aspect ratio that covers ``target``."""
    scale = max(target[0] / height, target[1] / width)
    return max(target[0], math.ceil(height * scale)), max(target[1], math.ceil(width * scale))


def video_info(data: bytes) -> tuple[int, int, int, float]:
    """``(frames, height, width, fps)`` from the container header (frames counted by decoding if absent)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for _ in container.decode(stream))
        return total, stream.codec_context.height, stream.codec_context.width, float(stream.average_rate or 25)


def read_frames(data: bytes, indices: list[int], size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode the frames at ``indices`` as uint8 (F, h, w, 3), resized to ``size`` (h, w) when given.

    Indices past the decodable end repeat the last decoded frame (headers may overstate the length).
    """
    wanted, last = set(indices), max(indices)
    frames: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in wanted:
                if size is not None:
                    frame = frame.reformat(width=size[1], height=size[0], interpolation="BICUBIC")
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    if not frames:
        raise ValueError("video has no decodable frames")
    final = frames[max(frames)]
    return np.stack([frames.get(i, final) for i in indices])


def encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    """uint8 (F, H, W, 3) frames -> H.264 mp4 bytes (even sizes; yuv420p)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array[: stream.height, : stream.width]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()
