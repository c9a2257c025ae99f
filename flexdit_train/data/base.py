"""LightningDataModule plumbing shared by every reader.

Global batch divided per rank; a training loader that restarts deterministically at any step; a fixed
evaluation loader with the same batch count on every rank; skip statistics; optional on-the-fly VAE.

Resume: the training stream is reseeded at each ``iter()`` from the position
``trainer.global_step * accumulate_grad_batches`` (Lightning restores ``global_step`` before it calls
``train_dataloader()`` and iterates) and runs to the next multiple of ``steps_per_epoch``. An uninterrupted
run reseeds at 0, L, 2L, ... (L = ``steps_per_epoch``), so a resume from a checkpoint taken at a multiple
of L reproduces the uninterrupted batches exactly; a resume at S between boundaries gives a fresh stream
that is the same on every restart at S and rejoins the uninterrupted batches from the next boundary on.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule

from flexdit_train.data.index import ShardSet, resolve_shards
from flexdit_train.data.stream import (
    EvalLoader,
    SampleCodec,
    ShardStream,
    SkipStats,
    StreamLoader,
    derive_seed,
    split_by_rank,
)
from flexdit_train.data.vae import downsample_factor, load_vae, sample_latents

WRITE_HINT = "rewrite the set with more shards (`python -m flexdit_train.shards ... --maxcount` smaller)"


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``input_size`` as ``(H, W)`` from an int or a pair."""
    if isinstance(size, int):
        return size, size
    height, width = (int(s) for s in size)
    return height, width


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class StreamDataModule(LightningDataModule, ABC):
    """Batches ``{"x": float32 (N, C, ...), "y": int64 (N,), "key": list[str]}`` per rank."""

    def __init__(
        self,
        *,
        global_batch_size: int,
        num_workers: int,
        seed: int,
        input_size: int | Sequence[int],
        in_channels: int,
        num_classes: int,
        steps_per_epoch: int = 1000,
        val_batches: int | None = None,
    ) -> None:
        super().__init__()
        self.global_batch_size = _positive("global_batch_size", global_batch_size)
        self.num_workers = _positive("num_workers", num_workers, 0)
        self.seed = _positive("seed", seed, 0)
        self.input_size = as_hw(input_size)
        self.in_channels = _positive("in_channels", in_channels)
        self.num_classes = _positive("num_classes", num_classes)
        self.steps_per_epoch = _positive("steps_per_epoch", steps_per_epoch)
        self.val_batches = None if val_batches is None else _positive("val_batches", val_batches)
        self.rank, self.world_size = 0, 1
        self.batch_size: int | None = None
        self.resume_step = 0
        self.num_val_batches = 0
        self._skips = {"train": SkipStats(), "val": SkipStats()}

    # ---- hooks for subclasses
    def prepare_streams(self) -> None:
        """Resolve data and run preflight checks once rank, world size and batch size are known."""

    @abstractmethod
    def train_stream(self) -> torch.utils.data.IterableDataset:
        """This rank's infinite training stream of batches."""

    def val_stream(self) -> torch.utils.data.IterableDataset | None:
        """This rank's fixed evaluation stream, or None without a validation set."""
        return None

    # ---- Lightning API
    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        elif dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.global_batch_size % self.world_size:
            raise ValueError(
                f"data.global_batch_size={self.global_batch_size} is not divisible by the world size "
                f"{self.world_size}: set it to a multiple of {self.world_size}"
            )
        self.batch_size = self.global_batch_size // self.world_size
        self.prepare_streams()

    def train_dataloader(self) -> StreamLoader:
        self._require_setup()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        if self.steps_per_epoch % accumulate:
            raise ValueError(
                f"data.steps_per_epoch={self.steps_per_epoch} counts batches and must be a multiple of "
                f"accumulate_grad_batches={accumulate}: set it to {math.ceil(self.steps_per_epoch / accumulate) * accumulate}"
            )
        return StreamLoader(
            self.train_stream(),
            num_workers=self.num_workers,
            epoch_length=self.steps_per_epoch,
            stats=self._skips["train"],
            position_fn=self._trainer_position,
            start=self.resume_step,
        )

    def val_dataloader(self) -> EvalLoader | list:
        self._require_setup()
        stream = self.val_stream()
        if stream is None:
            return []
        return EvalLoader(
            stream,
            num_workers=self.num_workers,
            num_batches=self.num_val_batches,
            batch_size=self.batch_size,
            stats=self._skips["val"],
        )

    # ---- public helpers
    def set_resume_step(self, step: int) -> None:
        """Start the next training loader at batch ``step`` (only used when no trainer is attached)."""
        self.resume_step = _positive("step", step, 0)

    def skip_stats(self, split: str = "train") -> dict:
        """This rank's ``samples`` read, ``skipped`` events, ``skip_rate``, ``per_shard`` skips and first ``errors``."""
        return self._skips[split].as_dict()

    def _trainer_position(self) -> int | None:
        if self.trainer is None:
            return None
        return self.trainer.global_step * self.trainer.accumulate_grad_batches

    def _require_setup(self) -> None:
        if self.batch_size is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for a dataloader")


