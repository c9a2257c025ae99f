"""Per-rank WebDataset streams: seeded resampled training streams, fixed evaluation sets, skip counting.

Training: each rank reads a disjoint subset of the shards (``urls[rank::world]``), resampled with
replacement forever; every worker's RNGs derive from ``(seed, position, rank, worker)`` where
``position`` is the rank's batch index at which the epoch's stream starts. A resume in the middle of an
epoch restarts that epoch's stream and fast-forwards it inside the workers to the resumed batch, so the
batches after a resume are exactly those an uninterrupted run sees (the cost: re-reading at most one
epoch, ``steps_per_epoch`` batches, of this rank's data).
Evaluation: a fixed, non-resampled shard split with exactly the same number of batches on every rank.
Lost samples (missing from damaged shards, undecodable) are counted inside the workers and travel to the
main process inside the batches.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice
from typing import Protocol

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

STATS_KEY = "_data_stats"  # batch entry carrying a worker's skip counts since its previous batch
MAX_WARNINGS_PER_WORKER = 5


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ints and strings, identical in every process (no salted ``hash()``)."""
    words = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    if any(w < 0 for w in words):
        raise ValueError(f"seed parts must be non-negative, got {parts}: use seed >= 0")
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def worker_info() -> tuple[int, int]:
    """``(worker_id, num_workers)`` of the current DataLoader worker, ``(0, 1)`` in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def split_by_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Explicit node splitter: rank ``r`` owns shards ``r, r + world, ...`` (disjoint across ranks)."""
    return urls[rank::world_size]


class WorkerStats:
    """Samples read and samples lost inside one worker, handed out as deltas with each batch.

    Both are counted where they happen in the stream: samples read, and samples a damaged shard did not
    deliver (its index count minus what was read), when the tar is read, ahead of the shuffle buffer;
    undecodable samples when they are decoded. ``lost`` holds both, per shard. ``met`` counts the samples
    of the shards whose reading has ended (read plus never read): a shard still being read has not
    reported its losses yet, so rates are taken over finished shards only.
    """

    def __init__(self) -> None:
        self.read = 0
        self.met = 0
        self.lost: Counter[str] = Counter()
        self.errors: dict[str, str] = {}
        self.warned = 0

    @property
    def skipped(self) -> int:
        """Samples lost so far (missing from shards or undecodable)."""
        return sum(self.lost.values())

    def skip(self, url: str, err: BaseException | str, count: int = 1) -> None:
        """Count ``count`` samples of ``url`` as lost (never read from a damaged tar, or undecodable)."""
        self.lost[url] += count
        message = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        self.errors.setdefault(url, message[:300])
        if self.warned < MAX_WARNINGS_PER_WORKER:
            self.warned += 1
            log.warning("lost %d sample(s) of %s: %s", count, url, message[:300])

    def pop_delta(self) -> dict:
        delta = {"read": self.read, "met": self.met, "lost": dict(self.lost), "errors": self.errors}
        self.read, self.met, self.lost, self.errors = 0, 0, Counter(), {}
        return delta


class SkipStats:
    """Main-process totals of the deltas carried by batches (one object per split)."""

    def __init__(self) -> None:
        self.samples = 0
        self.met = 0
        self.per_shard: Counter[str] = Counter()
        self.errors: dict[str, str] = {}

    def update(self, delta: dict) -> None:
        self.samples += delta["read"]
        self.met += delta["met"]
        self.per_shard.update(delta["lost"])
        for url, message in delta["errors"].items():
            self.errors.setdefault(url, message)

    @property
    def skipped(self) -> int:
        return sum(self.per_shard.values())

    def as_dict(self) -> dict:
        """``samples`` read from the shards, ``met`` (the samples of the shards read to their end, whether
        read or missing), ``skipped`` samples lost (missing from damaged shards or undecodable),
        ``skip_rate`` = skipped / met, the share of the data that never reached a batch; ``per_shard``
        losses and the first error message per shard."""
        return {
            "samples": self.samples,
            "met": self.met,
            "skipped": self.skipped,
            "skip_rate": min(1.0, self.skipped / self.met) if self.met else 0.0,
            "per_shard": dict(self.per_shard),
            "errors": dict(self.errors),
        }


