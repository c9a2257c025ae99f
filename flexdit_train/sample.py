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

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from flexdit_train import CONF_DIR
from flexdit_train.models.arch import arch_of
from flexdit_train.sampling.outputs import sampling_card, write_outputs
from flexdit_train.sampling.pipeline import Sampler, resolve_device, text_condition
from flexdit_train.sampling.seeds import sample_labels

log = logging.getLogger(__name__)


def run_sampling(cfg: DictConfig) -> dict[str, Any]:
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
        labels = condition = torch.tensor([int(cfg.class_labels[i % len(cfg.class_labels)]) for i in indices])
    else:
        labels = condition = sample_labels(cfg.seed, indices, model.num_classes)
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
def main(cfg: DictConfig) -> None:
    log.info("sampling config:\n%s", OmegaConf.to_yaml(cfg))
    run_sampling(cfg)


if __name__ == "__main__":
    # Call the importable function: submitit (hydra -m on SLURM) cannot pickle a __main__ function by value.
    from flexdit_train.sample import main as sample_main

    sample_main()
