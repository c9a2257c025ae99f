"""EDT: the U-shaped efficient diffusion transformer of arXiv 2410.23788 (static; arch "edt").

Re-implemented from the paper's description and checked against the shapes of the authors' release
(xinwangChen/EDT). Five stages (in general an odd number 2K + 1) run at token grids 16 -> 8 -> 4 -> 8 -> 16
for a 32x32 latent at patch 2::

    x_embedder + pos -> stage 1 -> down -> stage 2 -> down -> stage 3 -> up(+skip 2) -> stage 4 -> up(+skip 1)
    -> stage 5 -> final_layer

* Blocks are DiT's adaLN-Zero blocks whose attention adds a learned Swin-style relative-position bias
  (one table of (2h-1)(2w-1) entries per head over the stage's fixed grid). The condition vector
  ``c = t_emb + y_emb`` has the width of stage 1 and drives every stage: each adaLN linear projects it
  to its own width, as in the authors' code.
* Down-sampling (``down_blocks``): 2x2 patch merging (4 neighbours concatenated -> 4C), adaLN-modulated
  LayerNorm ("token information enhancement"), bias-free linear 4C -> C_next, plus the sin-cos table of the
  new grid ("positional-encoding supplement").
* Up-sampling (``up_blocks``): bias-free linear C -> 4 C_next and a 2x2 pixel shuffle, concatenation with
  the skip of the same grid (the input of the down stage of that grid, as the authors keep it),
  adaLN-modulated LayerNorm, linear 2C -> C, plus the sin-cos table of the grid.
* EDT's attention modulation matrix works as for every DiT here (``set_attention_modulation``), each AMM
  block using the matrix of its own stage's grid (EDT-S/B: blocks [8, 11]; XL: [24, 26]). The samplers'
  block caching (``cache=``) is refused: its plans price every block alike, EDT's stages do not.
* ``token_mask_ratios`` zeroes random tokens inside the down-sampling modules (after the modulated norm,
  before the reduction): the masked forward of EDT's token relation-enhanced masking training
  (:class:`flexdit_train.training.edt_masking.EDTMaskingModule`, conf/objective/edt_masking.yaml).
  ``position_mask=(b, r)`` adds EDT-XL's extra mask to that forward: before block b (1-indexed) of the first
  stage, a share r of the tokens is replaced by the first stage's position embedding.

EDT is trained from scratch at one resolution and one patch size, so this class is static: the relative-
position tables and the stage grids are fixed by ``input_size`` and ``patch_size``. Flexifying it (several
patch sizes) is out of scope; the arch registry's ``flexible_ref`` points at this class and
:func:`~flexdit_train.models.flexify` refuses it in one line.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flexdit_train.models.amm import modulated_attention
from flexdit_train.models.dit import (
    Attention,
    ClassConditional,
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    PatchModel,
    SquarePatchImage,
    TimestepEmbedder,
    cached_table,
    check_patch_divides,
    modulate,
    sincos_2d,
    to_2tuple,
    unpatchify,
)


def stage_plan(depths: Sequence[int]) -> list[int]:
    """Token-grid downsampling exponent k of each stage (grid = base / 2^k): 0, 1, .., K, .., 1, 0."""
    stages = len(depths)
    return [min(s, stages - 1 - s) for s in range(stages)]


def check_stages(widths: Sequence[int], depths: Sequence[int], num_heads: Sequence[int]) -> None:
    """One-line errors for stage lists that do not describe a U-shaped EDT."""
    if not (len(widths) == len(depths) == len(num_heads)) or len(widths) % 2 == 0:
        raise ValueError(
            f"EDT needs an odd number of stages with one width, depth and head count each, got widths {list(widths)}, "
            f"depths {list(depths)}, num_heads {list(num_heads)}"
        )
    if list(widths) != list(widths)[::-1]:
        raise ValueError(f"EDT widths must mirror around the middle stage (skips are concatenated), got {list(widths)}")
    if min(depths) < 1:
        raise ValueError(f"every EDT stage needs at least one block, got depths {list(depths)}")


def token_keep_mask(batch: int, tokens: int, ratio: float, device: torch.device | str) -> torch.Tensor:
    """(batch, tokens) bool, False for exactly round(ratio · tokens) random tokens of each sample.

    An exact count per sample (EDT's code draws each token independently, the same share in expectation),
    so every sample of a step sees the ratio it was given.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"token mask ratio {ratio} is outside [0, 1); use a share of tokens to zero, e.g. 0.4")
    masked = round(ratio * tokens)
    rank = torch.rand(batch, tokens, device=device).argsort(dim=1).argsort(dim=1)  # (N, T) random permutation
    return rank >= masked  # (N, T)


