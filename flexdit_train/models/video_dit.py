"""Latent video Diffusion Transformer (Latte-style), flexible through :mod:`flexdit_train.models.flex`.

The network maps (N, C, F, H, W) latents (a per-frame image VAE's latents stacked along time), timesteps
and class labels to (N, 2C, F, H, W) outputs (eps and the learned variance value, as DiT). A 3-D patch
(pt, ph, pw) turns the latent into F'·H'·W' tokens in (frame, row, column) order; the blocks are DiT's
adaLN-Zero blocks (same submodule names) whose self-attention is either

* ``"factorised"``: Latte's interleaved variant, even blocks spatial (the tokens of one frame attend to
  each other), odd blocks temporal (one spatial position attends across frames), or
* ``"full"``: every token attends to all F'·H'·W' tokens.

Positions are fixed sin-cos: DiT's 2-D table within a frame plus a 1-D table over frames, both
evaluated at native-grid coordinates (index · p / p_nat per axis) and added once at the input for both
attention kinds. The conditioning vector is computed once per video and broadcast over its tokens,
so each block's adaLN costs 6·D² per video (Latte repeats it per frame).

``flexify`` makes one model run at the native (1, 2, 2) and the weak temporal (2, 2, 2) and spatial
(1, 4, 4) patches (FlexiDiT's video setting, §4.3 and App. C.2 of the paper).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from einops import rearrange
from torch import nn

from flexdit_train.models.dit import (
    DIT_SIZES,
    ClassConditional,
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchModel,
    TimestepEmbedder,
    cached_table,
    check_patch_divides,
    modulate,
    sincos_1d,
    sincos_2d,
)

ATTENTION_KINDS = ("factorised", "full")


def block_attention(attention: str, depth: int) -> list[str]:
    """Per-block attention: "spatial"/"temporal" alternating (factorised, spatial first) or "full"."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"unknown video attention {attention!r}; use one of {ATTENTION_KINDS}")
    if attention == "full":
        return ["full"] * depth
    return ["spatial" if i % 2 == 0 else "temporal" for i in range(depth)]


def video_patch(patch_size: Any) -> tuple[int, int, int]:
    """(pt, ph, pw) from any 3-sequence; spatial patches must be square (one 2-D position scale)."""
    try:
        pt, ph, pw = (int(v) for v in patch_size)
    except (TypeError, ValueError):
        pt = ph = pw = -1
    if min(pt, ph, pw) < 1 or ph != pw:
        raise ValueError(
            f"video patch sizes are positive (pt, ph, pw) triples with ph == pw, got {patch_size!r}; "
            "e.g. (1, 2, 2) native, (2, 2, 2) weak temporal, (1, 4, 4) weak spatial"
        )
    return pt, ph, pw


class VideoPatchEmbed(nn.Module):
    """(N, C, F, H, W) latent -> (N, T, D) tokens with a strided Conv3d (submodule ``proj``)."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, F', H', W')
        return x.flatten(2).transpose(1, 2)  # (N, T, D)


class VideoBlock(DiTBlock):
    """DiT's adaLN-Zero block (same submodules) whose self-attention runs over ``attention``'s token groups."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, attention: str):
        super().__init__(hidden_size, num_heads, mlp_ratio=mlp_ratio)
        self.attention = attention  # "spatial", "temporal" or "full"

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        # x: (N, T, D), T = F'·H'·W' in (frame, row, column) order; c: (N, D), one vector per video
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.attend(modulate(self.norm1(x), shift_msa, scale_msa), grid[0])  # (N, T, D)
        x = x + gate_msa.unsqueeze(1) * h  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x

    def attend(self, h: torch.Tensor, frames: int) -> torch.Tensor:
        """Self-attention of (N, T, D) tokens within each frame, across frames per position, or over all."""
        n = h.shape[0]
        if self.attention == "spatial":
            h = rearrange(h, "n (f s) d -> (n f) s d", f=frames)  # (N·F', H'·W', D)
            return rearrange(self.attn(h), "(n f) s d -> n (f s) d", n=n)  # (N, T, D)
        if self.attention == "temporal":
            h = rearrange(h, "n (f s) d -> (n s) f d", f=frames)  # (N·H'·W', F', D)
            return rearrange(self.attn(h), "(n s) f d -> n (f s) d", n=n)  # (N, T, D)
        return self.attn(h)  # (N, T, D)


def unpatchify_3d(
    x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int
) -> torch.Tensor:
    """(N, T, pt·ph·pw·C) tokens in (frame, row, column) order -> (N, C, F, H, W); per token (pt, ph, pw, C)."""
    f, h, w = grid
    a, b, e = patch
    x = x.reshape(x.shape[0], f, h, w, a, b, e, channels)  # (N, F', H', W', pt, ph, pw, C)
    x = torch.einsum("nfhwabec->ncfahbwe", x)  # (N, C, F', pt, H', ph, W', pw)
    return x.reshape(x.shape[0], channels, f * a, h * b, w * e)  # (N, C, F, H, W)


