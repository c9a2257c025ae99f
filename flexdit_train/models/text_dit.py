"""Text-conditioned Diffusion Transformer (PixArt-alpha style), flexible through :mod:`flexdit_train.models.flex`.

The network maps (N, C, H, W) latents, timesteps and pre-computed text-encoder outputs (N, L, D_text)
with a padding mask (N, L) to (N, 2C, H, W) (eps and the learned variance value). PixArt-alpha's design:

* adaLN-single: one timestep MLP ``t_block`` (D -> 6D) shared by all blocks, plus a learned per-block
  ``scale_shift_table`` (6, D) added to it; the final layer adds its own (2, D) table to the timestep
  embedding. Block parameters hold no per-block conditioning linear.
* every block: self-attention, then cross-attention from the image tokens to the projected caption
  tokens (``y_embedder.y_proj``, an MLP D_text -> D -> D), then the MLP.
* classifier-free guidance: a dropped caption is replaced by the learned null embedding
  ``y_embedder.y_embedding`` (L, D_text) with an all-valid mask; :meth:`TextDiT.null_text` gives the
  same pair to the sampler, so training and sampling see one unconditional input.

Submodule names follow PixArt-alpha (``t_block``, ``y_embedder.y_proj.fc1``, ``blocks.N.cross_attn.q_linear``
/ ``kv_linear`` / ``proj``, ``blocks.N.scale_shift_table``, ``final_layer.scale_shift_table``), so a
PixArt-XL-2 state dict maps onto ``TextDiT-XL/2`` key for key. Differences from PixArt: the gate rows of
the tables and ``t_block`` start at zero (adaLN-Zero: each block starts as the identity), the null
caption is a trained parameter with an all-valid mask (PixArt keeps it a buffer and reuses the caption's
mask), and attention is torch SDPA instead of xformers.

``flexify`` adds weak patch sizes as in FlexiDiT's text-to-image setting (§3.2 of the paper): LoRA on
self-attention and MLP only, cross-attention frozen without adapters, new embed/de-embed per weak size.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flexdit_train.models.dit import (
    DIT_SIZES,
    Attention,
    Mlp,
    PatchEmbed,
    PatchModel,
    TimestepEmbedder,
    check_patch_divides,
    modulate,
    sincos_2d,
    square_patch,
    to_2tuple,
    unpatchify,
)


class CaptionProjection(nn.Module):
    """Per-token MLP from the text encoder width to the model width (timm Mlp names, as PixArt's y_proj)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (N, L, D)


class CaptionEmbedder(nn.Module):
    """Caption tokens -> model width, with caption dropout to the learned null caption for CFG."""

    def __init__(self, caption_channels: int, hidden_size: int, text_len: int, dropout_prob: float):
        super().__init__()
        self.y_proj = CaptionProjection(caption_channels, hidden_size)
        # PixArt's init scale: unit-variance tokens after the D_text-wide projection.
        self.y_embedding = nn.Parameter(torch.randn(text_len, caption_channels) / caption_channels**0.5)
        self.dropout_prob = dropout_prob

    def forward(
        self,
        caption: torch.Tensor,
        mask: torch.Tensor,
        train: bool,
        force_drop_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # caption: (N, L, D_text); mask: (N, L) bool, True = real token
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(caption.shape[0], device=caption.device) < self.dropout_prob  # (N,)
            else:
                drop = force_drop_ids == 1  # (N,)
            caption = torch.where(drop[:, None, None], self.y_embedding.to(caption.dtype), caption)  # (N, L, D_text)
            mask = mask | drop[:, None]  # (N, L): the null caption uses all its tokens
        return self.y_proj(caption), mask  # (N, L, D), (N, L)


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens (queries) to caption tokens (keys/values), padding masked; also
    SparseDiT's attention between its sparse and dense tokens (no mask)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (N, T, D) image tokens; cond: (N, L, D) caption tokens; mask: (N, L) bool, True = attend (None: all)
        n, t, d = x.shape
        q = self.q_linear(x).reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, T, hd)
        kv = self.kv_linear(cond).reshape(n, cond.shape[1], 2, self.num_heads, self.head_dim)  # (N, L, 2, H, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, L, hd)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (N, 1, 1, L)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, T, hd)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class TextDiTBlock(nn.Module):
    """Self-attention, cross-attention and MLP with adaLN-single modulation (PixArtBlock)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))

    def forward(self, x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: (N, T, D); y: (N, L, D) caption tokens; t0: (N, 6D) shared timestep modulation; mask: (N, L)
        mod = self.scale_shift_table[None] + t0.reshape(x.shape[0], 6, -1)  # (N, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)  # (N, D) each
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + self.cross_attn(x, y, mask)  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class TextFinalLayer(nn.Module):
    """Norm, table-plus-timestep modulation and a linear to p·p·C_out values per token (T2IFinalLayer)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))  # zero modulation, as DiT