def relative_position_index(grid_hw: tuple[int, int]) -> torch.Tensor:
    """(T, T) index into a ((2h-1)(2w-1),) table: the offset (di, dj) of token j seen from token i."""
    h, w = grid_hw
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    rows, cols = rows.reshape(-1), cols.reshape(-1)  # (T,) each
    d_row = rows[:, None] - rows[None] + (h - 1)  # (T, T) in [0, 2h-2]
    d_col = cols[:, None] - cols[None] + (w - 1)  # (T, T) in [0, 2w-2]
    return d_row * (2 * w - 1) + d_col  # (T, T)


class RelPosAttention(Attention):
    """:class:`Attention` plus a learned relative-position bias over a fixed (h, w) token grid.

    Without AMM the bias goes to SDPA as its additive mask; with AMM it is added to the explicit logits.
    """

    def __init__(self, dim: int, num_heads: int, grid_hw: tuple[int, int]):
        super().__init__(dim, num_heads, qkv_bias=True)
        h, w = grid_hw
        self.grid = (h, w)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # the index is a function of the grid: built on first use per device, not stored in checkpoints
        self._index_cache: dict = {}

    def relative_position_bias(self) -> torch.Tensor:
        tokens = self.grid[0] * self.grid[1]
        table = self.relative_position_bias_table
        index = cached_table(
            self._index_cache, table.device, lambda: relative_position_index(self.grid).to(table.device)
        )  # (T, T)
        bias = table[index.reshape(-1)]  # (T*T, H)
        return bias.reshape(tokens, tokens, self.num_heads).permute(2, 0, 1)  # (H, T, T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, hd)
        bias = self.relative_position_bias().to(q.dtype)  # (H, T, T)
        if self.modulation is None:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (N, H, T, hd)
        else:
            x = modulated_attention(q, k, v, self.modulation(t, x.device), bias)  # (N, H, T, hd)
        x = x.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj(x)


