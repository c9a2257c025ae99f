"""SparseDiT (arXiv 2412.06028, first titled FlexDiT): a pretrained DiT re-wired to vary token density over depth.

Re-implemented from the paper and checked against the layout of the authors' release (changsn/SparseDiT). The
28 layers of DiT-XL/2 become, bottom to top (``layout``)::

    2 Poolingformer blocks (dense) -> 4 Sparse-Dense Token Modules of [1, 3, 1, 1] layers -> 2 dense DiT blocks

* *Poolingformer block* (``pooling``): DiT's adaLN-Zero block whose token mixer has no queries or keys. Its
  attention map would be uniform (1/T), so the mixer is ``proj(mean_tokens(v(x)))`` broadcast to every token;
  ``attn.v`` and ``attn.proj`` come from the pretrained ``qkv`` (its v third) and ``proj``.
* *SDTM* (the release's "dumbbell"), on a dense H x W token map and a sparse grid s (per forward):
  1. the sparse tokens are the adaptive average pool of the dense map to s x s;
  2. ``sparse_gen`` block(s): the sparse tokens attend to all dense tokens (cross-attention; the dense keys and
     values pass the same adaLN-modulated norm as the queries), plus the MLP;
  3. ``sparse`` blocks: DiT blocks on the s² sparse tokens (where the compute is saved);
  4. one ``recovery`` block: the sparse tokens nearest-upsampled to H x W give
     ``X_merged = merge_sparse(Up(X_s)) + merge_dense(X_dense)`` (merge_sparse = 0, merge_dense = I, zero
     biases at init, so X_merged starts as the module's dense input), then cross-attention with queries
     X_merged and keys/values the sparse tokens, residual on X_merged, plus the MLP;
  5. ``dense`` DiT block(s).
* The top ``dense`` DiT blocks and DiT's embedders and final layer are unchanged.

Every layer keeps DiT's submodule names (``blocks.i.adaLN_modulation``, ``.mlp.fc1``, ``.attn.proj``; the
cross-attention, the text DiT's, splits ``qkv`` into ``attn.q_linear`` and ``attn.kv_linear``, the Poolingformer
keeps ``attn.v``), and :meth:`SparseDiT.from_dit` loads layer i from the source DiT's block i. The sparse grid is a forward argument
(``sparse_grid``; the config's ``sparse_grid`` when None), so a sampler can change it per step (SparseDiT's
temporal token density: :class:`flexdit_train.sampling.schedule.SparseDensity`); the network knows nothing about
diffusion. Static (one patch size): flexify refuses it, as it refuses EDT. The samplers' block caching is refused
too: its plans price every block alike, and SparseDiT's blocks run on different token counts.

Two choices keep the linears of the released code, on which the paper's GMAC figures were counted: the
Poolingformer applies ``v`` to every token before the mean (``v(mean(x))`` would be equal up to rounding and
cheaper), and the recovery merge applies ``merge_sparse`` after the upsampling (not on the s² tokens before it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flexdit_train.models.arch import arch_of
from flexdit_train.models.dit import (
    ClassConditional,
    DiTBlock,
    FinalLayer,
    Mlp,
    PatchModel,
    SquarePatchImage,
    check_patch_divides,
    modulate,
    to_2tuple,
)
from flexdit_train.models.text_dit import CrossAttention

# Layer kinds, in the order an SDTM runs them (``sdtm_layers`` counts each).
POOLING, SPARSE_GEN, SPARSE, RECOVERY, DENSE = "pooling", "sparse_gen", "sparse", "recovery", "dense"
SDTM_KINDS = (SPARSE_GEN, SPARSE, RECOVERY, DENSE)
# The default sparse grids as shares of the dense grid's side: the paper's 6x6 -> 10x10 (and the release's fixed
# 8x8) of DiT-XL/2's 16x16 tokens at 256 px.
DENSITY_RANGE_SHARE = (0.375, 0.625)
FIXED_GRID_SHARE = 0.5


def sparse_layout(num_pooling: int, num_sdtm: int, sdtm_layers: Sequence[int], num_top: int) -> list[str]:
    """The kind of every layer, bottom to top: pooling, then each SDTM's kinds, then the top dense blocks."""
    layers = [int(n) for n in sdtm_layers]
    if len(layers) != 4 or layers[0] < 1 or layers[2] != 1 or min(layers) < 0:
        raise ValueError(
            f"sdtm_layers={list(sdtm_layers)} must count [sparse_gen >= 1, sparse >= 0, recovery = 1, dense >= 0] "
            "layers of one SDTM, e.g. [1, 3, 1, 1]"
        )
    if num_sdtm < 1 or num_pooling < 0 or num_top < 0:
        raise ValueError(
            f"SparseDiT needs num_sdtm >= 1 and num_pooling, num_top >= 0, got {num_sdtm}, {num_pooling}, {num_top}"
        )
    module = [kind for kind, n in zip(SDTM_KINDS, layers, strict=True) for _ in range(n)]
    return [POOLING] * num_pooling + module * num_sdtm + [DENSE] * num_top


