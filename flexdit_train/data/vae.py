"""diffusers ``AutoencoderKL`` loading and encoding for latent shards and on-the-fly latents.

``--vae`` / ``vae:`` accepts a local ``save_pretrained`` directory, a weights file (``.safetensors``,
``.bin``, ``.pt``) in diffusers key format loaded into the SD-VAE architecture (or ``vae_config``), or a
config JSON / dict, which builds random weights (tests and smoke runs only). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

# sd-vae-ft-ema / sd-vae-ft-mse (stabilityai): the VAE of DiT and SiT, latent = image / 8 with 4 channels
SD_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

# the same interface (factor 8, 4 latent channels) with 6.8 k parameters: for tests
TINY_VAE_CONFIG = {
    **SD_VAE_CONFIG,
    "block_out_channels": [4, 4, 4, 4],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 32,
}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _read_config(config: str | os.PathLike | Mapping | None) -> dict:
    """Constructor arguments from a dict or JSON file (diffusers' ``_class_name``-style keys dropped)."""
    if config is None:
        return dict(SD_VAE_CONFIG)
    values = config if isinstance(config, Mapping) else json.loads(Path(config).read_text())
    return {k: v for k, v in values.items() if not k.startswith("_")}


def load_vae(spec: str | os.PathLike | Mapping, config: str | os.PathLike | Mapping | None = None):
    """A frozen ``AutoencoderKL`` in eval mode from a directory, weights file or config (see module doc)."""
    from diffusers import AutoencoderKL

    if isinstance(spec, Mapping) or str(spec).endswith(".json"):
        warnings.warn(f"VAE built from a config with random weights ({spec if not isinstance(spec, Mapping) else 'dict'})",
                      stacklevel=2)
        vae = AutoencoderKL(**_read_config(spec))
    elif os.path.isdir(spec):
        vae = AutoencoderKL.from_pretrained(spec, low_cpu_mem_usage=False)  # no `accelerate` needed
    elif str(spec).endswith(WEIGHT_SUFFIXES) and os.path.isfile(spec):
        vae = AutoencoderKL(**_read_config(config))
        if str(spec).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(spec)
        else:
            state = torch.load(spec, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
        try:
            vae.load_state_dict(state)
        except RuntimeError as err:  # missing, unexpected or mis-shaped keys
            raise ValueError(
                f"{spec} does not match the VAE config ({str(err).splitlines()[-1].strip()[:120]}): pass its "
                "--vae-config, or convert it with AutoencoderKL.from_single_file(...).save_pretrained(DIR) and pass DIR"
            ) from err
    else:
        raise FileNotFoundError(
            f"VAE {spec!r} is not a local directory, weights file or config JSON: download it once "
            "(e.g. stabilityai/sd-vae-ft-ema) with save_pretrained and pass the directory"
        )
    vae.eval().requires_grad_(False)
    return vae


def vae_name(spec: str | os.PathLike | Mapping) -> str:
    """A short identifier of the VAE for shard metadata."""
    return "config-dict" if isinstance(spec, Mapping) else os.path.basename(os.path.normpath(str(spec)))


def downsample_factor(vae) -> int:
    """Spatial factor between image and latent (8 for the SD-VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``(mean, logvar)``, each (N, C, h, w), of images (N, 3, H, W) in [-1, 1]."""
    posterior = vae.encode(images).latent_dist
    return posterior.mean, posterior.logvar


@torch.no_grad()
def sample_latents(vae, images: torch.Tensor, scale: float, generator: torch.Generator | None) -> torch.Tensor:
    """Scaled posterior samples (or scaled means when ``generator`` is None) of images (N, 3, H, W)."""
    mean, logvar = encode_moments(vae, images)  # (N, C, h, w) each
    if generator is None:
        return mean * scale
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + torch.exp(0.5 * logvar) * noise) * scale