class VideoDiT(ClassConditional, PatchModel):
    """Class-conditional latent video DiT; ``patch_size`` (pt, ph, pw), ``attention`` factorised or full."""

    def __init__(
        self,
        input_size: Sequence[int] = (16, 32, 32),
        patch_size: Sequence[int] = (1, 2, 2),
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        attention: str = "factorised",
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if len(input_size) != 3:
            raise ValueError(f"input_size is the (F, H, W) latent shape, got {input_size!r}")
        kinds = block_attention(attention, depth)
        native = video_patch(patch_size)
        check_patch_divides(input_size, native)
        self._init_settings(
            dict(
                input_size=[int(s) for s in input_size],
                patch_size=list(native),
                in_channels=in_channels,
                hidden_size=hidden_size,
                depth=depth,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                attention=attention,
                class_dropout_prob=class_dropout_prob,
                num_classes=num_classes,
                learn_sigma=learn_sigma,
            ),
            native,
        )
        self.grad_checkpointing = grad_checkpointing
        self.x_embedder = VideoPatchEmbed(self.native_patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.blocks = nn.ModuleList([VideoBlock(hidden_size, num_heads, mlp_ratio, kind) for kind in kinds])
        # DiT's FinalLayer with "patch 1" and prod(p)·C_out channels is exactly the linear a 3-D patch needs.
        self.final_layer = FinalLayer(hidden_size, 1, math.prod(self.native_patch_size) * self.out_channels)
        self.initialize_weights()

    def _init_settings(self, config: dict[str, Any], native_patch: tuple[int, int, int]) -> None:
        super()._init_settings(config, native_patch)
        self.num_classes = config["num_classes"]
        self.attention = config["attention"]

    # ------------------------------------------------------------------ PatchModel hooks
    _canonical_patch = staticmethod(video_patch)

    @staticmethod
    def _patch_dims(patch: tuple[int, int, int]) -> tuple[int, int, int]:
        return patch

    def initialize_weights(self) -> None:
        self._init_linears_and_patch_embed()
        self._init_timestep_mlp_and_output()
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, as DiT.
        for module in [*(block.adaLN_modulation[-1] for block in self.blocks), self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def grid_size(self, latent_fhw: Sequence[int], patch_size: Sequence[int] | None = None) -> tuple[int, int, int]:
        p = self.native_patch_size if patch_size is None else video_patch(patch_size)
        check_patch_divides(latent_fhw, p)
        return tuple(int(s) // q for s, q in zip(latent_fhw, p))  # type: ignore[return-value]

    def check_patch_size(self, patch_size: Sequence[int] | None, shape: Sequence[int]) -> tuple[int, int, int]:
        """Resolve None to the native patch; one-line errors for a wrong layout, unknown or non-dividing patch."""
        if len(shape) != 5:
            raise ValueError(
                f"{type(self).__name__} takes (N, C, F, H, W) latents, got shape {tuple(shape)}; "
                "stack frames on dim 2 (x.unsqueeze(2) for single images)"
            )
        return super().check_patch_size(patch_size, shape[-3:])

    def position_embedding(self, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> torch.Tensor:
        """(1, T, D): 1-D temporal plus 2-D spatial sin-cos at native-grid coordinates (index · p / p_nat)."""
        ref = self.t_embedder.mlp[0].weight
        nt, nh, _ = self.native_patch_size

        def build() -> torch.Tensor:
            f, h, w = grid
            temporal = sincos_1d(self.hidden_size, torch.arange(f) * (patch_size[0] / nt)).float()  # (F', D)
            spatial = sincos_2d(self.hidden_size, (h, w), patch_size[1] / nh)  # (H'·W', D)
            table = (temporal[:, None] + spatial[None]).reshape(1, f * h * w, self.hidden_size)  # (1, T, D)
            return table.to(device=ref.device, dtype=ref.dtype)

        return cached_table(self._pos_cache, (grid, patch_size, ref.device, ref.dtype), build)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        patch_size: Sequence[int] | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, F, H, W) latents, t: (N,) timesteps, y: (N,) labels -> (N, C_out, F, H, W).

        ``patch_size`` (pt, ph, pw), None = native; ``force_drop_ids`` (N,) fixes the label dropout as in DiT.
        """
        p = self.check_patch_size(patch_size, x.shape)
        grid = self.grid_size(x.shape[-3:], p)  # (F', H', W')
        x = self.embed_patches(x, p) + self.position_embedding(grid, p)  # (N, T, D)
        c = self.embed_condition(t, y, force_drop_ids)  # (N, D)
        x = self.run_blocks(x, c, grid, patch_size=p)  # (N, T, D)
        x = self.final_modulation(x, c)  # (N, T, D)
        x = self.project_out(x, p)  # (N, T, pt·ph·pw·C_out)
        return unpatchify_3d(x, grid, p, self.out_channels)  # (N, C_out, F, H, W)


#################################################################################
#                              VideoDiT configurations                          #
#################################################################################

VideoDiT_models = {
    f"VDiT-{size}/2": partial(VideoDiT, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=(1, 2, 2))
    for size, (depth, hidden, heads) in DIT_SIZES.items()
}


def create_video_model(name: str, **kwargs) -> VideoDiT:
    """Build a registered video DiT, e.g. ``create_video_model("VDiT-S/2", input_size=(16, 32, 32))``."""
    if name not in VideoDiT_models:
        raise ValueError(f"unknown video model {name!r}; choose one of {', '.join(VideoDiT_models)}")
    return VideoDiT_models[name](**kwargs)
