"""Sampling app: ``python -m flexdit_train.sample checkpoint=PATH budget=paper_130_130 num_samples=64``.

Writes into the run directory: ``grid.png`` (the first ``grid_size`` samples), ``samples.npz`` in the
ADM evaluator layout (``arr_0`` uint8 NHWC images, ``arr_1`` int64 labels) and ``samples.json`` with the
compute fraction, NFEs and every sampling knob. Noise and labels of sample ``i`` derive from
``(seed, i)`` only, so the same command gives the same images on any number of GPUs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from flexdit_train import CONF_DIR
from flexdit_train.budget import BudgetSchedule, build_schedule
from flexdit_train.diffusion import create_diffusion
from flexdit_train.flops import cost_model
from flexdit_train.models.loading import from_pretrained
from flexdit_train.sampling import generate, sample_labels, save_grid, to_uint8, weak_guidance_scale

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def schedule_for(
    model: torch.nn.Module, budget_cfg, num_steps: int, cfg: bool, weak: int, lora_merged: bool = False
):
    """The budget schedule and the FLOPs model for this model, weak patch size and sampler length."""
    native, available = model.native_patch_size, tuple(model.patch_sizes)
    flex = getattr(model, "flex_config", None) or {}
    # Unmerged LoRA adds its FLOPs to weak steps; merged adapters cost nothing extra.
    lora_rank = flex["lora_rank"] if flex.get("mode") == "lora" and not lora_merged else 0
    cost = cost_model(model, lora_rank=lora_rank)
    schedule = build_schedule(
        budget_cfg, num_steps, native, weak if weak != native else None, cost, cfg=cfg, available_patch_sizes=available
    )
    return schedule, cost


def latent_decoder(vae_spec, scale_factor: float, device: torch.device):
    """Scaled latents (N, 4, h, w) -> images (N, 3, 8h, 8w) in [-1, 1] through a local AutoencoderKL."""
    from flexdit_train.data.vae import load_vae

    vae = load_vae(vae_spec).to(device)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents / scale_factor).sample

    return decode


@dataclass
class Sampler:
    """Everything a sample set needs: the network, its diffusion, the budget schedule and guidance scales."""

    model: torch.nn.Module
    diffusion: Any
    schedule: BudgetSchedule
    cost: Any
    cfg_scale: float
    weak_scale: float
    decode: Any


def prepare_sampler(
    checkpoint: str,
    *,
    budget,
    sampling_steps: str,
    cfg_scale: float,
    device: torch.device,
    use_ema: bool = True,
    weak_patch_size: int | None = None,
    merge_lora: bool = True,
    weak_guidance: float | None = None,
    vae: str | None = None,
    latent_scale_factor: float = 0.18215,
) -> Sampler:
    """Load a checkpoint and build its sampler, budget schedule, FLOPs model and (latent models) decoder."""
    model = from_pretrained(checkpoint, prefer_ema=use_ema).to(device).eval()
    weak = weak_patch_size or max(model.patch_sizes)
    lora_merged = bool(merge_lora) and (getattr(model, "flex_config", None) or {}).get("mode") == "lora"
    if lora_merged and weak != model.native_patch_size:
        model.merge_lora(weak)  # after .to(device): merged copies do not follow moves
    diffusion = create_diffusion(str(sampling_steps), learn_sigma=model.learn_sigma)
    cfg_scale = float(cfg_scale)
    schedule, cost = schedule_for(model, budget, len(diffusion.timestep_map), cfg_scale != 1.0, weak, lora_merged)
    weak_scale = float(weak_guidance) if weak_guidance is not None else weak_guidance_scale(cfg_scale)
    decode = None if vae is None else latent_decoder(vae, latent_scale_factor, device)
    return Sampler(model, diffusion, schedule, cost, cfg_scale, weak_scale, decode)


def sample_images(
    model: torch.nn.Module,
    diffusion,
    schedule: BudgetSchedule,
    labels: torch.Tensor,
    seed: int,
    indices: list[int],
    *,
    batch_size: int,
    cfg_scale: float,
    guidance: str,
    weak_scale: float | None,
    guide_all_channels: bool,
    decode=None,
    clip_denoised: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """uint8 (N, H, W, C) images for the given global indices, sampled in batches under ``schedule``."""
    chunks = []
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        out = generate(
            model,
            diffusion,
            labels[start : start + batch_size],
            seed,
            idx,
            cond_patch_sizes=schedule.cond_patch_sizes,
            guidance_patch_sizes=schedule.guidance_patch_sizes,
            cfg_scale=cfg_scale,
            guidance=guidance,
            weak_scale=weak_scale,
            guide_all_channels=guide_all_channels,
            clip_denoised=clip_denoised,
            progress=progress,
        )  # (B, C, H, W) model space
        images = decode(out) if decode is not None else out
        chunks.append(to_uint8(images.clamp(-1, 1)).cpu())
    return torch.cat(chunks)


def write_outputs(out_dir: Path, images: torch.Tensor, labels: torch.Tensor, card: dict, grid_size: int) -> dict:
    """grid.png, samples.npz (ADM layout) and samples.json; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = images[:grid_size].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (G, C, H, W) in [-1, 1]
    paths = {
        "grid": save_grid(grid, out_dir / "grid.png"),
        "npz": out_dir / "samples.npz",
        "card": out_dir / "samples.json",
    }
    np.savez(paths["npz"], arr_0=images.numpy(), arr_1=labels.numpy().astype(np.int64))
    paths["card"].write_text(json.dumps(card, indent=2, sort_keys=True))
    return paths