def sparse_grid_pair(grid: int | Sequence[int], dense_hw: tuple[int, int]) -> tuple[int, int]:
    """(sh, sw) of a sparse grid given as s (s x s) or a pair; one-line error unless 1 <= s <= the dense grid."""
    sh, sw = to_2tuple(grid)
    if not (1 <= sh <= dense_hw[0] and 1 <= sw <= dense_hw[1]):
        raise ValueError(
            f"sparse grid {sh}x{sw} does not fit the {dense_hw[0]}x{dense_hw[1]} dense token grid; "
            f"use 1..{min(dense_hw)} (e.g. sparse_grid={max(1, dense_hw[0] // 2)})"
        )
    return sh, sw


def default_sparse_grids(dense_side: int) -> tuple[int, tuple[int, int]]:
    """(fixed grid, (smallest, largest) grid of the density schedule) for a dense grid of ``dense_side`` tokens."""
    lo, hi = (max(1, round(share * dense_side)) for share in DENSITY_RANGE_SHARE)
    return max(1, round(FIXED_GRID_SHARE * dense_side)), (lo, hi)


def pool_tokens(x: torch.Tensor, dense_hw: tuple[int, int], sparse_hw: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pool of a dense token map: (N, H*W, D) -> (N, sh*sw, D), row-major."""
    n, _, d = x.shape
    grid = x.transpose(1, 2).reshape(n, d, *dense_hw)  # (N, D, H, W)
    return F.adaptive_avg_pool2d(grid, sparse_hw).flatten(2).transpose(1, 2)  # (N, sh*sw, D)


def upsample_tokens(x: torch.Tensor, sparse_hw: tuple[int, int], dense_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of a sparse token map: (N, sh*sw, D) -> (N, H*W, D), row-major."""
    n, _, d = x.shape
    grid = x.transpose(1, 2).reshape(n, d, *sparse_hw)  # (N, D, sh, sw)
    return F.interpolate(grid, size=dense_hw, mode="nearest").flatten(2).transpose(1, 2)  # (N, H*W, D)


#################################################################################
#                                 Token mixers                                  #
#################################################################################


class PoolingAttention(nn.Module):
    """Attention with a uniform map: ``proj(mean_tokens(v(x)))`` for every token (no queries, no keys).

    A uniform map averages the values of all tokens in every head alike, so the heads need no split.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.v = nn.Linear(dim, dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.v(x).mean(dim=1, keepdim=True)  # (N, 1, D)
        return self.proj(pooled).expand_as(x)  # (N, T, D)


#################################################################################
#                                    Blocks                                     #
#################################################################################


class PoolingformerBlock(DiTBlock):
    """DiT's adaLN-Zero block with the uniform-attention mixer (:class:`PoolingAttention`)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.attn = PoolingAttention(hidden_size)


class CrossBlock(nn.Module):
    """adaLN-Zero block whose attention reads a second token set; the sparse-gen block of an SDTM.

    Queries and context pass the same adaLN-modulated norm (``norm1``, shift and scale of this block).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def mix(self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Residual cross-attention and MLP on ``x``: (N, T, D) queries, (N, M, D) context, (N, D) condition."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (N, T, D)
        ctx = modulate(self.norm1(context), shift_msa, scale_msa)  # (N, M, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(h, ctx)  # (N, T, D)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # sparse: (N, M, D) queries; dense: (N, T, D) keys and values
        return self.mix(sparse, dense, c)  # (N, M, D)


class RecoveryBlock(CrossBlock):
    """The dense-recovery block: merge the upsampled sparse tokens into the dense ones, then attend to the sparse."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.merge_sparse = nn.Linear(hidden_size, hidden_size)  # W1: zero at init
        self.merge_dense = nn.Linear(hidden_size, hidden_size)  # W2: identity at init

    def reset_merge(self) -> None:
        """W1 = 0, W2 = I, zero biases: X_merged starts as the dense input exactly."""
        nn.init.zeros_(self.merge_sparse.weight)
        nn.init.zeros_(self.merge_sparse.bias)
        nn.init.eye_(self.merge_dense.weight)
        nn.init.zeros_(self.merge_dense.bias)

    def merge(self, sparse: torch.Tensor, dense: torch.Tensor, sparse_hw: tuple[int, int],
              dense_hw: tuple[int, int]) -> torch.Tensor:
        """X_merged = W1·Up(X_s) + W2·X_dense: (N, M, D) and (N, T, D) -> (N, T, D)."""
        return self.merge_sparse(upsample_tokens(sparse, sparse_hw, dense_hw)) + self.merge_dense(dense)  # (N, T, D)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor, c: torch.Tensor, sparse_hw: tuple[int, int],
                dense_hw: tuple[int, int]) -> torch.Tensor:
        merged = self.merge(sparse, dense, sparse_hw, dense_hw)  # (N, T, D)
        return self.mix(merged, sparse, c)  # (N, T, D)