class WdsDataModule(StreamDataModule):
    """Readers of WebDataset shards: resolve shard sets, split them by rank, preflight, build streams."""

    def __init__(
        self,
        *,
        train_shards: str | list | None,
        val_shards: str | list | None = None,
        shuffle_buffer: int = 1000,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.shuffle_buffer = _positive("shuffle_buffer", shuffle_buffer, 0)
        self.train_set: ShardSet | None = None
        self.val_set: ShardSet | None = None

    @abstractmethod
    def codec(self) -> SampleCodec:
        """The sample decoder of this reader."""

    def check_meta(self, shard_set: ShardSet) -> None:
        """Validate the constructor's shape arguments against a shard set's index."""
        classes = shard_set.meta.get("num_classes")
        if classes is not None and classes > self.num_classes:
            raise ValueError(f"the shards hold {classes} classes: set data.num_classes={classes}")

    def prepare_streams(self) -> None:
        if self.train_shards is not None:
            self.train_set = resolve_shards(self.train_shards)
            self.check_meta(self.train_set)
            n = len(self.train_set.urls)
            if n < self.world_size:
                raise ValueError(f"train set has {n} shards for {self.world_size} ranks: {WRITE_HINT}")
            if n % self.world_size:
                warnings.warn(
                    f"{n} train shards do not split evenly over {self.world_size} ranks: samples on ranks with "
                    "fewer shards are drawn more often; write a multiple of the world size for uniform sampling",
                    stacklevel=2,
                )
        if self.val_shards is not None:
            self.val_set = resolve_shards(self.val_shards)
            self.check_meta(self.val_set)
            self.num_val_batches = self._count_val_batches(self.val_set)

    def _count_val_batches(self, shard_set: ShardSet) -> int:
        """Per-rank eval batches, equal on all ranks: the smallest rank's samples // batch size."""
        n, readers = len(shard_set.urls), self.world_size * max(1, self.num_workers)
        if n < readers:
            raise ValueError(
                f"val set has {n} shards but {self.world_size} ranks x {max(1, self.num_workers)} workers need "
                f"{readers}: {WRITE_HINT}, or set data.num_workers={max(1, n // self.world_size)}"
            )
        per_rank = min(shard_set.count(split_by_rank(shard_set.urls, r, self.world_size)) for r in range(self.world_size))
        batches = per_rank // self.batch_size
        if batches == 0:
            raise ValueError(
                f"val set has {per_rank} samples per rank, fewer than the per-rank batch {self.batch_size}: "
                "write a larger val set or lower data.global_batch_size"
            )
        return batches if self.val_batches is None else min(batches, self.val_batches)

    def _stream(self, shard_set: ShardSet, train: bool) -> ShardStream:
        return ShardStream(
            split_by_rank(shard_set.urls, self.rank, self.world_size),
            self.codec(),
            batch_size=self.batch_size,
            seed=self.seed,
            rank=self.rank,
            train=train,
            shuffle_buffer=self.shuffle_buffer,
            counts=shard_set.counts,
        )

    def train_stream(self) -> ShardStream:
        if self.train_set is None:
            raise ValueError(f"{type(self).__name__} has no train_shards: set data.train_shards")
        return self._stream(self.train_set, train=True)

    def val_stream(self) -> ShardStream | None:
        return None if self.val_set is None else self._stream(self.val_set, train=False)


class PixelWdsDataModule(WdsDataModule):
    """Pixel readers (images, video) with an optional frozen VAE that encodes batches on the device.

    With ``vae`` set, ``input_size``/``in_channels`` describe the latent the model sees and are checked
    against the VAE; the VAE lives here, not in the model, so it is never trained or checkpointed.
    Training batches get scaled posterior samples (seeded by seed, position and rank), evaluation
    batches the scaled posterior mean. Note: Lightning prefers this DataModule's
    ``on_after_batch_transfer`` over a LightningModule's.
    """

    def __init__(
        self,
        *,
        image_size: int | Sequence[int],
        vae: str | None = None,
        vae_config: str | None = None,
        vae_scale_factor: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.image_size = as_hw(image_size)
        self.vae_spec = vae
        self.vae_config = vae_config
        self.vae_scale_factor = vae_scale_factor
        self._vae = None
        self._vae_step = (-1, 0)  # (position, micro-batch) of the last encoded training batch

    def pixel_channels(self) -> int:
        """Channels of decoded pixels."""
        return 3

    def prepare_streams(self) -> None:
        if self.vae_spec is None:
            if self.input_size != self.image_size or self.in_channels != self.pixel_channels():
                raise ValueError(
                    f"without a VAE the model sees pixels: set data.input_size={list(self.image_size)} and "
                    f"data.in_channels={self.pixel_channels()} (got {list(self.input_size)}, {self.in_channels})"
                )
        elif self._vae is None:
            self._vae = load_vae(self.vae_spec, self.vae_config)
            factor = downsample_factor(self._vae)
            latent = (self.image_size[0] // factor, self.image_size[1] // factor)
            channels = self._vae.config.latent_channels
            if self.input_size != latent or self.in_channels != channels:
                raise ValueError(
                    f"the VAE turns {list(self.image_size)} pixels into {channels}x{latent[0]}x{latent[1]} latents: "
                    f"set data.input_size={list(latent)} and data.in_channels={channels}"
                )
            if self.vae_scale_factor is None:
                self.vae_scale_factor = float(self._vae.config.scaling_factor)
        super().prepare_streams()

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self._vae is None:
            return batch
        x = batch["x"]  # (N, 3, H, W) or video (N, 3, F, H, W)
        self._vae.to(x.device)
        frames = x.dim() == 5
        if frames:
            n, c, f, h, w = x.shape
            x = x.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)  # (N*F, 3, H, W)
        z = sample_latents(self._vae, x, self.vae_scale_factor, self._noise_generator(x.device))  # (M, C', h, w)
        if frames:
            z = z.reshape(n, f, *z.shape[1:]).permute(0, 2, 1, 3, 4)  # (N, C', F, h, w)
        return {**batch, "x": z.contiguous()}

    def _noise_generator(self, device: torch.device) -> torch.Generator | None:
        trainer = self.trainer
        if trainer is not None and not trainer.training:
            return None  # evaluation: the posterior mean
        position = self._trainer_position()
        position = self._vae_step[0] + 1 if position is None else position
        micro = self._vae_step[1] + 1 if position == self._vae_step[0] else 0
        self._vae_step = (position, micro)
        return torch.Generator(device=device).manual_seed(derive_seed(self.seed, "vae", position, micro, self.rank))