def run_sampling(cfg: DictConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    sampler = prepare_sampler(
        cfg.checkpoint, budget=cfg.budget, sampling_steps=cfg.sampling_steps, cfg_scale=cfg.cfg_scale,
        device=device, use_ema=cfg.use_ema, weak_patch_size=cfg.weak_patch_size, merge_lora=cfg.merge_lora,
        weak_guidance=cfg.weak_guidance_scale, vae=cfg.vae, latent_scale_factor=cfg.latent_scale_factor,
    )
    model, schedule, cost = sampler.model, sampler.schedule, sampler.cost
    indices = list(range(int(cfg.num_samples)))
    if cfg.class_labels is not None:
        labels = torch.tensor([int(cfg.class_labels[i % len(cfg.class_labels)]) for i in indices])
    else:
        labels = sample_labels(cfg.seed, indices, model.num_classes)
    images = sample_images(
        model,
        sampler.diffusion,
        schedule,
        labels,
        cfg.seed,
        indices,
        batch_size=int(cfg.batch_size),
        cfg_scale=sampler.cfg_scale,
        guidance=cfg.guidance,
        weak_scale=sampler.weak_scale,
        guide_all_channels=cfg.guide_all_channels,
        decode=sampler.decode,
        clip_denoised=cfg.clip_denoised,
        progress=cfg.progress,
    )
    card = {
        "checkpoint": str(cfg.checkpoint),
        "use_ema": cfg.use_ema,
        "model_config": dict(model.config),
        "flex_config": getattr(model, "flex_config", None),
        "num_samples": len(indices),
        "seed": int(cfg.seed),
        "sampling_steps": str(cfg.sampling_steps),
        "sampler": sampler.diffusion.default_sample_method,
        "clip_denoised": bool(cfg.clip_denoised),
        "cfg_scale": sampler.cfg_scale,
        "guidance": cfg.guidance,
        "weak_guidance_scale": sampler.weak_scale,
        "guide_all_channels": bool(cfg.guide_all_channels),
        "vae": cfg.vae,
        "schedule": schedule.to_dict(),
        "schedule_summary": schedule.describe(),
        "compute_fraction": schedule.compute_fraction(cost),
        "gmacs_per_image": schedule.macs(cost) / 1e9,
        "nfe": {branch: {str(p): n for p, n in counts.items()} for branch, counts in schedule.nfe().items()},
        "device": str(device),
    }
    paths = write_outputs(Path(cfg.out_dir), images, labels, card, int(cfg.grid_size))
    print(f"{schedule.describe()}: compute fraction {card['compute_fraction']:.1%}; wrote {paths['npz']}")
    return {"card": card, "paths": {k: str(v) for k, v in paths.items()}}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    log.info("sampling config:\n%s", OmegaConf.to_yaml(cfg))
    run_sampling(cfg)


if __name__ == "__main__":
    # Call the importable function: submitit (hydra -m on SLURM) cannot pickle a __main__ function by value.
    from flexdit_train.sample import main as sample_main

    sample_main()
