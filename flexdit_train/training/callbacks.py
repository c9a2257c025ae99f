"""Training callbacks: throughput/memory monitoring and fixed-seed sample grids from the EMA model."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch

from flexdit_train.models.arch import arch_of
from flexdit_train.sampling.outputs import save_grid
from flexdit_train.sampling.pipeline import Sampler, latent_decoder, text_condition


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` and at the end of training, sample fixed grids from the EMA weights.

    Labels cycle through the classes (text models: the captions of the first samples of
    ``prompt_shards``) and the noise comes from ``seed``, so grids from different steps and runs are
    directly comparable. One grid per entry of ``budgets`` (budget config nodes as in conf/budget/;
    flexible models show what each compute budget looks like), written by rank 0 to
    ``<dirpath>/<budget>_step_XXXXXXX.png`` and ``<dirpath>/<budget>_final.png`` (videos: one row of
    frames each) and sent to loggers that take images (W&B). Every rank samples: an FSDP-sharded EMA
    needs all ranks in each forward.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 0,
        num_images: int = 64,
        sampling_steps: str = "ddim50",
        cfg_scale: float = 1.0,
        guide_all_channels: bool | None = None,
        clip_denoised: bool = False,
        budgets: list | None = None,
        vae: str | None = None,
        latent_scale_factor: float = 0.18215,
        seed: int = 0,
        prompt_shards: str | None = None,
    ):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.sampling_steps = sampling_steps
        self.cfg_scale = cfg_scale
        self.guide_all_channels = guide_all_channels
        self.clip_denoised = clip_denoised
        self.budgets = list(budgets) if budgets else [{"mode": "static", "name": "static"}]
        self.vae = vae
        self.latent_scale_factor = latent_scale_factor
        self.seed = seed
        self.prompt_shards = prompt_shards
        self._decode = None
        self._last_grid_step = -1

    @torch.no_grad()
    def make_grids(self, trainer, pl_module: L.LightningModule, suffix: str) -> list[Path]:
        model = pl_module.ema
        if self.vae is not None and self._decode is None:
            self._decode = latent_decoder(self.vae, self.latent_scale_factor, pl_module.device)
        if arch_of(model).conditioning == "text":
            if self.prompt_shards is None:
                raise ValueError("sample grids of a text model need captions: set callbacks.sample_grid.prompt_shards")
            condition, _ = text_condition(model, self.num_images, prompt_shards=self.prompt_shards)
        else:
            condition = torch.arange(self.num_images) % model.num_classes
        paths = []
        for budget in self.budgets:
            sampler = Sampler.for_model(model, budget, self.sampling_steps, self.cfg_scale, self._decode,
                                        guide_all_channels=self.guide_all_channels, clip_denoised=self.clip_denoised)
            images = sampler.generate(condition, self.seed, range(self.num_images))
            if trainer.is_global_zero:
                name = budget.get("name", budget["mode"])
                path = save_grid(images.clamp(-1, 1), self.dirpath / f"{name}_{suffix}.png")
                for logger in pl_module.loggers:
                    if hasattr(logger, "log_image"):
                        logger.log_image(key=f"samples/{name}", images=[str(path)], step=pl_module.global_step)
                paths.append(path)
        return paths

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_grid_step:
            self.make_grids(trainer, pl_module, f"step_{step:07d}")
            self._last_grid_step = step

    def on_train_end(self, trainer, pl_module) -> None:
        for path in self.make_grids(trainer, pl_module, "final"):
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
