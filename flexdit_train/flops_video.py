"""Analytic MACs of the video DiT and the text-conditioned DiT, in :mod:`flexdit_train.flops`' conventions.

MACs of one forward for one sample (DiT's "Gflops"; hardware FLOPs = 2 x MACs), matmul-like work only.

Video (:class:`~flexdit_train.models.video_dit.VideoDiT`), T = F'·H'·W' tokens, S = H'·W' tokens per frame,
F' frames, patch volume V = pt·ph·pw::

    blocks     L·T·(4D² + 2DH)                 qkv + out-proj, MLP (flops.DIT_TERMS "linear")
    attention  per block: full 2·T²·D | spatial F'·2·S²·D | temporal S·2·F'²·D
    adaLN      L·6D²                           once per video: the vector is broadcast over frames
    patchify   T·V·C_in·D, unpatchify T·D·V·C_out, final adaLN 2D², timestep MLP 256D + D², LoRA as DiT

Text (:class:`~flexdit_train.models.text_dit.TextDiT`), N image tokens, L caption tokens, caption width
D_text: the DiT terms with adaLN-single (one ``t_block`` D -> 6D per image, no per-block and no final
modulation linear: the tables are added) plus::

    caption_projection  L·(D_text·D + D²)      y_proj fc1, fc2 (padding tokens are computed too)
    cross_attention     L_blocks·(2·N·D² + 2·L·D² + 2·N·L·D)   q and out-proj, k and v, QKᵀ and AV

The caption terms depend on the text only; a sampler could compute them once per sample instead of per
step, but the model recomputes them every forward, and this counts what runs.

:func:`model_cost` picks the cost model of any network (image, video or text DiT) for the trainer's
FLOPs counter and the sampler's compute fractions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flexdit_train.flops import DIT_TERMS, CostModel, ForwardShape, Term, cost_model, macs_breakdown
from flexdit_train.models.arch import arch_of
from flexdit_train.models.dit import check_patch_divides as check_video_patch_divides
from flexdit_train.models.video_dit import block_attention, video_patch

#################################################################################
#                                     Video                                     #
#################################################################################


@dataclass(frozen=True)
class VideoShape(ForwardShape):
    """ForwardShape (``tokens`` = all F'·H'·W' tokens, ``patch_size`` = ph) plus the video axes."""

    frames: int = 1  # F'
    frame_tokens: int = 1  # S = H'·W'
    patch_volume: int = 1  # pt·ph·pw
    attention: str = "full"


def _video_attention(s: VideoShape) -> int:
    per_block = {
        "full": 2 * s.tokens**2 * s.width,
        "spatial": s.frames * 2 * s.frame_tokens**2 * s.width,
        "temporal": s.frame_tokens * 2 * s.frames**2 * s.width,
    }
    return sum(per_block[kind] for kind in block_attention(s.attention, s.depth))


VIDEO_TERMS: Mapping[str, Term] = {
    **{name: DIT_TERMS[name] for name in ("linear", "adaln", "final_adaln", "timestep_mlp", "lora")},
    "attention": _video_attention,
    "patchify": lambda s: s.tokens * s.patch_volume * s.in_channels * s.width,
    "unpatchify": lambda s: s.tokens * s.width * s.patch_volume * s.out_channels,
}


def video_shape(
    model: Any,
    latent_fhw: Sequence[int] | None = None,
    patch_size: Sequence[int] | None = None,
    attention: str | None = None,
    lora_rank: int = 0,
) -> VideoShape:
    """Shape of one forward of a VideoDiT (or its config); defaults: its input size, patch and attention."""
    config = getattr(model, "config", model)
    f, h, w = (int(s) for s in (config["input_size"] if latent_fhw is None else latent_fhw))
    p = video_patch(config["patch_size"] if patch_size is None else patch_size)
    check_video_patch_divides((f, h, w), p)
    width, in_channels = config["hidden_size"], config["in_channels"]
    frames, frame_tokens = f // p[0], (h // p[1]) * (w // p[2])
    return VideoShape(
        depth=config["depth"],
        width=width,
        mlp_hidden=int(width * config["mlp_ratio"]),
        tokens=frames * frame_tokens,
        patch_size=p[1],
        in_channels=in_channels,
        out_channels=2 * in_channels if config["learn_sigma"] else in_channels,
        lora_rank=lora_rank,
        frames=frames,
        frame_tokens=frame_tokens,
        patch_volume=p[0] * p[1] * p[2],
        attention=config["attention"] if attention is None else attention,
    )


def video_macs_breakdown(
    model: Any,
    latent_fhw: Sequence[int] | None = None,
    patch_size: Sequence[int] | None = None,
    attention: str | None = None,
    lora_rank: int = 0,
) -> dict[str, int]:
    """MACs of one forward for one video, per term of :data:`VIDEO_TERMS`."""
    shape = video_shape(model, latent_fhw, patch_size, attention, lora_rank)
    return {name: term(shape) for name, term in VIDEO_TERMS.items()}


def video_forward_macs(
    model: Any,
    latent_fhw: Sequence[int] | None = None,
    patch_size: Sequence[int] | None = None,
    attention: str | None = None,
    lora_rank: int = 0,
) -> int:
    """MACs of one forward for one video (x 2 for FLOPs)."""
    return sum(video_macs_breakdown(model, latent_fhw, patch_size, attention, lora_rank).values())


@dataclass(frozen=True, eq=False)
class VideoCostModel:
    """``patch -> MACs`` of one forward for one video at a fixed latent; as flops.CostModel (LoRA off native)."""

    config: Mapping[str, Any]
    latent_fhw: tuple[int, int, int]
    lora_rank: int = 0

    @property
    def native_patch(self) -> tuple[int, int, int]:
        return video_patch(self.config["patch_size"])

    def __call__(self, patch_size: Sequence[int]) -> int:
        p = video_patch(patch_size)
        rank = 0 if p == self.native_patch else self.lora_rank
        return video_forward_macs(self.config, self.latent_fhw, p, lora_rank=rank)


def video_cost_model(model: Any, latent_fhw: Sequence[int] | None = None, lora_rank: int = 0) -> VideoCostModel:
    config = dict(getattr(model, "config", model))
    fhw = tuple(int(s) for s in (config["input_size"] if latent_fhw is None else latent_fhw))
    return VideoCostModel(config, fhw, lora_rank)  # type: ignore[arg-type]


def compute_fraction(
    cost: VideoCostModel, cond_patches: Sequence[Any], guidance_patches: Sequence[Any] | None = None
) -> float:
    """Schedule MACs / MACs of the native patch at every step of every branch (the paper's "% FLOPs")."""
    branches = [cond_patches] if guidance_patches is None else [cond_patches, guidance_patches]
    macs = sum(cost(p) for branch in branches for p in branch)
    return macs / (len(branches) * len(cond_patches) * cost(cost.native_patch))


#################################################################################
#                                      Text                                     #
#################################################################################


def text_extra_terms(model: Any) -> dict[str, Term]:
    """``extra_terms`` turning flops.py's DiT count into a TextDiT count (pass to forward_macs / cost_model)."""
    config = getattr(model, "config", model)
    text_len, caption_channels = config["text_len"], config["caption_channels"]
    return {
        "adaln": lambda s: 6 * s.width**2,  # adaLN-single: one shared t_block per image
        "final_adaln": lambda s: 0,  # final modulation = table + timestep embedding, no matmul
        "caption_projection": lambda s: text_len * (caption_channels * s.width + s.width**2),
        "cross_attention": lambda s: s.depth
        * (2 * s.tokens * s.width**2 + 2 * text_len * s.width**2 + 2 * s.tokens * text_len * s.width),
    }


def text_macs_breakdown(
    model: Any, latent_hw: int | Sequence[int] | None = None, patch_size: int | None = None, lora_rank: int = 0
) -> dict[str, int]:
    """MACs of one TextDiT forward for one image, per term."""
    config = getattr(model, "config", model)
    return macs_breakdown(config, latent_hw, patch_size, lora_rank, text_extra_terms(config))


def text_forward_macs(
    model: Any, latent_hw: int | Sequence[int] | None = None, patch_size: int | None = None, lora_rank: int = 0
) -> int:
    """MACs of one TextDiT forward for one image (x 2 for FLOPs)."""
    return sum(text_macs_breakdown(model, latent_hw, patch_size, lora_rank).values())


def text_cost_model(model: Any, latent_hw: int | Sequence[int] | None = None, lora_rank: int = 0) -> CostModel:
    """flops.CostModel of a TextDiT: plugs into budget.BudgetSchedule like the class-conditional one."""
    config = getattr(model, "config", model)
    return cost_model(config, latent_hw, lora_rank, text_extra_terms(config))


#################################################################################
#                                  Any model                                    #
#################################################################################


def model_cost(model: Any, latent_shape: Sequence[int] | None = None, lora_rank: int = 0) -> CostModel | VideoCostModel:
    """``patch -> MACs`` of one forward for one sample of any DiT at ``latent_shape`` ((H, W) or (F, H, W),
    default its input size); ``lora_rank`` counts unmerged adapters on non-native patches."""
    arch = arch_of(model).name
    if arch == "video_dit":
        return video_cost_model(model, latent_shape, lora_rank)
    if arch == "text_dit":
        return text_cost_model(model, latent_shape, lora_rank)
    return cost_model(model, latent_shape, lora_rank)
