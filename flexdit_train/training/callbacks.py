"""Training callbacks: throughput/memory monitoring and fixed-seed sample grids from the EMA model."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch

from flexdit_train.diffusion import create_diffusion
from flexdit_train.sampling import generate, save_grid


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` and at the end of training, sample a fixed grid from the EMA weights.

    Labels cycle through the classes and the noise comes from ``seed``, so grids from different steps
    and runs are directly comparable. Written to ``<dirpath>/step_XXXXXXX.png`` and ``<dirpath>/final.png``
    on rank 0, and sent to loggers that take images (W&B).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 0,
        num_images: int = 64,
        sampling_steps: str = "ddim50",
        cfg_scale: float = 1.0,
        guide_all_channels: bool = False,
        seed: int = 0,
    ):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.sampling_steps = sampling_steps
        self.cfg_scale = cfg_scale
        self.guide_all_channels = guide_all_channels
        self.seed = seed
        self._last_grid_step = -1

    @torch.no_grad()
    def make_grid(self, pl_module: L.LightningModule, filename: str) -> Path:
        model = pl_module.ema
        diffusion = create_diffusion(self.sampling_steps, learn_sigma=model.learn_sigma)
        labels = torch.arange(self.num_images) % model.num_classes
        images = generate(
            model,
            diffusion,
            labels,
            self.seed,
            range(self.num_images),
            cfg_scale=self.cfg_scale,
            guide_all_channels=self.guide_all_channels,
        )
        path = save_grid(images.clamp(-1, 1), self.dirpath / filename)
        for logger in pl_module.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples/grid", images=[str(path)], step=pl_module.global_step)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_grid_step
        if due and trainer.is_global_zero:
            self.make_grid(pl_module, f"step_{step:07d}.png")
            self._last_grid_step = step

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            path = self.make_grid(pl_module, "final.png")
            print(f"sample grid: {path}")


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class TrainingMonitor(L.Callback):
    """Logs images/s, achieved TFLOP/s per device (from the analytic FLOPs model), peak memory, samples seen.

    Lightning's ThroughputMonitor assumes one FLOPs count for every batch; here each step's FLOPs depend
    on its patch size, so the module reports ``last_step_flops`` and this callback accumulates them.
    """

    def __init__(self, log_every_n_steps: int = 10):
        self.log_every_n_steps = log_every_n_steps
        self._window_start: float | None = None
        self._window_samples = 0
        self._window_flops = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._window_start is None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._window_samples += batch["x"].shape[0]
        self._window_flops += pl_module.last_step_flops
        step = trainer.global_step
        if step == 0 or step % self.log_every_n_steps or trainer.fit_loop._should_accumulate():
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._window_start
        metrics = {
            "perf/images_per_s": self._window_samples * trainer.world_size / elapsed,
            "perf/tflops_per_device": self._window_flops / elapsed / 1e12,
            "perf/peak_memory_gib": peak_memory_gib(trainer.strategy.root_device),
            "perf/samples_seen": float(pl_module.samples_seen),
        }
        pl_module.log_dict(metrics, rank_zero_only=True)
        self._window_start, self._window_samples, self._window_flops = time.perf_counter(), 0, 0.0
