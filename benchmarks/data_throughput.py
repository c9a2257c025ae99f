"""Samples/s of the training data pipelines: latent shards and JPEG shards, with 0 and 2 workers.

Writes temporary shards shaped like the real ones (SD-VAE latents of 256 px images: moments (2, 2, 4, 32, 32)
float16; ImageNet-sized JPEGs cropped to 256 px), then times the DataModules' training loaders after a warmup.

    python benchmarks/data_throughput.py                 # prints a Markdown table
    python benchmarks/data_throughput.py --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from flexdit_train.data import ImageWdsDataModule, LatentsWdsDataModule
from flexdit_train.data.index import write_index
from flexdit_train.data.latents import MOMENTS_FIELD


def write_latent_shards(out: Path, samples: int, per_shard: int) -> str:
    """Random posterior moments in the latent shard format, with an index."""
    rng = np.random.default_rng(0)
    written = []
    for start in range(0, samples, per_shard):
        path = out / f"latents-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as writer:  # an int mtime avoids a PAX header per member
            for i in range(start, min(samples, start + per_shard)):
                moments = rng.standard_normal((2, 2, 4, 32, 32)).astype(np.float16)  # (flip, mean|logvar, C, h, w)
                moments[:, 1] = -4.0
                writer.write({"__key__": f"s{i:08d}", MOMENTS_FIELD: moments, "cls": i % 1000,
                              "json": {"scale_factor": 0.18215, "vae": "benchmark"}})
        written.append((str(path), min(samples, start + per_shard) - start))
    write_index(out / "latents.json", written, kind="latent", latent_shape=[4, 32, 32], scale_factor=0.18215, num_classes=1000)
    return str(out / "latents.json")


def write_jpeg_shards(out: Path, samples: int, per_shard: int) -> str:
    """Smooth random 500x375 JPEGs (about ImageNet's median size and file size)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    written = []
    for start in range(0, samples, per_shard):
        path = out / f"images-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as writer:  # an int mtime avoids a PAX header per member
            for i in range(start, min(samples, start + per_shard)):
                a, b, c = rng.uniform(0.01, 0.05, 3)
                base = np.stack([np.sin(xx * a + i), np.cos(yy * b), np.sin((xx + yy) * c)], -1)  # (375, 500, 3)
                pixels = ((base + 1) * 110 + rng.integers(0, 30, (375, 500, 3))).clip(0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                writer.write({"__key__": f"s{i:08d}", "jpg": buffer.getvalue(), "cls": i % 1000})
        written.append((str(path), min(samples, start + per_shard) - start))
    write_index(out / "images.json", written, kind="image", num_classes=1000)
    return str(out / "images.json")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(datamodule, warmup: int) -> tuple[float, float]:
    """Wall-clock samples/s after ``warmup`` batches, and CPU microseconds per sample over the whole epoch.

    The CPU figure includes worker start-up and shuffle-buffer filling (so it is pessimistic) but not the
    load of other processes, which on a shared machine makes the wall-clock figure noisy.
    """
    datamodule.setup("fit")
    cpu, total, count, start = cpu_seconds(), 0, 0, None
    for i, batch in enumerate(datamodule.train_dataloader()):  # the loader's workers are joined at its end
        total += len(batch["y"])
        if i == warmup:
            start = time.perf_counter()
        if i >= warmup:
            count += len(batch["y"])
    wall = count / (time.perf_counter() - start)
    return wall, (cpu_seconds() - cpu) / total * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent-samples", type=int, default=8000)
    parser.add_argument("--jpeg-samples", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--latent-batches", type=int, default=150, help="batches timed per latent run")
    parser.add_argument("--jpeg-batches", type=int, default=30, help="batches timed per JPEG run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loaders' work is per-sample Python/PIL; workers give the parallelism
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        latents = write_latent_shards(Path(tmp), args.latent_samples, 500)
        images = write_jpeg_shards(Path(tmp), args.jpeg_samples, 100)
        common = dict(global_batch_size=args.batch_size, seed=0, num_classes=1000, val_shards=None)
        for workers in args.workers:
            dm = LatentsWdsDataModule(train_shards=latents, num_workers=workers, input_size=32, in_channels=4,
                                      steps_per_epoch=args.latent_batches, shuffle_buffer=2000, **common)
            wall, cpu = measure(dm, 5)
            results.append({"pipeline": "latents 4x32x32 (fp16 moments, flip + posterior sample)", "workers": workers,
                            "samples_per_s": wall, "cpu_us_per_sample": cpu})
            dm = ImageWdsDataModule(train_shards=images, num_workers=workers, input_size=256, in_channels=3,
                                    image_size=256, steps_per_epoch=args.jpeg_batches, **common)
            wall, cpu = measure(dm, 2)
            results.append({"pipeline": "JPEG 500x375 -> ADM crop 256 + flip", "workers": workers,
                            "samples_per_s": wall, "cpu_us_per_sample": cpu})
    print(f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, batch {args.batch_size}")
    print("| pipeline | workers | samples/s (wall) | CPU µs/sample | samples/s per CPU second |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['pipeline']} | {r['workers']} | {r['samples_per_s']:,.0f} | {r['cpu_us_per_sample']:,.0f} "
              f"| {1e6 / r['cpu_us_per_sample']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
