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
from dataclasses import dataclass

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