class TextDiT(PatchModel):
    """Text-conditioned DiT; ``forward(x, t, text_emb, text_mask)`` with (N, L, D_text) caption embeddings."""

    def __init__(
        self,
        input_size: int | Iterable[int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        caption_channels: int = 4096,
        text_len: int = 120,
        caption_dropout_prob: float = 0.1,
        pe_interpolation: float = 1.0,
        learn_sigma: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        check_patch_divides(to_2tuple(input_size), patch_size)
        self._init_settings(
            dict(
                input_size=list(to_2tuple(input_size)),
                patch_size=patch_size,
                in_channels=in_channels,
                hidden_size=hidden_size,
                depth=depth,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                caption_channels=caption_channels,
                text_len=text_len,
                caption_dropout_prob=caption_dropout_prob,
                pe_interpolation=pe_interpolation,
                learn_sigma=learn_sigma,
            ),
            patch_size,
        )
        self.grad_checkpointing = grad_checkpointing
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, text_len, caption_dropout_prob)
        grid = (self.input_size[0] // patch_size, self.input_size[1] // patch_size)
        # Frozen, as DiT's: the key of PixArt checkpoints; other grids and patch sizes are computed.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([TextDiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = TextFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def _init_settings(self, config: dict[str, Any], native_patch: int) -> None:
        super()._init_settings(config, native_patch)
        self.caption_channels = config["caption_channels"]
        self.text_len = config["text_len"]
        self.pe_interpolation = config["pe_interpolation"]

    # ------------------------------------------------------------------ PatchModel hooks
    _canonical_patch = staticmethod(square_patch)

    @staticmethod
    def _patch_dims(patch: int) -> tuple[int, int]:
        return (patch, patch)

    def position_scale(self, patch: int) -> float:
        """PixArt's ``pe_interpolation`` shrinks the position grid on top of the native-grid coordinates."""
        return super().position_scale(patch) / self.pe_interpolation

    def initialize_weights(self) -> None:
        self._init_linears_and_patch_embed()
        self._init_timestep_mlp_and_output()
        grid = (self.input_size[0] // self.native_patch_size, self.input_size[1] // self.native_patch_size)
        self.pos_embed.data.copy_(sincos_2d(self.hidden_size, grid, 1 / self.pe_interpolation).unsqueeze(0))
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)  # PixArt's init of the caption MLP
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        # adaLN-Zero through adaLN-single: with t_block and the (zero-built) tables at zero every block
        # starts as the identity, as DiT's zero adaLN (PixArt draws the tables at random instead); the
        # caption enters through a zero cross-attention output (PixArt).
        nn.init.zeros_(self.t_block[1].weight)
        nn.init.zeros_(self.t_block[1].bias)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    def null_text(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional caption for CFG: (batch, L, D_text) learned null embedding, (batch, L) all-True mask."""
        emb = self.y_embedder.y_embedding  # (L, D_text)
        mask = torch.ones(batch, self.text_len, dtype=torch.bool, device=emb.device)  # (batch, L)
        return emb.unsqueeze(0).expand(batch, -1, -1), mask

    def check_text(
        self, text_emb: torch.Tensor | None, text_mask: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One-line errors for missing or misshapen caption embeddings; None mask = every token valid."""
        expected = f"(N={batch}, L={self.text_len}, D_text={self.caption_channels})"
        if text_emb is None:
            raise ValueError(
                f"{type(self).__name__} needs text embeddings {expected}: pass the text encoder's output as "
                "text_emb (and text_mask), or model.null_text(N) for the unconditional branch"
            )
        if tuple(text_emb.shape) != (batch, self.text_len, self.caption_channels):
            raise ValueError(
                f"text embeddings have shape {tuple(text_emb.shape)}, expected {expected}; encode captions with "
                f"the text encoder this model was built for (caption_channels={self.caption_channels}) and "
                f"pad or truncate them to text_len={self.text_len} tokens with a text_mask"
            )
        if text_mask is None:
            return text_emb, torch.ones(text_emb.shape[:2], dtype=torch.bool, device=text_emb.device)
        if tuple(text_mask.shape) != tuple(text_emb.shape[:2]):
            raise ValueError(
                f"text_mask has shape {tuple(text_mask.shape)}, expected {tuple(text_emb.shape[:2])} "
                "(True for real caption tokens, False for padding)"
            )
        return text_emb, text_mask.bool()

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_emb: torch.Tensor | None,
        text_mask: torch.Tensor | None = None,
        patch_size: int | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W), t: (N,), text_emb: (N, L, D_text), text_mask: (N, L) bool -> (N, C_out, H, W).

        ``patch_size`` None = native; ``force_drop_ids`` (N,) replaces the random caption dropout (1 = null).
        A mask row with no True entry gives NaN (softmax over nothing); encoders always emit >= 1 token.
        """
        if x.dim() != 4:
            raise ValueError(
                f"{type(self).__name__} takes image latents (N, C, H, W), got shape {tuple(x.shape)}; "
                "video latents need the video DiT (model=video_dit_s_2)"
            )
        p = self.check_patch_size(patch_size, x.shape[-2:])
        text_emb, text_mask = self.check_text(text_emb, text_mask, x.shape[0])
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        x = self.embed_patches(x, p) + self.position_embedding(grid, p)  # (N, T, D)
        t_emb = self.t_embedder(t)  # (N, D)
        t0 = self.t_block(t_emb)  # (N, 6D), shared by every block
        y, mask = self.y_embedder(text_emb, text_mask, self.training, force_drop_ids)  # (N, L, D), (N, L)
        x = self.run_blocks(x, y, t0, mask, patch_size=p)  # (N, T, D)
        shift, scale = (self.final_layer.scale_shift_table[None] + t_emb[:, None]).unbind(1)  # (N, D) each
        x = modulate(self.final_layer.norm_final(x), shift, scale)  # (N, T, D)
        x = self.project_out(x, p)  # (N, T, p·p·C_out)
        return unpatchify(x, grid, p, self.out_channels)  # (N, C_out, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_emb: torch.Tensor,
        cfg_scale: float,
        text_mask: torch.Tensor | None = None,
        guide_all_channels: bool | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """CFG on a batch whose second half carries :meth:`null_text`; see :meth:`PatchModel.forward_with_cfg`."""
        return super().forward_with_cfg(x, t, text_emb, cfg_scale, guide_all_channels, text_mask=text_mask, **kwargs)


#################################################################################
#                              TextDiT configurations                           #
#################################################################################

TextDiT_models = {
    f"TextDiT-{size}/2": partial(TextDiT, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=2)
    for size, (depth, hidden, heads) in DIT_SIZES.items()
}


def create_text_model(name: str, **kwargs) -> TextDiT:
    """Build a registered text DiT, e.g. ``create_text_model("TextDiT-XL/2", input_size=32)`` (PixArt-XL-2 shape)."""
    if name not in TextDiT_models:
        raise ValueError(f"unknown text model {name!r}; choose one of {', '.join(TextDiT_models)}")
    return TextDiT_models[name](**kwargs)