def read_shards(
    shards: Iterable[dict],
    stats: WorkerStats,
    counts: dict[str, int] | None = None,
    max_bad_in_row: int = 100,
) -> Iterator[dict]:
    """Samples from a stream of ``dict(url=...)``; unreadable or truncated shards are counted, not fatal.

    Uses webdataset's tar iterators. A shard that raises (truncated tar, duplicate member) or ends early
    loses the samples its index count promised beyond those read; without a count, a shard that raises
    counts one lost sample (a lower bound: how many it held is unknown).
    """
    bad_in_row = 0
    for shard in shards:
        url = shard["url"]
        expected = counts.get(url) if counts else None
        read = 0
        try:
            with open(url, "rb") as stream:
                files = wds.tariterators.tar_file_expander([dict(url=url, stream=stream)])
                for sample in wds.tariterators.group_by_keys(files):
                    read += 1
                    stats.read += 1
                    yield sample
            if expected is not None and read < expected:
                stats.skip(url, f"shard ended after {read} of {expected} samples (truncated at a member boundary?)",
                           expected - read)
            stats.met += max(read, expected or 0)
        except Exception as err:  # a damaged shard must not end the run; the skip rate decides
            missing = max(expected - read, 1) if expected is not None else 1
            stats.skip(url, err, missing)
            stats.met += read + missing
        bad_in_row = 0 if read else bad_in_row + 1
        if bad_in_row >= max_bad_in_row:
            raise RuntimeError(
                f"{bad_in_row} shards in a row yielded no samples (last: {url}): "
                "run `python -m flexdit_train.shards verify` on the shard set and rewrite the damaged shards"
            )


def decode_samples(samples: Iterable[dict], decode: Callable[[dict], dict], stats: WorkerStats) -> Iterator[dict]:
    """Apply ``decode``; samples that raise are counted against their shard and dropped."""
    for sample in samples:
        try:
            row = decode(sample)
        except Exception as err:  # undecodable sample: counted, and the skip rate decides
            stats.skip(sample.get("__url__", "?"), err)
            continue
        yield row


def first_sample(urls: list[str]) -> dict:
    """The first readable raw sample of a shard list, for preflight checks of what the shards hold."""
    for sample in read_shards([dict(url=u) for u in urls[:3]], WorkerStats()):
        return sample
    raise ValueError(f"could not read a sample from {urls[:3]}: run `python -m flexdit_train.shards verify` on the set")


class SampleCodec(Protocol):
    """Turns one raw WebDataset sample into arrays, and a stacked batch of them into model space."""

    def decode(self, sample: dict, rng: np.random.Generator, train: bool) -> dict:
        """Return ``{"x": np.ndarray, "key": str, "y": int (class data), ...extras}`` for one raw sample."""

    def finalize(self, x: torch.Tensor, generator: torch.Generator, train: bool) -> torch.Tensor:
        """Map the stacked ``x`` of a batch into model space (float32)."""


def collate(rows: list[dict], codec: SampleCodec, generator: torch.Generator, train: bool) -> dict:
    """Stack decoded rows into ``{"x", "y" (if rows have labels), "key", ...}``; ``x`` goes through
    ``codec.finalize``, other array fields (e.g. caption embeddings) are stacked, the rest become lists."""
    batch = {"x": codec.finalize(torch.from_numpy(np.stack([r["x"] for r in rows])), generator, train)}
    if "y" in rows[0]:
        batch["y"] = torch.tensor([r["y"] for r in rows], dtype=torch.int64)  # (N,)
    for name in sorted({name for r in rows for name in r} - {"x", "y"}):
        values = [r.get(name) for r in rows]
        if all(isinstance(v, np.ndarray) for v in values):
            batch[name] = torch.from_numpy(np.stack(values))  # (N, ...)
        else:
            batch[name] = values
    return batch


