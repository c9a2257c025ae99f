"""Sampling app: ``python -m flexdit_train.sample checkpoint=PATH budget=paper_130_130 num_samples=64``.

Writes into the run directory: ``grid.png`` (the first ``grid_size`` samples; videos one row of frames
each), ``samples.npz`` in the ADM evaluator layout (``arr_0`` uint8 NHWC images or NFHWC videos,
``arr_1`` int64 labels of class-conditional models), ``videos/sample_XXXXXX.mp4`` for video models and
``samples.json`` (:func:`~flexdit_train.sampling.outputs.sampling_card`: the compute fraction, NFEs,
every sampling knob and the wall-clock). Text models sample from ``prompts`` (encoded with the training
captions' ``text_encoder``) or from the stored embeddings of ``prompt_shards``; sample ``i`` gets prompt
``i mod P``. Noise and labels of sample ``i`` derive from ``(seed, i)`` only, so the same command gives
the same images on any number of GPUs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from flexdit_train import CONF_DIR
from flexdit_train.models.arch import arch_of
from flexdit_train.runtime.errors import UserError, check_range, report_errors
from flexdit_train.sampling.outputs import sampling_card, write_outputs
from flexdit_train.sampling.pipeline import Sampler, resolve_device, text_condition
from flexdit_train.sampling.seeds import sample_labels


def check_config(cfg: DictConfig) -> None:
    """The numeric knobs, before the checkpoint is read or anything is sampled."""
    check_range("num_samples", cfg.num_samples, 1, integer=True)
    check_range("batch_size", cfg.batch_size, 1, integer=True)
    check_range("grid_size", cfg.grid_size, 0, integer=True)
    check_range("seed", cfg.seed, 0, integer=True)
    check_range("cfg_scale", cfg.cfg_scale, 1.0)
    check_range("fps", cfg.fps, 1e-3)
    check_range("latent_scale_factor", cfg.latent_scale_factor, 1e-12)
    if cfg.class_labels is not None and (isinstance(cfg.class_labels, str) or not len(cfg.class_labels)):
        raise UserError(f"class_labels={cfg.class_labels!r} must be a non-empty list of ints, e.g. class_labels=[3,7]")


def check_labels(labels: list, num_classes: int) -> None:
    """Class labels the model knows (the null-class row is not one of them)."""
    bad = [y for y in labels if not isinstance(y, int) or not 0 <= y < num_classes]
    if bad:
        raise UserError(f"class_labels {bad} are not classes of this model, which has {num_classes} "
                        f"(0..{num_classes - 1}); pass labels in that range")


def run_sampling(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg)
    device = resolve_device(cfg.device)
    sampler = Sampler.from_config(cfg, cfg, device)
    model = sampler.model
    channels = model.in_channels if sampler.decode is None else 3
    if len(model.input_size) == 3 and channels not in (1, 3):
        raise ValueError(f"mp4 videos need RGB frames, the model samples {channels}-channel latents: set vae=PATH")
    indices = list(range(int(cfg.num_samples)))
    labels, captions = None, None
    if arch_of(model).conditioning == "text":
        condition, captions = text_condition(model, len(indices), cfg.prompts, cfg.text_encoder, cfg.prompt_shards)
    elif cfg.prompts or cfg.prompt_shards:
        raise ValueError("prompts and prompt_shards are for text models; this checkpoint is class-conditional")
    elif cfg.class_labels is not None:
        check_labels(list(cfg.class_labels), model.num_classes)
        labels = condition = torch.tensor([int(cfg.class_labels[i % len(cfg.class_labels)]) for i in indices])
    else:
        labels = condition = sample_labels(cfg.seed, indices, model.num_classes, cfg.labels)
    start = time.time()
    images = sampler.sample_images(condition, cfg.seed, indices, int(cfg.batch_size), cfg.progress)
    card = sampling_card(
        sampler, checkpoint=cfg.checkpoint, use_ema=cfg.use_ema, seed=cfg.seed, num_samples=len(indices),
        sampling_steps=cfg.sampling_steps, vae=cfg.vae, latent_scale_factor=cfg.latent_scale_factor,
        seconds=time.time() - start, device=device,
    )
    if captions is not None:
        card["prompts"] = captions
    if images.dim() == 5:
        card["fps"] = float(cfg.fps)
    paths = write_outputs(Path(cfg.out_dir), images, labels, card, int(cfg.grid_size), float(cfg.fps))
    print(f"{sampler.schedule.describe()}: compute fraction {card['compute_fraction']:.1%}; wrote {paths['npz']}")
    return {"card": card, "paths": {k: str(v) for k, v in paths.items()}}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
@report_errors
def main(cfg: DictConfig) -> None:
    run_sampling(cfg)


if __name__ == "__main__":
    # Call the importable function: submitit (hydra -m on SLURM) cannot pickle a __main__ function by value.
    from flexdit_train.sample import main as sample_main

    sample_main()
