"""Sampling app: ``python -m flexdit_train.sample checkpoint=PATH budget=paper_130_130 num_samples=64``.

Writes into the run directory: ``grid.png`` (the first ``grid_size`` samples; videos one row of frames
each), ``samples.npz`` in the ADM evaluator layout (``arr_0`` uint8 NHWC images or NFHWC videos,
``arr_1`` int64 labels of class-conditional models), ``videos/sample_XXXXXX.mp4`` for video models and
``samples.json`` with the compute fraction, NFEs and every sampling knob. Text models sample from
``prompts`` (encoded with the training captions' ``text_encoder``) or from the stored embeddings of
``prompt_shards``; sample ``i`` gets prompt ``i mod P``. Noise and labels of sample ``i`` derive from
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
from flexdit_train.budget import BudgetSchedule, Patch, as_patch, build_schedule, patch_label
from flexdit_train.diffusion import sampling_diffusion
from flexdit_train.flops import cost_model
from flexdit_train.models.arch import arch_of
from flexdit_train.models.loading import from_pretrained
from flexdit_train.sampling import generate, sample_labels, save_grid, to_uint8, weak_guidance_scale

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def weak_patch_for(model: torch.nn.Module, budget_cfg, weak_patch_size=None) -> Patch:
    """The weak patch a budget runs: its own ``weak_patch``, else ``weak_patch_size``, else the model's
    cheapest patch (the largest one for image DiTs; (1, 4, 4) for the paper's video patches)."""
    for choice in (budget_cfg.get("weak_patch"), weak_patch_size):
        if choice is not None:
            return as_patch(choice)
    return min(model.patch_sizes, key=cost_model(model))


def schedule_for(
    model: torch.nn.Module, budget_cfg, num_steps: int, cfg: bool, weak: Patch, lora_merged: bool = False
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
    """Scaled latents (N, 4, h, w) -> images (N, 3, 8h, 8w) in [-1, 1] through a local AutoencoderKL;
    video latents (N, 4, F, h, w) frame by frame -> (N, 3, F, 8h, 8w)."""
    from flexdit_train.data.vae import load_vae

    vae = load_vae(vae_spec).to(device)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() == 5:  # the per-frame image VAE the video latents came from
            frames = vae.decode(latents.transpose(1, 2).flatten(0, 1) / scale_factor).sample  # (N·F, 3, H, W)
            return frames.unflatten(0, latents.shape[:1] + latents.shape[2:3]).transpose(1, 2)  # (N, 3, F, H, W)
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
    weak_patch_size: Patch | None = None,
    merge_lora: bool = True,
    weak_guidance: float | None = None,
    vae: str | None = None,
    latent_scale_factor: float = 0.18215,
) -> Sampler:
    """Load a checkpoint and build its sampler, budget schedule, FLOPs model and (latent models) decoder."""
    model = from_pretrained(checkpoint, prefer_ema=use_ema).to(device).eval()
    weak = weak_patch_for(model, budget, weak_patch_size)
    lora_merged = bool(merge_lora) and (getattr(model, "flex_config", None) or {}).get("mode") == "lora"
    diffusion = sampling_diffusion(getattr(model, "diffusion_process", None), str(sampling_steps), model.learn_sigma)
    cfg_scale = float(cfg_scale)
    schedule, cost = schedule_for(model, budget, len(diffusion.timestep_map), cfg_scale != 1.0, weak, lora_merged)
    # Merged adapters are a second copy of the block weights: only worth it when weak steps run.
    if lora_merged and weak != model.native_patch_size and weak in schedule.patch_sizes:
        model.merge_lora(weak)  # after .to(device): merged copies do not follow moves
    weak_scale = float(weak_guidance) if weak_guidance is not None else weak_guidance_scale(cfg_scale)
    decode = None if vae is None else latent_decoder(vae, latent_scale_factor, device)
    return Sampler(model, diffusion, schedule, cost, cfg_scale, weak_scale, decode)


def sample_images(
    model: torch.nn.Module,
    diffusion,
    schedule: BudgetSchedule,
    condition: torch.Tensor | dict[str, torch.Tensor],
    seed: int,
    indices: list[int],
    *,
    batch_size: int,
    cfg_scale: float,
    guidance: str,
    weak_scale: float | None,
    guide_all_channels: bool | None,
    decode=None,
    clip_denoised: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """uint8 (N, H, W, C) images or (N, F, H, W, C) videos for the given global indices, sampled in batches
    under ``schedule``; ``condition`` holds one row per index: (N,) labels or a dict of text tensors."""
    chunks = []
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        rows = slice(start, start + batch_size)
        out = generate(
            model,
            diffusion,
            condition[rows] if isinstance(condition, torch.Tensor) else {k: v[rows] for k, v in condition.items()},
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
        )  # (B, C, H, W) or (B, C, F, H, W) model space
        images = decode(out) if decode is not None else out
        chunks.append(to_uint8(images.clamp(-1, 1)).cpu())
    return torch.cat(chunks)


def write_videos(out_dir: Path, videos: torch.Tensor, fps: float) -> None:
    """uint8 (N, F, H, W, C) videos, C = 3 or 1 (written as grey RGB) -> ``out_dir/sample_XXXXXX.mp4`` (H.264)."""
    from flexdit_train.data.media import encode_mp4

    out_dir.mkdir(parents=True, exist_ok=True)
    for i, video in enumerate(videos.numpy()):
        frames = np.repeat(video, 3 // video.shape[-1], axis=-1)  # (F, H, W, 3)
        (out_dir / f"sample_{i:06d}.mp4").write_bytes(encode_mp4(frames, fps))


def write_outputs(
    out_dir: Path, images: torch.Tensor, labels: torch.Tensor | None, card: dict, grid_size: int, fps: float = 8.0
) -> dict:
    """grid.png, samples.npz (ADM layout; labels only for class-conditional models), videos/*.mp4 (video
    models, at ``fps``) and samples.json; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = images[:grid_size].movedim(-1, 1).float() / 127.5 - 1.0  # (G, C, H, W) or (G, C, F, H, W) in [-1, 1]
    paths: dict[str, Any] = {
        "grid": save_grid(grid, out_dir / "grid.png"),
        "npz": out_dir / "samples.npz",
        "card": out_dir / "samples.json",
    }
    arrays = {"arr_0": images.numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.numpy().astype(np.int64)
    np.savez(paths["npz"], **arrays)
    if images.dim() == 5:
        paths["videos"] = out_dir / "videos"
        write_videos(paths["videos"], images, fps)
    paths["card"].write_text(json.dumps(card, indent=2, sort_keys=True))
    return paths


def text_condition(
    model: torch.nn.Module, count: int, prompts=None, text_encoder: str | None = None, prompt_shards=None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Caption embeddings for ``count`` samples (sample i: prompt i mod P) and the prompts used.

    ``prompts`` are encoded with ``text_encoder`` (the encoder of the training captions); otherwise the
    stored embeddings of the first ``count`` samples of ``prompt_shards`` are used.
    """
    from flexdit_train.data.text import encode_prompts, shard_prompts

    if prompts:
        if text_encoder is None:
            raise ValueError("prompts need the encoder of the training captions: set text_encoder=PATH")
        captions = [str(p) for p in prompts]
        emb, mask = encode_prompts(captions, text_encoder, model.text_len)  # (P, L, D), (P, L)
    elif prompt_shards is not None:
        emb, mask, captions = shard_prompts(prompt_shards, count)
    else:
        raise ValueError(
            "a text model samples from captions: set prompts=[...] with text_encoder=PATH, or prompt_shards=SHARDS "
            "(caption-embedding shards)"
        )
    rows = torch.arange(count) % len(captions)  # (N,)
    return {"text_emb": emb[rows], "text_mask": mask[rows]}, [captions[i] for i in rows.tolist()]


def run_sampling(cfg: DictConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    sampler = prepare_sampler(
        cfg.checkpoint, budget=cfg.budget, sampling_steps=cfg.sampling_steps, cfg_scale=cfg.cfg_scale,
        device=device, use_ema=cfg.use_ema, weak_patch_size=cfg.weak_patch_size, merge_lora=cfg.merge_lora,
        weak_guidance=cfg.weak_guidance_scale, vae=cfg.vae, latent_scale_factor=cfg.latent_scale_factor,
    )
    model, schedule, cost = sampler.model, sampler.schedule, sampler.cost
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
    images = sample_images(
        model,
        sampler.diffusion,
        schedule,
        condition,
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
        "arch": arch_of(model).name,
        "model_config": dict(model.config),
        "flex_config": getattr(model, "flex_config", None),
        "num_samples": len(indices),
        "seed": int(cfg.seed),
        "sampling_steps": str(cfg.sampling_steps),
        "sampler": sampler.diffusion.default_sample_method,
        "diffusion_process": sampler.diffusion.process,
        "clip_denoised": bool(cfg.clip_denoised),
        "cfg_scale": sampler.cfg_scale,
        "guidance": cfg.guidance,
        "weak_guidance_scale": sampler.weak_scale,
        "guide_all_channels": arch_of(model).guide_all_channels(cfg.guide_all_channels),
        "vae": cfg.vae,
        "schedule": schedule.to_dict(),
        "schedule_summary": schedule.describe(),
        "compute_fraction": schedule.compute_fraction(cost),
        "gmacs_per_image": schedule.macs(cost) / 1e9,
        "cost_gmacs": {patch_label(p): cost(p) / 1e9 for p in schedule.patch_sizes},
        "nfe": {branch: {patch_label(p): n for p, n in counts.items()} for branch, counts in schedule.nfe().items()},
        "device": str(device),
    }
    if captions is not None:
        card["prompts"] = captions
    if images.dim() == 5:
        card["fps"] = float(cfg.fps)
    paths = write_outputs(Path(cfg.out_dir), images, labels, card, int(cfg.grid_size), float(cfg.fps))
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
