"""Image shards -> latent shards: VAE posterior moments of each image and of its horizontal flip.

One output shard per input shard (same name), written to a temporary file and renamed, with a small
progress record in ``OUT/_progress/``: a rerun skips finished shards. Shards are spread over processes
(one VAE each). The scaled latent std is measured from the moments and should be close to 1. Labels,
captions and caption embeddings of the images are carried over to the latent samples.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import warnings
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from flexdit_train.data.index import ShardSet, resolve_shards, write_index
from flexdit_train.data.media import (
    MOMENTS_FIELD,
    TEXT_EMB_FIELD,
    TEXT_MASK_FIELD,
    decode_image,
    image_bytes,
    to_model_range,
)
from flexdit_train.data.stream import WorkerStats, decode_samples, read_shards
from flexdit_train.data.vae import encode_moments, load_vae, vae_name
from flexdit_train.runtime.atomic import atomic_write, publish

PROGRESS_DIR = "_progress"
# Members copied unchanged from an image sample to its latent sample.
CARRIED_FIELDS = ("cls", "txt", TEXT_EMB_FIELD, TEXT_MASK_FIELD)


@dataclass
class EncodeJob:
    """Everything a worker process needs to encode one shard."""

    url: str
    out: str
    image_size: int
    batch_size: int
    vae: str | dict
    vae_config: str | dict | None
    scale_factor: float | None


_STATE: dict = {}  # per process: the VAE and its device


def _init_process(devices: mp.Queue, threads: int) -> None:
    torch.set_num_threads(threads)
    _STATE["device"] = devices.get()


def _vae(job: EncodeJob):
    key = json.dumps([job.vae, job.vae_config], sort_keys=True, default=str)
    if _STATE.get("key") != key:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a random-weights config warns once in the parent instead
            _STATE["vae"] = load_vae(job.vae, job.vae_config).to(_STATE.get("device", "cpu"))
        _STATE["key"] = key
    return _STATE["vae"]


def progress_path(out: str) -> Path:
    """Where the record of a finished output shard lives (``OUT/_progress/<shard>.json``)."""
    return Path(out).parent / PROGRESS_DIR / (Path(out).name + ".json")


def output_shards(shards: str | list, out: str | Path) -> tuple[ShardSet, list[str]]:
    """The resolved input set and its output paths: one shard of the same file name in ``out`` per input."""
    source = resolve_shards(shards)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(u).name for u in source.urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards share file names: encode each directory into its own OUT")
    return source, [str(out / n) for n in names]


def finish_shard(tmp: str, out: str, record: dict) -> None:
    """Move a written shard into place, then its progress record: a record always means a complete shard."""
    publish(tmp, out)
    text = json.dumps(record)
    atomic_write(progress_path(out), lambda progress_tmp: Path(progress_tmp).write_text(text))


def encode_shard(job: EncodeJob) -> dict:
    """Encode one image shard into ``job.out``; return its progress record (counts and moment sums)."""
    vae = _vae(job)
    device = next(vae.parameters()).device
    scale = float(vae.config.scaling_factor if job.scale_factor is None else job.scale_factor)
    stats = WorkerStats()
    meta = {"scale_factor": scale, "vae": vae_name(job.vae), "image_size": job.image_size}
    sums, written = None, 0
    tmp = f"{job.out}.tmp{os.getpid()}"

    def decode(sample: dict) -> dict:
        pixels = decode_image(image_bytes(sample), job.image_size).transpose(2, 0, 1)  # (3, H, W) uint8
        carried = {name: sample[name] for name in CARRIED_FIELDS if name in sample}
        return {"key": sample["__key__"], "x": np.ascontiguousarray(pixels), "carried": carried}

    rows = decode_samples(read_shards([dict(url=job.url)], stats), decode, stats)
    with wds.TarWriter(tmp, mtime=0) as writer:  # an int mtime avoids a PAX header per member
        batch = []
        for row in chain(rows, [None]):  # None flushes the last partial batch
            if row is not None:
                batch.append(row)
            if batch and (row is None or len(batch) == job.batch_size):
                x = to_model_range(torch.from_numpy(np.stack([r["x"] for r in batch]))).to(device)  # (N, 3, H, W)
                mean, logvar = encode_moments(vae, torch.cat([x, x.flip(-1)]))  # (2N, C, h, w) each
                moments = torch.stack([mean, logvar], 1).view(2, len(batch), 2, *mean.shape[1:])  # (flip, N, 2, C, h, w)
                moments = moments.transpose(0, 1).half().cpu().numpy()  # (N, 2, 2, C, h, w)
                m, lv = mean[: len(batch)].double(), logvar[: len(batch)].double()  # unflipped (N, C, h, w)
                part = torch.stack([m.sum((0, 2, 3)), (m * m + lv.exp()).sum((0, 2, 3))]).cpu()  # (2, C)
                sums = part if sums is None else sums + part
                for r, sample_moments in zip(batch, moments):
                    writer.write({"__key__": r["key"], MOMENTS_FIELD: sample_moments, "json": meta, **r["carried"]})
                written += len(batch)
                batch = []
    if sums is None:
        os.remove(tmp)
        raise ValueError(f"{job.url} has no decodable images: run `python -m flexdit_train.shards verify` on it")
    shape = list(mean.shape[1:])  # (C, h, w)
    record = {
        "url": job.url,
        "out": job.out,
        "count": written,
        "skipped": dict(stats.lost),
        "latent_shape": shape,
        "elements": written * math.prod(shape),
        "sum": sums[0].tolist(),
        "sumsq": sums[1].tolist(),
        **meta,
    }
    finish_shard(tmp, job.out, record)
    return record


def latent_std(records: list[dict]) -> dict:
    """Mean/std of the unscaled posterior (pooled and per channel) and the std after scaling."""
    elements = sum(r["elements"] for r in records)
    sums = np.sum([r["sum"] for r in records], 0)  # (C,)
    sumsq = np.sum([r["sumsq"] for r in records], 0)  # (C,)
    per_channel = elements / len(sums)
    mean_c = sums / per_channel
    std_c = np.sqrt(np.maximum(sumsq / per_channel - mean_c**2, 0.0))
    mean = sums.sum() / elements
    std = math.sqrt(max(sumsq.sum() / elements - mean**2, 0.0))
    scale = records[0]["scale_factor"]
    return {"mean": mean, "std": std, "std_scaled": std * scale, "channel_mean": mean_c.tolist(),
            "channel_std": std_c.tolist(), "scale_factor": scale}


def encode_latent_shards(
    shards: str | list,
    out: str | Path,
    *,
    vae: str | Mapping,
    vae_config: str | Mapping | None = None,
    image_size: int = 256,
    batch_size: int = 32,
    workers: int = 1,
    device: str = "cpu",
    scale_factor: float | None = None,
    prefix: str | None = None,
    std_tolerance: float = 0.3,
    log=print,
) -> dict:
    """Encode every shard of ``shards`` into ``OUT`` (skipping finished ones); write and return the index."""
    source, targets = output_shards(shards, out)
    out = Path(out)
    if prefix is None:
        prefix = source.meta.get("prefix") or "latents"
    vae_spec = dict(vae) if isinstance(vae, Mapping) else str(vae)
    config = dict(vae_config) if isinstance(vae_config, Mapping) else vae_config
    if isinstance(vae_spec, dict) or vae_spec.endswith(".json"):
        warnings.warn("encoding with a randomly initialised VAE (a config, not weights): for tests only", stacklevel=2)
    jobs = [EncodeJob(u, target, image_size, batch_size, vae_spec, config, scale_factor)
            for u, target in zip(source.urls, targets)]
    records, todo = {}, []
    for job in jobs:
        progress = progress_path(job.out)
        if progress.exists() and os.path.exists(job.out):
            records[job.url] = json.loads(progress.read_text())
        else:
            todo.append(job)
    log(f"encoding {len(todo)} of {len(jobs)} shards ({len(jobs) - len(todo)} already done) into {out}")
    for record in _run(todo, workers, device):
        records[record["url"]] = record
        skipped = sum(record["skipped"].values())
        log(f"  {Path(record['out']).name}: {record['count']} samples" + (f", {skipped} skipped" if skipped else ""))
    ordered = [records[job.url] for job in jobs]
    stats = latent_std(ordered)
    first = ordered[0]
    index = write_index(
        out / f"{prefix}.json",
        [(r["out"], r["count"]) for r in ordered],
        prefix=prefix, kind="latent", latent_shape=first["latent_shape"], scale_factor=first["scale_factor"],
        vae=first["vae"], image_size=image_size, classes=source.meta.get("classes"),
        num_classes=source.meta.get("num_classes"), latent_stats=stats,
    )
    log(f"latent std after scaling: {stats['std_scaled']:.4f} (unscaled std {stats['std']:.4f}, mean {stats['mean']:.4f}, "
        f"scale factor {stats['scale_factor']}) over {index['total']} samples")
    if abs(stats["std_scaled"] - 1.0) > std_tolerance:
        warnings.warn(
            f"latent std after scaling is {stats['std_scaled']:.3f}, far from 1: the scale factor {stats['scale_factor']} "
            f"does not fit this VAE; {1 / max(stats['std'], 1e-12):.5f} (1 / unscaled std) would; set data.scale_factor "
            "(the shards store unscaled moments) or pass --scale-factor",
            stacklevel=2,
        )
    return index


def _run(jobs: list[EncodeJob], workers: int, device: str):
    """Yield progress records as shards finish, in this process or in ``workers`` spawned processes."""
    if workers <= 1 or len(jobs) <= 1:
        _STATE.setdefault("device", device)
        for job in jobs:
            yield encode_shard(job)
        return
    context = mp.get_context("spawn")  # fork after torch's thread pools start can deadlock
    devices = context.Queue()
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    for i in range(workers):
        devices.put(f"cuda:{i % gpus}" if gpus else device)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_process, initargs=(devices, threads)) as pool:
        for future in as_completed([pool.submit(encode_shard, job) for job in jobs]):
            yield future.result()