def _constant(value: int) -> int:
    return value


class ShardStream(IterableDataset):
    """One rank's batches from its shard subset; picklable plain state, pipeline built inside each worker."""

    def __init__(
        self,
        urls: list[str],
        codec: SampleCodec,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        train: bool = True,
        shuffle_buffer: int = 1000,
        counts: dict[str, int] | None = None,
        max_bad_in_row: int = 100,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError(f"rank {rank} has no shards: write more shards than ranks")
        self.urls = list(urls)
        self.codec = codec
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.train = train
        self.shuffle_buffer = shuffle_buffer
        self.counts = counts
        self.max_bad_in_row = max_bad_in_row
        self.position = 0  # set by the loader before each iteration: the rank's batch index at the epoch start
        self.skip = 0  # set by the loader: batches of this epoch already trained on (a mid-epoch resume)

    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_info()
        # The DataLoader fetches batch i of an epoch from worker i % workers. Resumed `skip` batches into the
        # epoch, it still fetches from worker 0 first, so worker w plays the stream of the worker that the
        # uninterrupted run would fetch from next, (w + skip) % workers, and skips that stream's batches that
        # came before the resume point.
        stream_id = (worker + self.skip) % workers if self.train else worker
        to_skip = _batches_before(self.skip, stream_id, workers) if self.train else 0
        stats = WorkerStats()
        base = derive_seed(self.seed, self.position, self.rank, stream_id) if self.train else self.seed
        if self.train:
            # wds.ResampledShards with deterministic=True seeds its RNG only from worker_seed(), epoch (0 in a
            # fresh worker) and seed: all explicit ints here, so the shard order is reproducible
            shards = wds.ResampledShards(self.urls, seed=0, deterministic=True, worker_seed=partial(_constant, base))
        else:
            shards = wds.split_by_worker(iter(wds.SimpleShardList(self.urls)))
        samples = read_shards(shards, stats, self.counts, self.max_bad_in_row)
        if self.train and self.shuffle_buffer > 1:
            # shuffle raw bytes before decoding to keep the buffer small
            shuffle = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2,
                                          seed=derive_seed(base, "shuffle"))
            samples = shuffle(samples)
        rng = np.random.default_rng(derive_seed(base, "sample"))
        generator = torch.Generator().manual_seed(derive_seed(base, "batch"))
        rows: list[dict] = []
        for row in decode_samples(samples, partial(self.codec.decode, rng=rng, train=self.train), stats):
            rows.append(row)
            if len(rows) == self.batch_size:
                batch = collate(rows, self.codec, generator, self.train)  # also when skipped: same RNG draws
                rows = []
                if to_skip:
                    to_skip -= 1
                    stats.pop_delta()  # counted by the run before the checkpoint
                    continue
                yield {**batch, STATS_KEY: stats.pop_delta()}
        # only a fixed evaluation set ends: hand out the partial batch and the last counts
        tail = collate(rows, self.codec, generator, self.train) if rows else {}
        yield {**tail, STATS_KEY: stats.pop_delta()}


