"""The multiply-accumulate terms of one forward pass for one sample, per kind of work.

Convention (DiT paper): its "Gflops" are multiply-accumulates (MACs) of one forward pass for one image
without CFG; hardware FLOPs are 2 x MACs. Only matmul-like work is counted (linears, the patch conv,
the attention matmuls); norms, activations, softmax, modulation and residual adds are O(N*D) and left
out, as DiT does. For N tokens of width D, depth L, MLP width H = mlp_ratio * D, V latent cells per token
(p² for an image patch p, pt·ph·pw for a video patch):

    MAC = L * (4*N*D^2 + 2*N*D*H + 2*N^2*D + 6*D^2)      blocks: qkv+proj, MLP, attention core, adaLN
        + N*V*C_in*D + N*D*V*C_out                      patchify conv, final linear (unpatchify)
        + 2*D^2 + 256*D + D^2                           final adaLN, timestep MLP

This reproduces the DiT paper table (XL/2 at 256 px: 118.6 GMAC). The video DiT (F' token frames, S = N/F'
tokens per frame) counts the same terms except attention, per block 2·N²·D (full), F'·2·S²·D (spatial) or
S·2·F'²·D (temporal); its adaLN runs once per video, as the conditioning vector is broadcast over frames.
The text DiT (L_c caption tokens of width D_text) has adaLN-single (one ``t_block`` D -> 6D per image, no
per-block and no final modulation linear: the tables are added) plus::

    caption_projection  L_c·(D_text·D + D²)                 y_proj fc1, fc2 (padding tokens are computed too)
    cross_attention     L·(2·N·D² + 2·L_c·D² + 2·N·L_c·D)   q and out-proj, k and v, QKᵀ and AV

The caption terms depend on the text only; a sampler could compute them once per sample instead of per
step, but the model recomputes them every forward, and this counts what runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flexdit_train.models.edt import stage_plan
from flexdit_train.models.sparse_dit import POOLING, RECOVERY, SPARSE, SPARSE_GEN, sparse_layout
from flexdit_train.models.video_dit import block_attention

# Width of the sinusoidal timestep features fed to the timestep MLP (TimestepEmbedder).
FREQUENCY_EMBEDDING_SIZE = 256


@dataclass(frozen=True)
class ForwardShape:
    """Sizes one forward pass for one sample depends on."""

    depth: int
    width: int
    mlp_hidden: int
    tokens: int  # all tokens: H'·W', or F'·H'·W' for a video
    patch_volume: int  # latent cells per token: p² or pt·ph·pw
    in_channels: int
    out_channels: int
    lora_rank: int = 0  # unmerged adapters on the blocks' linears; 0 = none or merged
    frames: int = 1  # F' token frames of a video
    attention: str = "full"  # "full", or "factorised" (a video DiT's alternating spatial/temporal blocks)
    text_len: int = 0  # caption tokens of a text DiT
    caption_channels: int = 0  # text encoder width D_text
    # the model config, for archs whose shape is more than one width and depth (EDT's stages); not compared
    model_config: Mapping[str, Any] | None = field(default=None, compare=False)
    sparse_tokens: int = 0  # M = sh·sw tokens of SparseDiT's sparse grid in this forward; 0 for the other archs

    @property
    def frame_tokens(self) -> int:
        return self.tokens // self.frames


Term = Callable[[ForwardShape], int]


def _attention(s: ForwardShape) -> int:
    """QKᵀ and softmax(.)V: T_g² D each over every group of T_g tokens that attend to each other."""
    per_block = {
        "full": 2 * s.tokens**2 * s.width,
        "spatial": s.frames * 2 * s.frame_tokens**2 * s.width,
        "temporal": s.frame_tokens * 2 * s.frames**2 * s.width,
    }
    return sum(per_block[kind] for kind in block_attention(s.attention, s.depth))


# The image and the video DiT: blocks with per-block adaLN-Zero, class-label conditioning.
DIT_TERMS: Mapping[str, Term] = {
    # qkv (3ND^2) and attention output projection (ND^2) plus the two MLP linears (2NDH), every block
    "linear": lambda s: s.depth * s.tokens * (4 * s.width**2 + 2 * s.width * s.mlp_hidden),
    "attention": _attention,
    # adaLN-Zero modulation D -> 6D runs once per sample, not per token
    "adaln": lambda s: s.depth * 6 * s.width**2,
    "patchify": lambda s: s.tokens * s.patch_volume * s.in_channels * s.width,
    "unpatchify": lambda s: s.tokens * s.width * s.patch_volume * s.out_channels,
    "final_adaln": lambda s: 2 * s.width**2,
    "timestep_mlp": lambda s: FREQUENCY_EMBEDDING_SIZE * s.width + s.width**2,
    # Unmerged LoRA A (d_in -> r) and B (r -> d_out) on qkv, proj, fc1 and fc2 of every block:
    # N*r*(d_in + d_out) each, i.e. (D + 3D) + (D + D) + (D + H) + (H + D).
    "lora": lambda s: s.depth * s.tokens * s.lora_rank * (8 * s.width + 2 * s.mlp_hidden),
}

# The text DiT: adaLN-single and cross-attention to the caption tokens.
TEXT_TERMS: Mapping[str, Term] = {
    **DIT_TERMS,
    "adaln": lambda s: 6 * s.width**2,  # one shared t_block per image
    "final_adaln": lambda s: 0,  # final modulation = table + timestep embedding, no matmul
    "caption_projection": lambda s: s.text_len * (s.caption_channels * s.width + s.width**2),
    "cross_attention": lambda s: s.depth
    * (2 * s.tokens * s.width**2 + 2 * s.text_len * s.width**2 + 2 * s.tokens * s.text_len * s.width),
}


# EDT (arXiv 2410.23788): a U of stages at token grids N, N/4, N/16, N/4, N (K = 2 down-samplings), widths
# D_s, depths L_s, MLP H_s = mlp_ratio·D_s, and every adaLN linear reading the stage-1-wide condition (D_1).
# The terms count what the authors' ``get_flops`` counts (matmuls only; the relative-position bias is a
# gather and an add, AMM an element-wise product, both left out): per block N_s(4D_s² + 2D_sH_s) + 2N_s²D_s
# + 6·D_1·D_s; per down-sampling 8·D_1·D_s (adaLN) + N_{s+1}·4D_s·D_{s+1} (bias-free reduction); per
# up-sampling N_{s-1}·D_{s-1}·4D_s (expand) + 4·D_1·D_s (adaLN) + N_s·2D_s·D_s (fuse); plus DiT's patchify,
# unpatchify, final adaLN and timestep MLP at stage 1. EDT-S/B/XL at 256 px: 2.667 / 10.218 / 53.440 GMAC.


def _edt_stages(s: ForwardShape) -> list[tuple[int, int, int, int]]:
    """(tokens, width, depth, MLP width) of each EDT stage."""
    config = s.model_config
    ratio = float(config["mlp_ratio"])
    return [
        (s.tokens // 4**k, int(width), int(depth), int(int(width) * ratio))
        for k, width, depth in zip(stage_plan(config["depths"]), config["widths"], config["depths"], strict=True)
    ]


def _edt_blocks(s: ForwardShape, kind: str) -> int:
    total = 0
    for tokens, width, depth, mlp in _edt_stages(s):
        per_block = {
            "linear": tokens * (4 * width**2 + 2 * width * mlp),
            "attention": 2 * tokens**2 * width,
            "adaln": 6 * s.width * width,
        }[kind]
        total += depth * per_block
    return total


def _edt_down(s: ForwardShape) -> int:
    """Stage i -> i + 1: adaLN D_1 -> 2·4D_i, bias-free reduction 4D_i -> D_{i+1} on the merged tokens."""
    stages = _edt_stages(s)
    return sum(
        8 * s.width * width + tokens_next * 4 * width * width_next
        for (_, width, _, _), (tokens_next, width_next, _, _) in zip(stages[: len(stages) // 2], stages[1:])
    )


def _edt_up(s: ForwardShape) -> int:
    """Stage i - 1 -> i: expand D_{i-1} -> 4D_i on the coarse tokens, adaLN D_1 -> 2·2D_i, fuse 2D_i -> D_i."""
    stages = _edt_stages(s)
    down = len(stages) // 2
    return sum(
        tokens_prev * width_prev * 4 * width + 4 * s.width * width + tokens * 2 * width**2
        for (tokens_prev, width_prev, _, _), (tokens, width, _, _) in zip(stages[down:-1], stages[down + 1 :])
    )


EDT_TERMS: Mapping[str, Term] = {
    "linear": lambda s: _edt_blocks(s, "linear"),
    "attention": lambda s: _edt_blocks(s, "attention"),
    "adaln": lambda s: _edt_blocks(s, "adaln"),
    "downsample": _edt_down,
    "upsample": _edt_up,
    "patchify": DIT_TERMS["patchify"],
    "unpatchify": DIT_TERMS["unpatchify"],
    "final_adaln": DIT_TERMS["final_adaln"],
    "timestep_mlp": DIT_TERMS["timestep_mlp"],
}


# SparseDiT (arXiv 2412.06028): N dense tokens, M = s² sparse tokens, width D, MLP H; per layer kind (matmuls only:
# the adaptive pooling, the nearest upsampling and the token mean are O(N·D) and left out, as norms are):
#   pooling     N·D² (v on every token) + D² (proj of the mean, broadcast) + 2·N·D·H
#   sparse_gen  M·D² (q) + 2·N·D² (kv of the dense tokens) + M·D² (proj) + 2·M·D·H;   attention 2·M·N·D
#   sparse      DiT's block on M tokens: 4·M·D² + 2·M·D·H;                              attention 2·M²·D
#   recovery    2·N·D² (merge_sparse on the upsampled, merge_dense) + N·D² (q) + 2·M·D² (kv of the sparse tokens)
#               + N·D² (proj) + 2·N·D·H;                                               attention 2·N·M·D
#   dense       DiT's block on N tokens;                                                attention 2·N²·D
# plus DiT's adaLN (6·D² per layer), patchify, unpatchify, final adaLN and timestep MLP. SparseDiT-XL/2 at 256 px:
# 60.13 / 63.53 / 67.47 / 71.95 / 76.98 GMAC at s = 6 .. 10 (DiT-XL/2: 118.62).


def _sparse_layer(kind: str, n: int, m: int, d: int, h: int) -> tuple[int, int]:
    """(linear, attention) MACs of one SparseDiT layer of ``kind`` at N dense and M sparse tokens."""
    if kind == POOLING:
        return n * d * d + d * d + 2 * n * d * h, 0
    if kind == SPARSE_GEN:
        return 2 * m * d * d + 2 * n * d * d + 2 * m * d * h, 2 * m * n * d
    if kind == SPARSE:
        return 4 * m * d * d + 2 * m * d * h, 2 * m * m * d
    if kind == RECOVERY:
        return 4 * n * d * d + 2 * m * d * d + 2 * n * d * h, 2 * n * m * d
    return 4 * n * d * d + 2 * n * d * h, 2 * n * n * d  # dense


def _sparse_blocks(s: ForwardShape, index: int) -> int:
    config = s.model_config
    layout = sparse_layout(config["num_pooling"], config["num_sdtm"], config["sdtm_layers"], config["num_top"])
    return sum(_sparse_layer(kind, s.tokens, s.sparse_tokens, s.width, s.mlp_hidden)[index] for kind in layout)


SPARSE_DIT_TERMS: Mapping[str, Term] = {
    "linear": lambda s: _sparse_blocks(s, 0),
    "attention": lambda s: _sparse_blocks(s, 1),
    "adaln": DIT_TERMS["adaln"],
    "patchify": DIT_TERMS["patchify"],
    "unpatchify": DIT_TERMS["unpatchify"],
    "final_adaln": DIT_TERMS["final_adaln"],
    "timestep_mlp": DIT_TERMS["timestep_mlp"],
}
