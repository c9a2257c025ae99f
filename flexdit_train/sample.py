"""Sampling app: ``python -m flexdit_train.sample checkpoint=PATH budget=paper_130_130 num_samples=64``.

Writes into the run directory: ``grid.png`` (the first ``grid_size`` samples), ``samples.npz`` in the
ADM evaluator layout (``arr_0`` uint8 NHWC images, ``arr_1`` int64 labels) and ``samples.json`` with the
compute fraction, NFEs and every sampling knob. Noise and labels of sample ``i`` derive from
``(seed, i)`` only, so the same command gives the same images on any number of GPUs.
"""

from __future__ import annotations

import json
import logging
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
    model = from_pretrained(cfg.checkpoint, prefer_ema=cfg.use_ema).to(device).eval()
    weak = cfg.weak_patch_size or max(model.patch_sizes)
    lora_merged = bool(cfg.merge_lora) and (getattr(model, "flex_config", None) or {}).get("mode") == "lora"
    if lora_merged and weak != model.native_patch_size:
        model.merge_lora(weak)  # after .to(device): merged copies do not follow moves
    diffusion = create_diffusion(str(cfg.sampling_steps), learn_sigma=model.learn_sigma)
    num_steps = len(diffusion.timestep_map)
    use_cfg = float(cfg.cfg_scale) != 1.0
    schedule, cost = schedule_for(model, cfg.budget, num_steps, use_cfg, weak, lora_merged)
    indices = list(range(int(cfg.num_samples)))
    if cfg.class_labels is not None:
        labels = torch.tensor([int(cfg.class_labels[i % len(cfg.class_labels)]) for i in indices])
    else:
        labels = sample_labels(cfg.seed, indices, model.num_classes)
    weak_scale = cfg.weak_guidance_scale if cfg.weak_guidance_scale is not None else weak_guidance_scale(cfg.cfg_scale)
    decode = None if cfg.vae is None else latent_decoder(cfg.vae, cfg.latent_scale_factor, device)
    images = sample_images(
        model,
        diffusion,
        schedule,
        labels,
        cfg.seed,
        indices,
        batch_size=int(cfg.batch_size),
        cfg_scale=float(cfg.cfg_scale),
        guidance=cfg.guidance,
        weak_scale=weak_scale,
        guide_all_channels=cfg.guide_all_channels,
        decode=decode,
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
        "sampler": diffusion.default_method if hasattr(diffusion, "default_method") else None,
        "cfg_scale": float(cfg.cfg_scale),
        "guidance": cfg.guidance,
        "weak_guidance_scale": float(weak_scale),
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
    main()
