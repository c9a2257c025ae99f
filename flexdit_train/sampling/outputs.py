"""What a sample set is written as: uint8 images, a PNG grid, the ADM-layout npz, mp4s, and its card.

:func:`sampling_card` is the one record of how a sample set was drawn (weights, sampler, guidance, budget
schedule, compute, wall-clock and device); the sample app writes it as ``samples.json`` and the evaluation
app extends it into its eval card, so every FID-vs-compute row carries its measured sampling time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexdit_train.models.arch import arch_of
from flexdit_train.runtime.atomic import atomic_write
from flexdit_train.sampling.pipeline import Sampler
from flexdit_train.sampling.schedule import patch_label


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a PNG grid of [-1, 1] images (N, C, H, W), or of videos (N, C, F, H, W) one per row of
    frames; returns the path."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if images.dim() == 5:
        nrow = images.shape[2]
        images = images.transpose(1, 2).flatten(0, 1)  # (N·F, C, H, W), each video's frames in a row
    nrow = nrow or max(1, int(round(len(images) ** 0.5)))
    save_image(images.float().cpu(), str(path), nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
    return path


def save_uint8_grid(images: torch.Tensor, path: str | Path) -> Path:
    """:func:`save_grid` of uint8 channels-last images (N, H, W, C) or videos (N, F, H, W, C)."""
    return save_grid(images.movedim(-1, 1).float() / 127.5 - 1.0, path)  # (N, C, ...) in [-1, 1]


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
    paths: dict[str, Any] = {
        "grid": save_uint8_grid(images[:grid_size], out_dir / "grid.png"),
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
    text = json.dumps(card, indent=2, sort_keys=True)
    atomic_write(paths["card"], lambda tmp: Path(tmp).write_text(text))
    return paths


def sampling_card(
    sampler: Sampler,
    *,
    checkpoint: str | os.PathLike,
    use_ema: bool,
    seed: int,
    num_samples: int,
    sampling_steps: str,
    vae: str | None,
    latent_scale_factor: float,
    seconds: float,
    device: torch.device | str,
) -> dict[str, Any]:
    """Every knob of a sample set that changes the samples, what the budget costs, and the measured time.

    ``seconds`` is the wall-clock of sampling (and gathering) the ``num_samples`` samples on ``device``.
    Patch sizes are labelled as in metric names ("2", "1x2x2").
    """
    model, diffusion, schedule, cost = sampler.model, sampler.diffusion, sampler.schedule, sampler.cost
    arch = arch_of(model)
    return {
        "checkpoint": str(checkpoint),
        "use_ema": bool(use_ema),
        "arch": arch.name,
        "model_config": dict(model.config),
        "flex_config": getattr(model, "flex_config", None),
        "num_samples": int(num_samples),
        "seed": int(seed),
        "sampling_steps": str(sampling_steps),
        "num_steps": len(diffusion.timestep_map),
        "sampler": diffusion.default_sample_method,
        "diffusion_process": diffusion.process,
        "clip_denoised": bool(sampler.clip_denoised),
        "cfg_scale": sampler.cfg_scale,
        "guidance": sampler.guidance if schedule.cfg else "none",
        "weak_guidance_scale": float(sampler.weak_scale),
        "guide_all_channels": arch.guide_all_channels(sampler.guide_all_channels),
        "amm_blocks": list(getattr(model, "amm_blocks", ())),
        "vae": vae,
        "latent_scale_factor": float(latent_scale_factor),
        "budget": schedule.name,
        "schedule": schedule.to_dict(),
        "schedule_summary": schedule.describe(),
        # A cached schedule is its own series in tables and plots: "weak_first+fora".
        "schedule_order": schedule.order if schedule.block_plan is None else f"{schedule.order}+{schedule.cache}",
        "compute_fraction": schedule.compute_fraction(cost),
        "gmacs_per_image": schedule.macs(cost) / 1e9,
        "cost_gmacs": {patch_label(p): cost(p) / 1e9 for p in schedule.patch_sizes},
        # a SparseDiT's forward per sparse grid side of its schedule (at the native patch)
        "sparse_grid_gmacs": None if schedule.sparse_grids is None else {
            str(g): cost(schedule.native_patch, sparse_grid=g) / 1e9 for g in sorted(set(schedule.sparse_grids))},
        "nfe": {branch: {patch_label(p): n for p, n in counts.items()} for branch, counts in schedule.nfe().items()},
        "device": str(device),
        "sampling_seconds": round(seconds, 2),
        "images_per_second": round(num_samples / seconds, 4) if seconds > 0 else None,
    }
