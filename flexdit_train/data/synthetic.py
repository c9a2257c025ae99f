"""Random tensors with the shapes of real data, deterministic per seed: for smoke tests only."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset

from flexdit_train.data.base import StreamDataModule
from flexdit_train.data.stream import STATS_KEY, derive_seed, worker_info


class SyntheticStream(IterableDataset):
    """Batches of N(0, 1) ``x`` and uniform ``y``; batch i of an epoch is seeded by (seed, rank, position, i), so
    any batch can be produced directly: a resume ``skip`` batches into the epoch starts at batch ``skip``."""

    def __init__(
        self, shape: tuple[int, ...], num_classes: int, *, batch_size: int, seed: int, rank: int, train: bool,
        num_batches: int | None = None,
    ) -> None:
        super().__init__()
        self.shape, self.num_classes, self.batch_size = shape, num_classes, batch_size
        self.seed, self.rank, self.train, self.num_batches = seed, rank, train, num_batches
        self.position = 0  # set by the loader: the epoch's first batch index
        self.skip = 0  # set by the loader: batches of the epoch already trained on

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_info()
        # the loader fetches round-robin from worker 0 on: worker w serves batches skip + w, skip + w + workers, ...
        index = worker + (self.skip if self.train else 0)
        while self.num_batches is None or index < self.num_batches:
            # evaluation batches depend only on their index: the same fixed set at every validation
            parts = ("train", self.position, index) if self.train else ("val", index)
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, *parts))
            yield {
                "x": torch.randn((self.batch_size, *self.shape), generator=generator),  # (N, C, [F,] H, W)
                "y": torch.randint(0, self.num_classes, (self.batch_size,), generator=generator),  # (N,)
                "key": [f"synthetic-r{self.rank}-{'-'.join(map(str, parts))}-{i}" for i in range(self.batch_size)],
                STATS_KEY: {"read": self.batch_size, "met": self.batch_size, "lost": {}, "errors": {}},
            }
            index += num_workers


class SyntheticDataModule(StreamDataModule):
    """Random batches shaped like images (N, C, H, W) or, with ``num_frames``, video (N, C, F, H, W).

    Other arguments: those of :class:`~flexdit_train.data.base.StreamDataModule` (batch, seed, shapes).
    """

    def __init__(
        self, *, num_frames: int | None = None, steps_per_epoch: int = 100, val_batches: int | None = 2, **kwargs
    ) -> None:
        super().__init__(steps_per_epoch=steps_per_epoch, val_batches=val_batches, **kwargs)
        frames = () if num_frames is None else (num_frames,)
        self.shape = (self.in_channels, *frames, *self.input_size)

    def prepare_streams(self) -> None:
        self.num_val_batches = self.val_batches or 0

    def _stream(self, train: bool) -> SyntheticStream:
        return SyntheticStream(
            self.shape, self.num_classes, batch_size=self.batch_size, seed=self.seed, rank=self.rank, train=train,
            num_batches=None if train else self.num_val_batches,
        )

    def train_stream(self) -> SyntheticStream:
        return self._stream(train=True)

    def val_stream(self) -> SyntheticStream | None:
        return self._stream(train=False) if self.num_val_batches else None
