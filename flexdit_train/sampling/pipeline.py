"""From a network (or a checkpoint) to samples under a compute budget: :class:`Sampler`.

A sampler is the network, the diffusion it was trained with (respaced to the sampling steps), the budget
schedule with its cost model, the guidance settings and, for latent models, the VAE decoder. The sample and
evaluate apps build one from a checkpoint (:meth:`Sampler.from_checkpoint`), the training callbacks from
the EMA network (:meth:`Sampler.for_model`). Models are image (N, C, H, W) or video (N, C, F, H, W) DiTs
conditioned on class labels (``y``) or caption embeddings (``text_emb``, ``text_mask``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flexdit_train.diffusion import sampling_diffusion
from flexdit_train.flops import CostModel, cost_model
from flexdit_train.models.loading import from_pretrained
from flexdit_train.sampling.cache import CachePolicy, installed
from flexdit_train.sampling.guidance import ScheduledDenoiser, weak_guidance_scale
from flexdit_train.sampling.schedule import BudgetSchedule, Patch, as_patch, build_schedule
from flexdit_train.sampling.seeds import sample_noise


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def generate(
    model: nn.Module,
    diffusion,
    condition: torch.Tensor | Mapping[str, torch.Tensor],
    seed: int,
    indices: Sequence[int],
    *,
    cond_patch_sizes: Sequence[Any] | None = None,
    guidance_patch_sizes: Sequence[Any] | None = None,
    cfg_scale: float = 1.0,
    guidance: str = "weak_conditional",
    weak_scale: float | None = None,
    guide_all_channels: bool | None = None,
    method: str | None = None,
    clip_denoised: bool = False,
    progress: bool = False,
    block_plan: Sequence[str] | None = None,
    sparse_grids: Sequence[int] | None = None,
) -> torch.Tensor:
    """Sample model-space outputs (N, C, H, W) or videos (N, C, F, H, W) with per-sample-index noise.

    ``condition``: (N,) class labels, or a dict of condition tensors (text DiTs: ``text_emb``
    (N, L, D_text) and ``text_mask`` (N, L), both required). Without patch schedules every step runs at
    the native size, and the guidance branch exists whenever ``cfg_scale != 1``. ``block_plan`` caches blocks
    per step (:mod:`flexdit_train.sampling.cache`; None computes every block, exactly as without caching).
    ``sparse_grids`` gives a SparseDiT its sparse grid side per step (None: the model's fixed grid).
    """
    device = next(model.parameters()).device
    steps = len(diffusion.timestep_map)
    cond_patch_sizes = cond_patch_sizes or [model.native_patch_size] * steps
    if guidance_patch_sizes is None and cfg_scale != 1.0:
        guidance_patch_sizes = list(cond_patch_sizes)
    denoiser = ScheduledDenoiser(
        model, diffusion.timestep_map, cond_patch_sizes, guidance_patch_sizes, cfg_scale, guidance, weak_scale,
        guide_all_channels, block_plan, sparse_grids,
    )
    shape = (model.in_channels, *model.input_size)
    noise, generators = sample_noise(seed, indices, shape, device)
    cond = {"y": condition} if isinstance(condition, torch.Tensor) else dict(condition)
    with installed(model, denoiser.cache):
        return diffusion.sample(
            denoiser,
            noise,
            {k: v.to(device) for k, v in cond.items()},
            method=method,
            clip_denoised=clip_denoised,
            progress=progress,
            generator=generators,
        )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) or (N, C, F, H, W) -> uint8 channels-last (N, H, W, C) or (N, F, H, W, C)
    with ADM round-to-nearest quantisation."""
    return (127.5 * images + 128.0).clamp(0, 255).to(torch.uint8).movedim(1, -1).contiguous()


def latent_decoder(vae_spec: str, scale_factor: float, device: torch.device):
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


def text_condition(
    model: nn.Module, count: int, prompts=None, text_encoder: str | None = None, prompt_shards=None
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


PRECISIONS = ("fp32", "bf16")


@dataclass
class Sampler:
    """A network ready to sample under a budget: its diffusion, schedule, cost model, guidance and decoder.

    ``decode`` maps model-space samples to images in [-1, 1] (latent models: :func:`latent_decoder`);
    None for pixel-space models. ``network`` is what runs the steps: ``model`` itself, or its
    ``torch.compile`` wrapper (one graph per patch size, reused across steps); ``precision`` "bf16" runs
    it under bf16 autocast (GPUs), the diffusion arithmetic staying fp32.
    """

    model: nn.Module
    diffusion: Any
    schedule: BudgetSchedule
    cost: CostModel
    cfg_scale: float
    weak_scale: float
    guidance: str = "weak_conditional"
    guide_all_channels: bool | None = None
    clip_denoised: bool = False
    decode: Any = None
    network: nn.Module | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {PRECISIONS}")
        if self.network is None:
            self.network = self.model

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        budget: Mapping[str, Any],
        steps: str,
        cfg: float,
        vae: Any = None,
        *,
        weak_patch_size: Patch | None = None,
        weak_guidance: float | None = None,
        guidance: str = "weak_conditional",
        guide_all_channels: bool | None = None,
        clip_denoised: bool = False,
        lora_merged: bool = False,
        cache: Mapping[str, Any] | None = None,
    ) -> Sampler:
        """The sampler of ``model`` under a ``budget`` node (conf/budget/), ``steps`` (a DDPM respacing string:
        "250", "ddim50"; a flow sampler: "euler50", "heun25", "sde100"), CFG scale ``cfg`` and ``vae`` (a decoder
        from :func:`latent_decoder`, or None). The budget schedule has one entry per step (per grid point of a
        flow sampler: Heun's corrector runs at the next grid point's patch size, and the schedule counts its
        2K - 1 evaluations).

        The weak patch is the budget's own ``weak_patch``, else ``weak_patch_size``, else the model's
        cheapest patch. ``lora_merged`` says the LoRA adapters will be merged for the weak steps, which
        then cost nothing extra; the sampler itself never changes the model. ``cache`` (a conf/cache/ node,
        None: none) adds its block plan to the schedule, priced in its compute fraction.
        """
        diffusion = sampling_diffusion(getattr(model, "diffusion_process", None), str(steps), model.learn_sigma)
        cfg_scale = float(cfg)
        flex = getattr(model, "flex_config", None) or {}
        # Unmerged LoRA adds its FLOPs to weak steps; merged adapters cost nothing extra.
        lora_rank = flex["lora_rank"] if flex.get("mode") == "lora" and not lora_merged else 0
        cost = cost_model(model, lora_rank=lora_rank)
        chosen = next((as_patch(p) for p in (budget.get("weak_patch"), weak_patch_size) if p is not None), None)
        weak = min(model.patch_sizes, key=cost_model(model)) if chosen is None else chosen
        native = model.native_patch_size
        schedule = build_schedule(
            budget, len(diffusion.timestep_map), native, weak if weak != native else None, cost,
            cfg=cfg_scale != 1.0, available_patch_sizes=tuple(model.patch_sizes),
            evaluations=getattr(diffusion, "evaluations_per_step", None),
        )
        policy = CachePolicy.from_config(cache)
        if schedule.block_plan is not None and policy.policy != "none":
            raise ValueError(f"budget {schedule.name!r} already chose its block caching (budget.cache_policy) and "
                             f"cache={policy.label} adds another; keep one of them (cache=none)")
        schedule = schedule.with_cache(policy, len(model.blocks))
        weak_scale = float(weak_guidance) if weak_guidance is not None else weak_guidance_scale(cfg_scale)
        return cls(model, diffusion, schedule, cost, cfg_scale, weak_scale, guidance, guide_all_channels,
                   clip_denoised, vae)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        *,
        budget: Mapping[str, Any],
        steps: str,
        cfg: float,
        device: torch.device,
        use_ema: bool = True,
        merge_lora: bool = True,
        vae: str | None = None,
        latent_scale_factor: float = 0.18215,
        compile: bool = False,
        precision: str = "fp32",
        amm_blocks: Sequence[int] | None = None,
        **options: Any,
    ) -> Sampler:
        """Load a checkpoint onto ``device`` and build its sampler (``options``: :meth:`for_model`'s).

        With ``merge_lora`` a LoRA model gets merged copies of its weak-step weights (no FLOPs overhead;
        a second copy of the block weights, so only when weak steps run); ``vae`` is a local AutoencoderKL.
        ``compile`` wraps the network in ``torch.compile`` after merging; ``precision`` "bf16" samples under
        bf16 autocast. ``amm_blocks`` (1-indexed) turns on EDT's training-free attention modulation there.
        """
        model = from_pretrained(checkpoint, prefer_ema=use_ema).to(device).eval()
        if amm_blocks:
            model.set_attention_modulation(list(amm_blocks))
        lora_merged = bool(merge_lora) and (getattr(model, "flex_config", None) or {}).get("mode") == "lora"
        decode = None if vae is None else latent_decoder(vae, latent_scale_factor, device)
        sampler = cls.for_model(model, budget, steps, cfg, decode, lora_merged=lora_merged, **options)
        weak_steps = [p for p in sampler.schedule.patch_sizes if p != model.native_patch_size]
        if lora_merged and weak_steps:  # a two-patch schedule: one weak patch
            model.merge_lora(weak_steps[0])  # after .to(device): merged copies do not follow moves
        network = torch.compile(model) if compile else model  # after merging: the merged weights are what runs
        return dataclasses.replace(sampler, network=network, precision=precision)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], knobs: Mapping[str, Any], device: torch.device) -> Sampler:
        """:meth:`from_checkpoint` as the apps' configs spell it: ``checkpoint``, ``budget``, ``use_ema``,
        ``merge_lora``, ``weak_patch_size`` and ``amm_blocks`` at the top level of ``cfg``, the sampling knobs in ``knobs``
        (conf/sample.yaml: ``cfg`` itself; conf/evaluate.yaml: its ``eval`` preset)."""
        return cls.from_checkpoint(
            cfg["checkpoint"], budget=cfg["budget"], steps=knobs["sampling_steps"], cfg=knobs["cfg_scale"],
            device=device, use_ema=cfg["use_ema"], merge_lora=cfg["merge_lora"], vae=knobs["vae"],
            latent_scale_factor=knobs["latent_scale_factor"], weak_patch_size=cfg["weak_patch_size"],
            weak_guidance=knobs["weak_guidance_scale"], guidance=knobs["guidance"],
            guide_all_channels=knobs["guide_all_channels"], clip_denoised=knobs["clip_denoised"],
            cache=cfg.get("cache"), compile=bool(cfg.get("compile", False)), precision=str(cfg.get("precision", "fp32")),
            amm_blocks=cfg.get("amm_blocks"),
        )

    def generate(self, condition: torch.Tensor | Mapping[str, torch.Tensor], seed: int, indices: Sequence[int],
                 progress: bool = False) -> torch.Tensor:
        """Samples (N, C, H, W) or (N, C, F, H, W) for the global ``indices``, decoded to images when the
        sampler has a decoder; one batch, ``condition`` holding one row per index."""
        device = next(self.model.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = generate(
                self.network,
                self.diffusion,
                condition,
                seed,
                indices,
                cond_patch_sizes=self.schedule.cond_patch_sizes,
                guidance_patch_sizes=self.schedule.guidance_patch_sizes,
                cfg_scale=self.cfg_scale,
                guidance=self.guidance,
                weak_scale=self.weak_scale,
                guide_all_channels=self.guide_all_channels,
                clip_denoised=self.clip_denoised,
                progress=progress,
                block_plan=self.schedule.block_plan,
                sparse_grids=self.schedule.sparse_grids,
            ).float()  # model space
        return self.decode(out) if self.decode is not None else out

    def sample_images(self, condition: torch.Tensor | Mapping[str, torch.Tensor], seed: int, indices: list[int],
                      batch_size: int, progress: bool = False) -> torch.Tensor:
        """uint8 (N, H, W, C) images or (N, F, H, W, C) videos for the global ``indices``, in batches;
        ``condition`` holds one row per index: (N,) labels or a dict of text tensors."""
        chunks = []
        for start in range(0, len(indices), batch_size):
            rows = slice(start, start + batch_size)
            batch = condition[rows] if isinstance(condition, torch.Tensor) else {k: v[rows] for k, v in condition.items()}
            images = self.generate(batch, seed, indices[rows], progress)
            chunks.append(to_uint8(images.clamp(-1, 1)).cpu())
        return torch.cat(chunks)