BLOCK_CLASSES = {POOLING: PoolingformerBlock, SPARSE_GEN: CrossBlock, SPARSE: DiTBlock, RECOVERY: RecoveryBlock,
                 DENSE: DiTBlock}


#################################################################################
#                                   SparseDiT                                   #
#################################################################################


class SparseDiT(ClassConditional, SquarePatchImage, PatchModel):
    """SparseDiT with DiT's interface (``forward(x, t, y)``, ``forward_with_cfg``, ``config``) plus ``sparse_grid``."""

    def __init__(
        self,
        input_size: int | Sequence[int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        num_heads: int = 16,
        num_pooling: int = 2,
        num_sdtm: int = 4,
        sdtm_layers: Sequence[int] = (1, 3, 1, 1),
        num_top: int = 2,
        sparse_grid: int | None = None,
        sparse_grid_range: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        depth: int | None = None,
        grad_checkpointing: bool = False,
        label_embed_std: float = 0.02,
    ):
        super().__init__()
        if isinstance(input_size, nn.Module):  # what flexify(sparse_dit) passes: the arch's flexible class is this one
            raise ValueError("SparseDiT is static (one patch size): flexifying it is not supported")
        layout = sparse_layout(int(num_pooling), int(num_sdtm), sdtm_layers, int(num_top))
        if depth is not None and int(depth) != len(layout):
            raise ValueError(f"SparseDiT depth={depth} disagrees with its layers ({len(layout)}); drop depth")
        size = to_2tuple(input_size)
        check_patch_divides(size, patch_size)
        dense_hw = (size[0] // patch_size, size[1] // patch_size)
        fixed, density = default_sparse_grids(min(dense_hw))
        sparse_grid = fixed if sparse_grid is None else int(sparse_grid)
        density = density if sparse_grid_range is None else tuple(int(s) for s in sparse_grid_range)
        if len(density) != 2 or density[0] > density[1]:
            raise ValueError(f"sparse_grid_range={list(density)} must be [smallest, largest] sparse grid sides")
        for s in (sparse_grid, *density):
            sparse_grid_pair(s, dense_hw)
        self._init_settings(
            dict(
                input_size=list(size),
                patch_size=patch_size,
                in_channels=in_channels,
                hidden_size=hidden_size,
                depth=len(layout),
                num_heads=num_heads,
                num_pooling=int(num_pooling),
                num_sdtm=int(num_sdtm),
                sdtm_layers=[int(n) for n in sdtm_layers],
                num_top=int(num_top),
                sparse_grid=sparse_grid,
                sparse_grid_range=list(density),
                mlp_ratio=mlp_ratio,
                class_dropout_prob=class_dropout_prob,
                num_classes=num_classes,
                learn_sigma=learn_sigma,
            ),
            patch_size,
        )
        self.grad_checkpointing = grad_checkpointing
        self.layout = layout
        self.sparse_grid = sparse_grid

        self._init_embedders(class_dropout_prob)
        self.blocks = nn.ModuleList(BLOCK_CLASSES[kind](hidden_size, num_heads, mlp_ratio) for kind in layout)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights(label_embed_std)

    def initialize_weights(self, label_embed_std: float = 0.02) -> None:
        """DiT's initialisation, adaLN-Zero in every block, and the recovery merges at W1 = 0, W2 = I."""
        self._init_image_weights(label_embed_std)
        for block in self.blocks:
            if isinstance(block, RecoveryBlock):
                block.reset_merge()

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_dit(cls, dit: nn.Module, **layout: Any) -> SparseDiT:
        """A SparseDiT whose every layer is loaded, in order, from a static DiT's blocks (and its embedders and
        final layer): block i of the DiT fills layer i. ``layout``: the SparseDiT arguments that are not the DiT's
        (num_pooling, num_sdtm, sdtm_layers, num_top, sparse_grid, sparse_grid_range; label_embed_std is ignored).
        """
        if arch_of(dit).name != "dit" or getattr(dit, "flex_config", None) is not None:
            raise ValueError(
                f"SparseDiT converts a static DiT, got a {type(dit).__name__}; export the native DiT first "
                "(flexdit_train.models.export_official)"
            )
        config = {k: v for k, v in dit.config.items() if k != "depth"}
        layout = {k: v for k, v in layout.items() if k not in ("label_embed_std", "depth")}
        with torch.device("meta"):
            net = cls(**config, **layout)
        if net.config["depth"] != dit.config["depth"]:
            raise ValueError(
                f"the SparseDiT layout has {net.config['depth']} layers, the DiT {dit.config['depth']}; every layer "
                "is loaded from one DiT block: choose num_pooling, num_sdtm, sdtm_layers, num_top to sum to the DiT's"
            )
        state = {k: v.clone() for k, v in converted_state_dict(dit.state_dict(), net.layout).items()}  # own storage
        like = state["x_embedder.proj.bias"]
        for key, value in net.state_dict().items():
            if ".merge_" in key:  # no DiT counterpart: W1 = 0, W2 = I, zero biases
                identity = key.endswith("merge_dense.weight")
                state[key] = torch.eye(value.shape[0]).to(like) if identity else torch.zeros(value.shape).to(like)
        net.load_state_dict(state, strict=True, assign=True)
        net.diffusion_process = getattr(dit, "diffusion_process", None)  # the process the weights were trained for
        return net

    # ------------------------------------------------------------------ options this arch does not take
    def set_attention_modulation(self, blocks: Sequence[int] | None) -> None:
        """EDT's AMM multiplies a self-attention map over one token grid; SparseDiT's layers have none to modulate."""
        if blocks:
            raise ValueError("SparseDiT does not support attention modulation (AMM); sample it with amm_blocks=[]")
        self.amm_blocks = ()

    # ------------------------------------------------------------------ forward
    def _call(self, block: nn.Module, *args: Any) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def run_sparse_blocks(self, x: torch.Tensor, c: torch.Tensor, dense_hw: tuple[int, int],
                          sparse_grid: int | Sequence[int] | None) -> torch.Tensor:
        """(N, H*W, D) dense tokens through every layer; each SDTM pools them to the sparse grid (None: the config's)
        and recovers them."""
        sparse_hw = sparse_grid_pair(self.sparse_grid if sparse_grid is None else sparse_grid, dense_hw)
        dense = x
        previous = None
        for kind, block in zip(self.layout, self.blocks, strict=True):
            if kind == SPARSE_GEN:
                if previous != SPARSE_GEN:  # a new SDTM: its dense input and its pooled sparse tokens
                    dense = x  # (N, T, D)
                    x = pool_tokens(dense, dense_hw, sparse_hw)  # (N, M, D)
                x = self._call(block, x, dense, c)  # (N, M, D)
            elif kind == RECOVERY:
                x = self._call(block, x, dense, c, sparse_hw, dense_hw)  # (N, T, D)
            else:
                x = self._call(block, x, c)  # (N, M, D) sparse, (N, T, D) otherwise
            previous = kind
        return x

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        patch_size: int | None = None,
        force_drop_ids: torch.Tensor | None = None,
        sparse_grid: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels -> (N, C_out, H, W).

        ``sparse_grid``: the side s (or (sh, sw)) of every SDTM's sparse token grid for this call; None takes the
        config's ``sparse_grid``. ``patch_size`` None or the native one; ``force_drop_ids`` as DiT's.
        """
        if self.block_cache is not None:
            # the sampler's block plans price every block alike (CostModel.block_macs); these run on s² or H*W tokens
            raise ValueError(
                "SparseDiT does not support block caching (its layers cost differently per sparse grid); sample it "
                "with cache=none and a budget without cache_policy"
            )
        return self._image_forward(
            x, t, y, patch_size, force_drop_ids, lambda h, c, grid, p: self.run_sparse_blocks(h, c, grid, sparse_grid)
        )


def converted_state_dict(dit_state: dict[str, torch.Tensor], layout: Sequence[str]) -> dict[str, torch.Tensor]:
    """A DiT state dict in SparseDiT's keys (without the recovery merges): block i fills layer i of ``layout``.

    Self-attention blocks keep ``attn.qkv``; cross-attention takes ``attn.q_linear`` from the q third of ``qkv`` and
    ``attn.kv_linear`` from its k and v thirds; the Poolingformer takes ``attn.v`` from the v third. Views, not copies.
    """
    out = {}
    for key, value in dit_state.items():
        parts = key.split(".")
        if parts[0] != "blocks":
            out[key] = value
            continue
        kind = layout[int(parts[1])]
        if parts[2:4] != ["attn", "qkv"] or kind in (SPARSE, DENSE):
            out[key] = value
            continue
        prefix, leaf = ".".join(parts[:3]), parts[-1]  # blocks.i.attn, weight / bias
        width = value.shape[0] // 3
        if kind == POOLING:
            out[f"{prefix}.v.{leaf}"] = value[2 * width :]
        else:
            out[f"{prefix}.q_linear.{leaf}"] = value[:width]
            out[f"{prefix}.kv_linear.{leaf}"] = value[width:]
    return out


#################################################################################
#                             SparseDiT configurations                          #
#################################################################################

# (width, heads, num_pooling, num_sdtm, sdtm_layers, num_top) per preset: the paper's DiT-XL/2 conversion.
SPARSE_DIT_SIZES = {"XL": (1152, 16, 2, 4, (1, 3, 1, 1), 2)}


def _make_factory(name: str, hidden: int, heads: int, pooling: int, sdtm: int, layers: tuple, top: int, patch: int):
    fixed = dict(patch_size=patch, hidden_size=hidden, num_heads=heads, num_pooling=pooling, num_sdtm=sdtm,
                 sdtm_layers=list(layers), num_top=top)

    def factory(**kwargs: Any) -> SparseDiT:
        # the name fixes the sizes and the layer layout (a config's own give way, as DiT's names do); the shapes,
        # the sparse grids (default: from the latent size) and the rest come from kwargs
        kwargs.pop("depth", None)
        return SparseDiT(**{**kwargs, **fixed})

    factory.__name__ = name.replace("-", "_").replace("/", "_")
    factory.__doc__ = (f"{name}: width {hidden}, {heads} heads, {pooling} Poolingformer, {sdtm} SDTM x {list(layers)}, "
                       f"{top} top blocks, patch {patch}.")
    return factory


LAYOUT_KEYS = ("num_pooling", "num_sdtm", "sdtm_layers", "num_top", "sparse_grid", "sparse_grid_range")


def convert_pretrained(dit: nn.Module, name: str | None = None, **config: Any) -> SparseDiT:
    """What ``build_model(arch="sparse_dit", pretrained=<a DiT file>)`` builds: :meth:`SparseDiT.from_dit` with the
    layout of the preset ``name`` (SparseDiT-XL/2) or of the model config's layout keys; the sparse grids from the
    config when set, else from the latent size."""
    layout = {k: config[k] for k in LAYOUT_KEYS if config.get(k) is not None}
    if name is not None:
        if name not in SparseDiT_models:
            raise ValueError(f"unknown sparse_dit model {name!r}; choose one of {', '.join(SparseDiT_models)}")
        hidden, heads, pooling, sdtm, layers, top = SPARSE_DIT_SIZES[name.removeprefix("SparseDiT-").split("/")[0]]
        if (dit.config["hidden_size"], dit.config["num_heads"]) != (hidden, heads):
            raise ValueError(
                f"the pretrained DiT has width {dit.config['hidden_size']} and {dit.config['num_heads']} heads, "
                f"{name} {hidden} and {heads}; pass the matching DiT or model.name=null with explicit layout keys"
            )
        layout.update(num_pooling=pooling, num_sdtm=sdtm, sdtm_layers=list(layers), num_top=top)
    return SparseDiT.from_dit(dit, **layout)


SparseDiT_models = {
    f"SparseDiT-{size}/2": _make_factory(f"SparseDiT-{size}/2", *SPARSE_DIT_SIZES[size], 2) for size in SPARSE_DIT_SIZES
}


__all__ = ["SparseDiT", "SparseDiT_models", "convert_pretrained", "converted_state_dict", "sparse_layout"]
