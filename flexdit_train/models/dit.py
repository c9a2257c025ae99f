"""Diffusion Transformer (DiT), weight-compatible with the official facebookresearch/DiT checkpoints.

Re-implemented from the architecture description (adaLN-Zero blocks, 2-D sin-cos positions, learned
sigma). Submodule names and tensor layouts follow the official state dict exactly so that
`DiT-XL-2-256x256.pt` loads with ``strict=True``. The network knows nothing about diffusion: it maps a
noisy latent, an integer timestep and a class label to ``2C`` output channels (eps and the learned
variance interpolation value).

:class:`PatchModel` is what every network of the family shares (this DiT, the video and the text DiT):
settings from the config, the block runner, sin-cos positions at native-grid coordinates, classifier-free
guidance and the patch hooks (``check_patch_size``, ``embed_patches``, ``project_out``, ``block_forward``)
their forward goes through, which :mod:`flexdit_train.models.flex` overrides to make them flexible.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flexdit_train.models.amm import AttentionModulation, modulated_attention
from flexdit_train.models.arch import arch_of


def to_2tuple(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"expected an int or an (H, W) pair, got {size!r}")
    return size  # type: ignore[return-value]


def square_patch(patch: Any) -> int:
    """The int patch of a 2-D model; a square pair (p, p), the per-axis form, also names p."""
    sizes = {int(p) for p in patch} if isinstance(patch, (tuple, list)) else {int(patch)}
    if len(sizes) != 1 or min(sizes) < 1:
        raise ValueError(f"patch sizes of image models are positive ints (square patches), got {patch!r}")
    return sizes.pop()


def check_patch_divides(latent_shape: Sequence[int], patch: int | Sequence[int]) -> None:
    """One-line error when a patch does not tile the latent: an (H, W) latent and a square patch p, or an
    (F, H, W) latent and a (pt, ph, pw) patch (time first, square in space)."""
    if len(latent_shape) == 3:
        frames, pt = int(latent_shape[0]), int(patch[0])
        if frames % pt:
            raise ValueError(
                f"temporal patch {pt} does not divide the frame count {frames}; use a frame count that is "
                f"a multiple of {pt} (e.g. {frames + pt - frames % pt}) or a patch with pt = 1"
            )
        latent_shape, patch = latent_shape[1:], patch[1]
    h, w = (int(s) for s in latent_shape)
    if h % patch or w % patch:
        raise ValueError(
            f"patch size {patch} does not divide the latent size {h}x{w}; "
            f"use a latent size that is a multiple of {patch} or another patch size"
        )


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: (N, T, D); shift, scale: (N, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                    Sine/cosine positional embedding tables                    #
#################################################################################


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) float64 positions -> (M, embed_dim) table, sin half first then cos half."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = positions.to(torch.float64).reshape(-1)[:, None] * omega[None, :]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


def sincos_2d(embed_dim: int, grid_hw: tuple[int, int], coord_scale: float = 1.0) -> torch.Tensor:
    """2-D sin-cos table for a (gh, gw) token grid in row-major token order -> (gh*gw, D) float32.

    The first half of each row encodes the column coordinate and the second half the row coordinate,
    as in the official table (its meshgrid is built width-first). ``coord_scale`` places the grid on
    other coordinates: a weak patch p of a model whose native patch is p_nat sits at native-grid
    coordinates ``index * p / p_nat``.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    gh, gw = grid_hw
    rows = torch.arange(gh, dtype=torch.float64) * coord_scale
    cols = torch.arange(gw, dtype=torch.float64) * coord_scale
    row_coord, col_coord = torch.meshgrid(rows, cols, indexing="ij")  # (gh, gw) each
    emb_col = sincos_1d(embed_dim // 2, col_coord)  # (gh*gw, D/2)
    emb_row = sincos_1d(embed_dim // 2, row_coord)  # (gh*gw, D/2)
    return torch.cat([emb_col, emb_row], dim=1).float()  # (gh*gw, D)


#################################################################################
#               Embedding layers for timesteps, labels and patches              #
#################################################################################


class PatchEmbed(nn.Module):
    """Latent -> token sequence with a strided conv (submodule ``proj`` as in timm's PatchEmbed)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_patch_divides(x.shape[-2:], self.patch_size)
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: a 256-d sinusoid (cos then sin, always fp32) and a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        # fp32 on purpose: bf16 rounds t=998.4 to 1000 (spacing 4 in [512, 1024)).
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )  # (dim/2,)
        args = t[:, None].float() * freqs[None]  # (N, dim/2)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=t.device.type, enabled=False):
            t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256) fp32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with label dropout to the null-class row (index ``num_classes``) for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                 Core DiT model                                #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv (q, k, v stacked on the output dim) and SDPA.

    ``modulation`` (set by :meth:`PatchModel.set_attention_modulation`) switches this block to EDT's
    attention modulation (:mod:`flexdit_train.models.amm`): an explicit softmax whose map is multiplied
    by the AMM of the current token grid; None (the default) keeps the SDPA path.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.modulation: Callable[[int, torch.device], torch.Tensor] | None = None  # tokens, device -> (T, T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, hd)
        if self.modulation is None:
            x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, hd)
        else:
            x = modulated_attention(q, k, v, self.modulation(t, x.device))  # (N, H, T, hd)
        x = x.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj(x)


class Mlp(nn.Module):
    """Two linears with tanh-approximated GELU (submodules ``fc1``/``fc2`` as in timm's Mlp)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (N, T, D); c: (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear to ``p*p*C_out`` values per token, layout (p_row, p_col, channel).

    :meth:`PatchModel.forward` applies the two parts separately (:meth:`~PatchModel.final_modulation`,
    then :meth:`~PatchModel.project_out`), so a flexible model can swap the linear per patch size.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))



def unpatchify(x: torch.Tensor, grid_hw: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """(N, T, p*p*C) tokens in row-major grid order -> (N, C, H, W) image."""
    h, w = grid_hw
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)  # (N, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
    return x.reshape(x.shape[0], channels, h * p, w * p)  # (N, C, H, W)


def apply_guidance(cond: torch.Tensor, guide: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """``guide + scale * (cond - guide)`` on the first ``channels`` channels, the rest from ``cond``.

    The one guidance formula: classifier-free guidance (``guide`` = the null-condition prediction) and
    FlexiDiT's weak-conditional guidance (``guide`` = the weak model's conditional prediction, §3.4 of
    the paper). Unguided channels, including the learned variance, come from the conditional branch.
    """
    out = cond.clone()  # (N, C_out, ...)
    out[:, :channels] = guide[:, :channels] + scale * (cond[:, :channels] - guide[:, :channels])
    return out


def cached_table(cache: dict, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Memoised constant table (sin-cos positions); rebuilt while compiling, where dict mutation breaks graphs."""
    if torch.compiler.is_compiling():
        return build()
    if key not in cache:
        cache[key] = build()
    return cache[key]


class PatchModel(nn.Module):
    """What every network of the DiT family shares: config settings, blocks, positions, CFG, the patch hooks.

    A subclass builds ``x_embedder.proj``, ``t_embedder``, ``blocks`` and ``final_layer.linear`` and defines
    ``_canonical_patch`` (user value -> the model's patch: an int or a per-axis tuple) and ``_patch_dims``
    (patch -> per-axis sizes). The hooks here serve the native patch only; a flexible model
    (:class:`flexdit_train.models.flex.FlexPatches`) overrides them, so one forward serves both.

    ``block_cache`` is None except while a sampler executes a block plan
    (:class:`flexdit_train.sampling.cache.BlockCache`): then each block is computed, reused or forecast.
    """

    block_cache: Any = None

    def _init_settings(self, config: dict[str, Any], native_patch: Any) -> None:
        """Plain attributes from the config; a flexible model calls this too, then adopts the modules."""
        self.config = dict(config)
        self.input_size = tuple(config["input_size"])
        self.in_channels = config["in_channels"]
        self.out_channels = 2 * config["in_channels"] if config["learn_sigma"] else config["in_channels"]
        self.learn_sigma = config["learn_sigma"]
        self.hidden_size = config["hidden_size"]
        self.num_heads = config["num_heads"]
        self.native_patch_size = native_patch
        self.patch_sizes = (native_patch,)
        self.weak_patch_sizes: tuple = ()
        self._pos_cache: dict = {}  # (grid, patch, device, dtype) -> (1, T, D) position table

    def _init_linears_and_patch_embed(self) -> None:
        """DiT's init of the shared parts, first half: xavier linears (zero bias), the patch conv like a
        linear over the flattened patch."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

    def _init_timestep_mlp_and_output(self) -> None:
        """Second half: N(0, 0.02) timestep MLP and a zero output linear (the model starts predicting 0).
        Separate from the first half because DiT draws its label table in between."""
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------------ patch sizes
    def check_patch_size(self, patch_size: Any, latent_shape: Sequence[int]) -> Any:
        """Resolve None to the native patch; one-line error for an unknown or non-dividing one."""
        p = self.native_patch_size if patch_size is None else self._canonical_patch(patch_size)
        if p not in self.patch_sizes:
            raise ValueError(self._unknown_patch_message(p))
        check_patch_divides(latent_shape, p)
        return p

    def _unknown_patch_message(self, patch: Any) -> str:
        return (
            f"this static {type(self).__name__} runs only at patch size {self.native_patch_size}, not {patch}; "
            "flexify it (flexdit_train.models.flexify) to use other patch sizes"
        )

    def position_scale(self, patch: Any) -> float:
        """Native-grid coordinate of token index 1 at ``patch``: a weak patch p sits at index · p / p_nat."""
        return patch / self.native_patch_size

    def position_embedding(self, grid: tuple[int, ...], patch: Any) -> torch.Tensor:
        """(1, T, D) 2-D sin-cos table at native-grid coordinates; the stored ``pos_embed`` at the native grid.

        For the image models, which store their native table; the video DiT builds its own (time axis).
        """
        native_grid = tuple(s // self.native_patch_size for s in self.input_size)
        if patch == self.native_patch_size and tuple(grid) == native_grid:
            return self.pos_embed
        ref = self.pos_embed

        def build() -> torch.Tensor:
            table = sincos_2d(self.hidden_size, grid, self.position_scale(patch))  # (T, D)
            return table.unsqueeze(0).to(device=ref.device, dtype=ref.dtype)  # (1, T, D)

        return cached_table(self._pos_cache, (tuple(grid), patch, ref.device, ref.dtype), build)

    def embed_patches(self, x: torch.Tensor, patch_size: Any) -> torch.Tensor:
        """(N, C_in, *latent) -> (N, T, D) tokens in row-major grid order."""
        return self.x_embedder(x)  # (N, T, D)

    def project_out(self, h: torch.Tensor, patch_size: Any) -> torch.Tensor:
        """Final linear: (N, T, D) modulated tokens -> (N, T, prod(p)·C_out)."""
        return self.final_layer.linear(h)  # (N, T, prod(p)·C_out)

    # ------------------------------------------------------------------ blocks
    def run_blocks(self, x: torch.Tensor, *args: Any, patch_size: Any) -> torch.Tensor:
        """x (N, T, D) through every block as ``block(x, *args)`` at ``patch_size``, checkpointed per block
        when training with ``grad_checkpointing``."""
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        cache = self.block_cache
        for index, block in enumerate(self.blocks):
            if cache is not None:  # a sampler's block plan decides: compute, reuse or forecast
                x = cache.block(index, x, lambda h, block=block: self.block_forward(block, patch_size, h, *args))
            elif checkpointing:
                x = checkpoint(self.block_forward, block, patch_size, x, *args, use_reentrant=False)  # (N, T, D)
            else:
                x = self.block_forward(block, patch_size, x, *args)  # (N, T, D)
        return x

    def block_forward(self, block: nn.Module, patch_size: Any, *args: Any) -> torch.Tensor:
        """One block call; the blocks of a static model do not depend on the patch size."""
        return block(*args)  # (N, T, D)

    # ------------------------------------------------------------------ attention modulation (EDT's AMM)
    def attention_layers(self) -> list[tuple[nn.Module, int]]:
        """(attention module, token-grid downsampling factor) of each block, in block order."""
        return [(block.attn, 1) for block in self.blocks]

    def set_attention_modulation(self, blocks: Sequence[int] | None) -> None:
        """EDT's attention modulation matrix (AMM) in the 1-indexed ``blocks`` (e.g. [8, 11]); empty or None
        turns it off, which restores the SDPA path exactly. A training-free sampling option: the matrix
        follows the token grid of each forward, so it works at every patch size of a flexible model."""
        if blocks is not None and (isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence)):
            raise ValueError(f"amm_blocks={blocks!r} must be a list of 1-indexed blocks, e.g. amm_blocks=[8,11]")
        chosen = sorted({int(b) for b in blocks or ()})
        layers = self.attention_layers()
        if chosen and len(self.input_size) != 2:
            raise ValueError(
                f"attention modulation (AMM) is defined on 2-D token grids; {type(self).__name__} has "
                f"{len(self.input_size)}-D latents: use amm_blocks=[] for it"
            )
        bad = [b for b in chosen if not 1 <= b <= len(layers)]
        if bad:
            raise ValueError(
                f"amm_blocks {bad} are not blocks of this {len(layers)}-block model; use 1-indexed blocks "
                f"in 1..{len(layers)}"
            )
        for attn, _ in layers:
            attn.modulation = None
        self._amm_state = None
        if chosen:
            state = AttentionModulation()
            for b in chosen:
                attn, downsample = layers[b - 1]
                attn.modulation = functools.partial(state.matrix, downsample=downsample)
            self._amm_state = state
            if not getattr(self, "_amm_hooked", False):
                # registered once and never removed (it returns at once while AMM is off): a plain function of
                # the module, so a deep copy (EMA, tests) tracks its own grid
                self.register_forward_pre_hook(PatchModel._amm_track_grid, with_kwargs=True)
                self._amm_hooked = True
        self.amm_blocks = tuple(chosen)

    def _amm_track_grid(self, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: the token grid of this call's latents and patch size, for the AMM blocks."""
        state = getattr(self, "_amm_state", None)
        if state is None:
            return
        bound = inspect.signature(self.forward).bind(*args, **kwargs).arguments
        x = bound["x"]
        p = self.check_patch_size(bound.get("patch_size"), x.shape[-2:])
        state.grid = (x.shape[-2] // p, x.shape[-1] // p)

    # ------------------------------------------------------------------ guidance
    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guide_all_channels: bool | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half carries the null condition (DiT's API).

        The first half's latents go through both halves of the condition; both output halves carry the
        guided channels (:func:`apply_guidance`) and their own unguided ones. By default (None: the arch's
        convention) a DiT guides only its first 3 channels, reproducing the official sampler (and its FID
        2.27), and the video and text DiTs all; ``True``/``False`` force all/3.
        """
        half = x[: len(x) // 2]  # (N/2, C, ...)
        # through __call__ so forward hooks (the AMM token grid) run
        out = self(torch.cat([half, half], dim=0), t, y, **kwargs)  # (N, C_out, ...)
        cond, uncond = out.chunk(2)
        channels = arch_of(self).guided_channels(self, guide_all_channels)
        guided = apply_guidance(cond, uncond, cfg_scale, channels)
        return torch.cat([guided, torch.cat([guided[:, :channels], uncond[:, channels:]], dim=1)])


class ClassConditional:
    """Class-label conditioning of the image and video DiTs: ``c = t_emb + y_emb``, null class for CFG."""

    @property
    def null_class(self) -> int:
        """Label id of the classifier-free-guidance null row."""
        return self.num_classes

    def embed_condition(
        self, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        t_emb = self.t_embedder(t)  # (N, D)
        y_emb = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        return t_emb + y_emb  # (N, D)

    def final_modulation(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """adaLN of the final layer: (N, T, D) tokens, (N, D) condition -> modulated (N, T, D) tokens."""
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each, one for all sizes
        return modulate(self.final_layer.norm_final(x), shift, scale)  # (N, T, D)


class SquarePatchImage:
    """The PatchModel hooks of the class-conditional 2-D image networks (DiT, EDT, SparseDiT): one int patch p for
    a p x p patch, the class count in ``num_classes``; DiT's initialisation and forward around a token pass for the
    networks on one dense token grid (DiT, SparseDiT)."""

    def _init_settings(self, config: dict[str, Any], native_patch: int) -> None:
        super()._init_settings(config, native_patch)
        self.patch_size = native_patch
        self.num_classes = config["num_classes"]

    _canonical_patch = staticmethod(square_patch)

    @staticmethod
    def _patch_dims(patch: int) -> tuple[int, int]:
        return (patch, patch)

    def grid_size(self, latent_hw: Sequence[int], patch_size: int | None = None) -> tuple[int, int]:
        p = patch_size or self.native_patch_size
        h, w = to_2tuple(latent_hw)
        check_patch_divides((h, w), p)
        return h // p, w // p

    def _init_embedders(self, class_dropout_prob: float) -> None:
        """DiT's ``x_embedder``, ``t_embedder``, ``y_embedder`` and ``pos_embed`` at the settings' sizes, in DiT's order."""
        self.x_embedder = PatchEmbed(self.native_patch_size, self.in_channels, self.hidden_size)
        self.t_embedder = TimestepEmbedder(self.hidden_size)
        self.y_embedder = LabelEmbedder(self.num_classes, self.hidden_size, class_dropout_prob)
        grid = self.grid_size(self.input_size)
        # A frozen Parameter (not a buffer) so the key and the 675.1M parameter count match the official model.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], self.hidden_size), requires_grad=False)

    def _init_image_weights(self, label_embed_std: float) -> None:
        """DiT's initialisation of the shared parts and adaLN-Zero: every block starts as the identity, the output
        layer at zero."""
        self._init_linears_and_patch_embed()
        self.pos_embed.data.copy_(sincos_2d(self.hidden_size, self.grid_size(self.input_size)).unsqueeze(0))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=label_embed_std)
        self._init_timestep_mlp_and_output()
        for module in [*self.blocks, self.final_layer]:
            nn.init.zeros_(module.adaLN_modulation[-1].weight)
            nn.init.zeros_(module.adaLN_modulation[-1].bias)

    def _image_forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        patch_size: int | None,
        force_drop_ids: torch.Tensor | None,
        token_pass: Callable[[torch.Tensor, torch.Tensor, tuple[int, int], int], torch.Tensor],
    ) -> torch.Tensor:
        """Patchify + positions, the condition, ``token_pass(x, c, grid, p)`` over the (N, T, D) tokens, the final
        layer and unpatchify: (N, C, H, W) latents -> (N, C_out, H, W)."""
        p = self.check_patch_size(patch_size, x.shape[-2:])
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        x = self.embed_patches(x, p) + self.position_embedding(grid, p)  # (N, T, D)
        c = self.embed_condition(t, y, force_drop_ids)  # (N, D)
        x = token_pass(x, c, grid, p)  # (N, T, D)
        x = self.final_modulation(x, c)  # (N, T, D)
        x = self.project_out(x, p)  # (N, T, p*p*C_out)
        return unpatchify(x, grid, p, self.out_channels)  # (N, C_out, H, W)


class DiT(ClassConditional, SquarePatchImage, PatchModel):
    """Diffusion model with a Transformer backbone."""

    def __init__(
        self,
        input_size: int | Sequence[int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        grad_checkpointing: bool = False,
        label_embed_std: float = 0.02,
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
                class_dropout_prob=class_dropout_prob,
                num_classes=num_classes,
                learn_sigma=learn_sigma,
            ),
            patch_size,
        )
        self.grad_checkpointing = grad_checkpointing

        self._init_embedders(class_dropout_prob)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights(label_embed_std)

    def initialize_weights(self, label_embed_std: float = 0.02) -> None:
        """DiT's initialisation. ``label_embed_std`` (DiT: 0.02) only matters when training from scratch:
        at 0.02 a label vector is ~20x shorter than the timestep embedding, and small models trained for
        a few thousand steps barely learn to use it; ~1.0 makes class conditioning effective at once."""
        self._init_image_weights(label_embed_std)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        patch_size: int | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels -> (N, C_out, H, W) at ``patch_size``.

        ``patch_size`` None means the native size (a static DiT accepts only that one); ``force_drop_ids``
        (N,) replaces the random label dropout with a given mask (1 = null class), so two forwards can see
        exactly the same dropped labels.
        """
        return self._image_forward(x, t, y, patch_size, force_drop_ids, self._block_pass)

    def _block_pass(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
        return self.run_blocks(x, c, patch_size=patch_size)  # (N, T, D)


#################################################################################
#                                DiT configurations                             #
#################################################################################

# (depth, hidden_size, num_heads) per official size
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _make_factory(name: str, depth: int, hidden: int, heads: int, patch: int):
    def factory(
        input_size: int | Sequence[int] = 32,
        num_classes: int = 1000,
        in_channels: int = 4,
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
        **kwargs,
    ) -> DiT:
        return DiT(
            input_size=input_size,
            patch_size=patch,
            in_channels=in_channels,
            hidden_size=hidden,
            depth=depth,
            num_heads=heads,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            class_dropout_prob=class_dropout_prob,
            **kwargs,
        )

    factory.__name__ = name.replace("-", "_").replace("/", "_")
    factory.__doc__ = f"{name}: depth {depth}, width {hidden}, {heads} heads, patch {patch}."
    return factory


DiT_models = {
    f"DiT-{size}/{patch}": _make_factory(f"DiT-{size}/{patch}", *DIT_SIZES[size], patch)
    for size in ("XL", "L", "B", "S")
    for patch in (2, 4, 8)
}


def create_model(name: str, **kwargs) -> DiT:
    """Build a registered DiT by its official name, e.g. ``create_model("DiT-XL/2", input_size=32)``."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(DiT_models)}")
    return DiT_models[name](**kwargs)