class EDTBlock(DiTBlock):
    """DiT's adaLN-Zero block with relative-position attention; its adaLN reads the stage-1-wide condition."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cond_dim: int, grid_hw: tuple[int, int]):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        # replace DiT's attention and D -> 6D modulation (cond_dim = the stage-1 width, not this stage's)
        self.attn = RelPosAttention(hidden_size, num_heads, grid_hw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * hidden_size, bias=True))


class PatchMerge(nn.Module):
    """Down-sampling: 2x2 token merge (4C), adaLN-modulated LayerNorm, bias-free linear 4C -> C_next, + sin-cos."""

    def __init__(self, width: int, out_width: int, cond_dim: int, grid_hw: tuple[int, int]):
        super().__init__()
        self.grid = grid_hw  # input grid; the output grid is half of it
        self.norm = nn.LayerNorm(4 * width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * 4 * width, bias=True))
        self.reduction = nn.Linear(4 * width, out_width, bias=False)
        out_grid = (grid_hw[0] // 2, grid_hw[1] // 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, out_grid[0] * out_grid[1], out_width), requires_grad=False)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(N, h*w, C) -> (N, h/2*w/2, 4C); the 4C hold the 2x2 neighbours column-major, as the authors'."""
        n, _, c = x.shape
        h, w = self.grid
        x = x.reshape(n, h // 2, 2, w // 2, 2, c)  # (N, h/2, row offset, w/2, column offset, C)
        return x.permute(0, 1, 3, 4, 2, 5).reshape(n, (h // 2) * (w // 2), 4 * c)  # (N, T/4, 4C)

    def forward(self, x: torch.Tensor, c: torch.Tensor, token_keep: torch.Tensor | None = None) -> torch.Tensor:
        # x: (N, h*w, C); c: (N, cond_dim); token_keep: None or (N, h*w) 1 = keep, 0 = zeroed (masking training)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, 4C) each
        x = modulate(self.norm(self.merge(x)), shift, scale)  # (N, T/4, 4C)
        if token_keep is not None:
            # a token's C channels are zeroed wherever it sits inside its merged 4C vector
            keep = self.merge(token_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1] // 4).to(x.dtype))  # (N, T/4, 4C)
            x = x * keep
        return self.reduction(x) + self.pos_embed  # (N, T/4, C_next)


class PatchExpand(nn.Module):
    """Up-sampling: bias-free linear C -> 4 C_next, 2x2 pixel shuffle, concat skip, adaLN LayerNorm, 2C -> C, + sin-cos."""

    def __init__(self, width: int, out_width: int, cond_dim: int, grid_hw: tuple[int, int]):
        super().__init__()
        self.grid = grid_hw  # input grid; the output grid is twice it
        self.expand = nn.Linear(width, 4 * out_width, bias=False)
        self.norm = nn.LayerNorm(2 * out_width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * 2 * out_width, bias=True))
        self.fuse = nn.Linear(2 * out_width, out_width, bias=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4 * grid_hw[0] * grid_hw[1], out_width), requires_grad=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (N, h*w, C); skip: (N, 2h*2w, C_next); c: (N, cond_dim)
        n = x.shape[0]
        h, w = self.grid
        x = self.expand(x)  # (N, h*w, 4 C_next)
        x = x.reshape(n, h, w, 2, 2, -1).permute(0, 1, 3, 2, 4, 5)  # (N, h, row offset, w, column offset, C_next)
        x = torch.cat([x.reshape(n, 4 * h * w, -1), skip], dim=-1)  # (N, 4hw, 2 C_next)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, 2 C_next) each
        return self.fuse(modulate(self.norm(x), shift, scale)) + self.pos_embed  # (N, 4hw, C_next)


class EDT(ClassConditional, SquarePatchImage, PatchModel):
    """U-shaped EDT with DiT's interface: ``forward(x, t, y)``, ``forward_with_cfg``, ``config``."""

    def __init__(
        self,
        input_size: int | Sequence[int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        widths: Sequence[int] = (312, 416, 520, 416, 312),
        depths: Sequence[int] = (2, 2, 2, 3, 3),
        num_heads: Sequence[int] = (6, 8, 10, 8, 6),
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        hidden_size: int | None = None,
        depth: int | None = None,
        grad_checkpointing: bool = False,
        label_embed_std: float = 0.02,
    ):
        super().__init__()
        if isinstance(input_size, nn.Module):  # what flexify(edt) passes: the arch's flexible class is this one
            raise ValueError("EDT is static (one patch size, fixed stage grids): flexifying it is not supported")
        widths, depths, num_heads = [int(v) for v in widths], [int(v) for v in depths], [int(v) for v in num_heads]
        check_stages(widths, depths, num_heads)
        # hidden_size and depth are derived; a stored config carries them (the cost model reads them) and
        # passes them back, so they must agree
        for name, given, derived in (("hidden_size", hidden_size, widths[0]), ("depth", depth, sum(depths))):
            if given is not None and int(given) != derived:
                raise ValueError(f"EDT {name}={given} disagrees with its stages ({derived}); drop {name}")
        size = to_2tuple(input_size)
        down = len(depths) // 2
        check_patch_divides(size, patch_size * 2**down)  # every down-sampling halves an even grid
        self._init_settings(
            dict(
                input_size=list(size),
                patch_size=patch_size,
                in_channels=in_channels,
                hidden_size=widths[0],
                depth=sum(depths),
                num_heads=num_heads,
                widths=widths,
                depths=depths,
                mlp_ratio=mlp_ratio,
                class_dropout_prob=class_dropout_prob,
                num_classes=num_classes,
                learn_sigma=learn_sigma,
            ),
            patch_size,
        )
        self.grad_checkpointing = grad_checkpointing
        self.widths, self.depths = widths, depths
        cond = widths[0]
        base = self.grid_size(size)
        self.stage_grids = [(base[0] >> k, base[1] >> k) for k in stage_plan(depths)]

        self.x_embedder = PatchEmbed(patch_size, in_channels, cond)
        self.t_embedder = TimestepEmbedder(cond)
        self.y_embedder = LabelEmbedder(num_classes, cond, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, base[0] * base[1], cond), requires_grad=False)
        self.blocks = nn.ModuleList(
            EDTBlock(widths[s], num_heads[s], mlp_ratio, cond, self.stage_grids[s])
            for s in range(len(depths))
            for _ in range(depths[s])
        )
        self.down_blocks = nn.ModuleList(
            PatchMerge(widths[s], widths[s + 1], cond, self.stage_grids[s]) for s in range(down)
        )
        self.up_blocks = nn.ModuleList(
            PatchExpand(widths[s - 1], widths[s], cond, self.stage_grids[s - 1]) for s in range(down + 1, len(depths))
        )
        self.final_layer = FinalLayer(widths[-1], patch_size, self.out_channels)
        self.initialize_weights(label_embed_std)

    def initialize_weights(self, label_embed_std: float = 0.02) -> None:
        """DiT's initialisation (xavier linears, N(0, 0.02) timestep MLP, zero output), sin-cos tables of every
        grid, and zero for every conditioning layer: blocks start as the identity, and the down/up norms start
        unmodulated. The relative-position tables keep their truncated-normal init."""
        self._init_linears_and_patch_embed()  # linears only: the bias tables are plain parameters
        self.pos_embed.data.copy_(sincos_2d(self.hidden_size, self.stage_grids[0]).unsqueeze(0))
        down = len(self.down_blocks)
        for s, module in enumerate(self.down_blocks):
            module.pos_embed.data.copy_(sincos_2d(self.widths[s + 1], self.stage_grids[s + 1]).unsqueeze(0))
        for i, module in enumerate(self.up_blocks):
            s = down + 1 + i
            module.pos_embed.data.copy_(sincos_2d(self.widths[s], self.stage_grids[s]).unsqueeze(0))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=label_embed_std)
        self._init_timestep_mlp_and_output()
        for module in [*self.blocks, *self.down_blocks, *self.up_blocks, self.final_layer]:
            nn.init.zeros_(module.adaLN_modulation[-1].weight)
            nn.init.zeros_(module.adaLN_modulation[-1].bias)

    # ------------------------------------------------------------------ attention modulation
    def attention_layers(self) -> list[tuple[nn.Module, int]]:
        """Each block's attention and its stage's grid downsampling factor 2^k (AMM matrix per stage grid)."""
        plan = stage_plan(self.depths)
        return [(block.attn, 2 ** plan[s]) for block, s in zip(self.blocks, self._block_stages(), strict=True)]

    def _block_stages(self) -> list[int]:
        return [s for s, depth in enumerate(self.depths) for _ in range(depth)]

    def check_position_mask(self, position_mask: Sequence[float]) -> None:
        """One-line error unless ``(block, ratio)`` names a block of the first stage and a share in [0, 1)."""
        block, ratio = position_mask
        if int(block) != block or not 1 <= block <= self.depths[0] or not 0.0 <= ratio < 1.0:
            raise ValueError(
                f"position_mask=({block}, {ratio}) needs a block 1..{self.depths[0]} of the first stage (1-indexed) "
                "and a share of tokens in [0, 1), e.g. (5, 0.2) for EDT-XL"
            )

    # ------------------------------------------------------------------ forward
    def _block(self, block: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, c, use_reentrant=False)  # (N, T, D)
        return block(x, c)  # (N, T, D)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        patch_size: int | None = None,
        force_drop_ids: torch.Tensor | None = None,
        token_mask_ratios: Sequence[float] | None = None,
        position_mask: tuple[int, float] | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels -> (N, C_out, H, W).

        ``patch_size`` None or the native one; ``force_drop_ids`` as DiT's. ``token_mask_ratios`` (one per
        down-sampling module) zeroes that share of random tokens inside it (masking training).
        ``position_mask=(b, r)`` replaces a share r of random tokens by the position embedding before block b
        (1-indexed) of the first stage: EDT-XL's extra masking, which makes the network infer a token's content
        from its neighbours in the full-resolution stage.
        """
        if self.block_cache is not None:
            # the sampler's block plans price every block alike (CostModel.block_macs), EDT's stages do not
            raise ValueError(
                "EDT does not support block caching (its blocks cost differently per stage grid); sample it with "
                "cache=none and a budget without cache_policy"
            )
        p = self.check_patch_size(patch_size, x.shape[-2:])
        if list(x.shape[-2:]) != list(self.input_size):
            size = "x".join(map(str, x.shape[-2:]))
            raise ValueError(
                f"EDT has fixed stage grids for {self.input_size[0]}x{self.input_size[1]} latents, got {size}; "
                "build it with that input_size"
            )
        if token_mask_ratios is not None and len(token_mask_ratios) != len(self.down_blocks):
            raise ValueError(
                f"token_mask_ratios needs one ratio per down-sampling module ({len(self.down_blocks)}), "
                f"got {list(token_mask_ratios)}"
            )
        if position_mask is not None:
            self.check_position_mask(position_mask)
        grid = self.stage_grids[0]
        pos = self.position_embedding(grid, p)  # (1, T, D_1)
        x = self.embed_patches(x, p) + pos  # (N, T, D_1)
        c = self.embed_condition(t, y, force_drop_ids)  # (N, D_1)
        blocks = iter(self.blocks)
        down = len(self.down_blocks)
        skips = []
        for s, depth in enumerate(self.depths):
            if s > down:
                x = self.up_blocks[s - down - 1](x, skips.pop(), c)  # (N, T_s, D_s)
            if s < down:
                skips.append(x)  # the stage's input is its skip, as in the authors' code
            for j in range(depth):
                if s == 0 and position_mask is not None and j == position_mask[0] - 1:
                    keep = token_keep_mask(x.shape[0], x.shape[1], float(position_mask[1]), x.device)  # (N, T)
                    x = torch.where(keep.unsqueeze(-1), x, pos.to(x.dtype))  # (N, T, D_1)
                x = self._block(next(blocks), x, c)  # (N, T_s, D_s)
            if s < down:
                keep = None
                if token_mask_ratios is not None:
                    keep = token_keep_mask(x.shape[0], x.shape[1], float(token_mask_ratios[s]), x.device)  # (N, T_s)
                x = self.down_blocks[s](x, c, keep)  # (N, T_s / 4, D_{s+1})
        x = self.final_modulation(x, c)  # (N, T, D_1)
        x = self.project_out(x, p)  # (N, T, p*p*C_out)
        return unpatchify(x, grid, p, self.out_channels)  # (N, C_out, H, W)


#################################################################################
#                                EDT configurations                             #
#################################################################################

# (widths, depths, heads) per size, patch 2. B and S as in the authors' release. EDT-XL as in the paper: its
# 51.83 GMAC and 708.44 M parameters are exactly depths [5, 5, 4, 7, 7]; the release's [6, 4, 4, 7, 7] gives
# 53.44 GMAC and 698.52 M (EDT_XL_RELEASE_DEPTHS). Every split that moves one block between those two stages
# has the paper's figures; the AMM blocks 24 and 26 lie in the last 16x16 stage with either.
EDT_XL_RELEASE_DEPTHS = (6, 4, 4, 7, 7)
EDT_SIZES = {
    "XL": ((936, 1248, 1560, 1248, 936), (5, 5, 4, 7, 7), (18, 24, 30, 24, 18)),
    "B": ((624, 832, 1040, 832, 624), (2, 2, 2, 3, 3), (12, 16, 20, 16, 12)),
    "S": ((312, 416, 520, 416, 312), (2, 2, 2, 3, 3), (6, 8, 10, 8, 6)),
}
# The blocks the authors modulate at sampling (1-indexed; S/B for CFG <= 1.5, block 9 for CFG >= 2)
EDT_AMM_BLOCKS = {"XL": (24, 26), "B": (8, 11), "S": (8, 11)}


def _make_factory(name: str, widths: tuple, depths: tuple, heads: tuple, patch: int):
    def factory(
        input_size: int | Sequence[int] = 32,
        num_classes: int = 1000,
        in_channels: int = 4,
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
        **kwargs,
    ) -> EDT:
        # the name fixes the stages, as it fixes DiT's sizes (models.factory.PRESET_SIZES): a model config's
        # explicit widths / depths (conf/model/edt_mnist.yaml with model.name=EDT-S/2) give way to it
        for key in ("widths", "depths", "hidden_size", "depth"):
            kwargs.pop(key, None)
        return EDT(
            input_size=input_size,
            patch_size=patch,
            in_channels=in_channels,
            widths=widths,
            depths=depths,
            num_heads=heads,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            class_dropout_prob=class_dropout_prob,
            **kwargs,
        )

    factory.__name__ = name.replace("-", "_").replace("/", "_")
    factory.__doc__ = f"{name}: widths {list(widths)}, depths {list(depths)}, heads {list(heads)}, patch {patch}."
    # what the name fixes, as config keys: the cost model reads it without building the model
    factory.preset_config = dict(
        patch_size=patch, widths=list(widths), depths=list(depths), num_heads=list(heads),
        hidden_size=widths[0], depth=sum(depths),
    )
    return factory


EDT_models = {f"EDT-{size}/2": _make_factory(f"EDT-{size}/2", *EDT_SIZES[size], 2) for size in ("XL", "B", "S")}


__all__ = ["EDT", "EDT_AMM_BLOCKS", "EDT_SIZES", "EDT_models"]