def _batches_before(skip: int, stream_id: int, streams: int) -> int:
    """How many of the first ``skip`` batches of an epoch came from stream ``stream_id`` of ``streams``."""
    return max(0, -(-(skip - stream_id) // streams))


def make_dataloader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    """A DataLoader over already-batched items; fresh (non-persistent) workers see the current position.

    Its own generator: without one, every iterator draws its base seed from the global torch RNG that
    training's timestep and noise draws share, and a resumed run creates its iterator at another moment
    than the uninterrupted run, which would shift every later draw. The streams seed all their RNGs
    themselves, so the base seed itself is unused.
    """
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
    )


class StreamLoader:
    """Training loader: ``epoch_length`` batches per rank per epoch from an infinite, seeded stream.

    At every ``iter()`` the loader continues from the current position (the trainer's
    ``global_step * accumulate_grad_batches`` when ``position_fn`` gives one, else its own cursor) to the
    next multiple of ``epoch_length``: the epoch's stream is seeded from the epoch's first position and,
    after a resume mid-epoch, fast-forwarded to the current one. ``len()`` is the full epoch, as Lightning
    counts it even when it resumes mid-epoch. The state (position, worker count) travels in checkpoints: the
    batch order depends on the worker count, so resuming with another one cannot be exact and says so.
    (The stream is deliberately not called ``dataset``: Lightning would then warn that the length of an
    IterableDataset may be wrong.)
    """

    def __init__(
        self,
        stream: IterableDataset,
        *,
        num_workers: int,
        epoch_length: int,
        stats: SkipStats,
        position_fn: Callable[[], int | None] | None = None,
        start: int = 0,
    ) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.epoch_length = epoch_length
        self.stats = stats
        self.position_fn = position_fn
        self.cursor = start  # the position of the next batch this loader yields

    def __len__(self) -> int:
        return self.epoch_length

    def position(self) -> int:
        """The rank's current batch index: the trainer's when attached, else the batches yielded so far."""
        position = self.position_fn() if self.position_fn is not None else None
        return self.cursor if position is None else position

    def state_dict(self) -> dict:
        return {"position": self.position(), "num_workers": self.num_workers}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["position"])
        saved = state.get("num_workers")
        if saved is not None and int(saved) != self.num_workers:
            log.warning(
                "resuming with data.num_workers=%d but the checkpoint was trained with %d: batches are dealt "
                "round-robin from the workers, so from here on they differ from an uninterrupted run's "
                "(set data.num_workers=%d for an exact resume)", self.num_workers, int(saved), int(saved))

    def __iter__(self) -> Iterator[dict]:
        start = self.position()
        into_epoch = start % self.epoch_length
        self.stream.position = start - into_epoch
        self.stream.skip = into_epoch
        self.cursor = start
        for batch in islice(make_dataloader(self.stream, self.num_workers), self.epoch_length - into_epoch):
            self.stats.update(batch.pop(STATS_KEY))
            self.cursor += 1
            yield batch


def _cat(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: torch.cat([a[k], b[k]]) if isinstance(a[k], torch.Tensor) else a[k] + b[k] for k in a}


def _rows(batch: dict | None) -> int:
    return 0 if batch is None else len(batch["key"])


def _head(batch: dict, n: int) -> tuple[dict, dict]:
    return {k: v[:n] for k, v in batch.items()}, {k: v[n:] for k, v in batch.items()}


class EvalLoader:
    """Evaluation loader: exactly ``num_batches`` full batches on every rank from a fixed stream.

    Worker outputs are re-batched in the main process; if skipped samples leave a rank short, its stream
    is read again from the start so that every rank still runs the same number of steps (no DDP hang).
    """

    def __init__(
        self, stream: IterableDataset, *, num_workers: int, num_batches: int, batch_size: int, stats: SkipStats
    ) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.stats = stats

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        emitted = 0
        while emitted < self.num_batches:
            pending, rows = None, 0
            for part in make_dataloader(self.stream, self.num_workers):
                self.stats.update(part.pop(STATS_KEY))
                if not part:
                    continue
                rows += _rows(part)
                pending = _cat(pending, part)
                while _rows(pending) >= self.batch_size and emitted < self.num_batches:
                    batch, pending = _head(pending, self.batch_size)
                    emitted += 1
                    yield batch
                if emitted == self.num_batches:
                    return
            if rows == 0:
                raise RuntimeError("the evaluation stream yielded no samples: verify the val shards")
