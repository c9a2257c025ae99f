"""Flexible patches of any rank: flex.py's FlexiDiT machinery for (pt, ph, pw) video patches and the text DiT.

flex.py flexifies the 2-D class-conditional DiT with square patches. The video and text DiTs need the
same pieces with patches that are tuples of per-axis sizes, so this module generalises them:

* resize matrices are Kronecker products of 1-D linear-resize matrices, one per axis (for square 2-D
  patches they equal ``flex.bilinear_resize_matrix``), and the PI-resize projections, their
  pseudo-inverse init and :class:`PIResizedND` follow from them unchanged. For the temporal axis of a
  (1, 2, 2) -> (2, 2, 2) video the 1-D rule gives exactly method doc §2.7: the embed kernel is
  duplicated and halved along time (weak token = native token of the frame-averaged patch), the
  de-embed weights are duplicated unscaled (both frames get the native output);
* :class:`PatchModel` is the static base of ``VideoDiT`` and ``TextDiT``: settings from the config,
  DiT's weight init of the shared parts, the block runner and the patch-size hooks (``check_patch_size``,
  ``embed_patches``, ``project_out``, ``lora_key``) their forward goes through;
* :class:`FlexPatches` is the flexify step shared by ``FlexVideoDiT`` and ``FlexTextDiT``: it adopts a
  static model's modules, adds per-patch-size embed/de-embed weights, patch-size embeddings and (LoRA
  mode) adapters on self-attention and MLP, and overrides the hooks, so both keep the static forward.

Blocks run through :meth:`PatchModel.run_blocks` and :func:`lora_block_forward`, which switches a LoRA
set on per block call exactly like ``flex._block_forward`` but for blocks with any argument list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flexdit_train.models.flex import LORA_TARGETS, MODES, FlexDiT, LoRALinear, PIResized, project_head

#################################################################################
#                       PI-resize matrices for n-d patches                      #
#################################################################################


def linear_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """R (size_out, size_in) float64: 1-D linear resize (torch, align_corners=False) of a length-size_in axis."""
    basis = torch.eye(size_in, dtype=torch.float64)[:, None, :]  # (in, 1, in)
    return F.interpolate(basis, size=size_out, mode="linear", align_corners=False)[:, 0].T  # (out, in)


def resize_matrix(size_in: Sequence[int], size_out: Sequence[int]) -> torch.Tensor:
    """B (prod(size_out), prod(size_in)): separable (bi/tri)linear resize of a row-major flattened patch."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    for a, b in zip(size_in, size_out, strict=True):
        r = linear_resize_matrix(a, b)  # (b, a)
        # Kronecker product, first axis slowest as in the flatten; written out because torch.kron fails
        # on the size-1 axes of a 1-frame patch (non-standard strides).
        matrix = (matrix[:, None, :, None] * r[None, :, None, :]).reshape(matrix.shape[0] * b, matrix.shape[1] * a)
    return matrix


def embed_projection_nd(patch: Sequence[int], underlying: Sequence[int]) -> torch.Tensor:
    """Q_embed(p) = pinv(B_{p'->p}ᵀ), (prod p, prod p'): underlying kernel slice -> kernel slice at p."""
    return torch.linalg.pinv(resize_matrix(underlying, patch).T)


def deembed_projection_nd(patch: Sequence[int], underlying: Sequence[int]) -> torch.Tensor:
    """Q_de(p) = pinv(B_{p->p'}ᵀ), (prod p', prod p), applied per output channel of the final linear."""
    return torch.linalg.pinv(resize_matrix(patch, underlying).T)


def project_kernel_nd(weight: torch.Tensor, q: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Conv kernel (D, C, *a) -> (D, C, *size) with q (prod size, prod a) applied to every kernel slice."""
    d, c = weight.shape[:2]
    out = torch.einsum("ij,ocj->oci", q, weight.reshape(d, c, -1))  # (D, C, prod size)
    return out.reshape(d, c, *size)


class PIResizedND(PIResized):
    """:class:`flex.PIResized` (same caching) for patches given as per-axis tuples, e.g. (1, 4, 4)."""

    def __init__(
        self,
        kind: str,
        weight: torch.Tensor,
        bias: torch.Tensor,
        underlying: tuple[int, ...],
        patch_sizes: Iterable[tuple[int, ...]],
    ):
        # The parent builds square 2-D matrices; give it no sizes and fill the n-d ones here.
        super().__init__(kind, weight, bias, underlying=0, patch_sizes=())
        project = embed_projection_nd if kind == "embed" else deembed_projection_nd
        self._fp64 = {tuple(p): project(p, underlying) for p in patch_sizes}  # float64 on CPU

    def resize(self, patch_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "head":  # project_head is rank-agnostic: it only splits (prod p, C_out)
            return super().resize(patch_size)
        q = self.matrix(patch_size)
        weight = project_kernel_nd(self.weight.to(q.dtype), q, patch_size)  # (D, C_in, *p)
        return weight.to(self.weight.dtype), self.bias


#################################################################################
#                      Blocks with per-call LoRA, table cache                   #
#################################################################################


def lora_block_forward(block: nn.Module, lora_key: str | None, *args: Any) -> torch.Tensor:
    """``block(*args)`` with the LoRA set ``lora_key`` switched on for exactly this call.

    As ``flex._block_forward``: the switch sits inside the function activation checkpointing re-runs, so
    the recomputed forward uses the same adapters, and it is reset afterwards.
    """
    if lora_key is None:
        return block(*args)
    layers = [m for m in block.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.active = lora_key
    try:
        return block(*args)  # (N, T, D)
    finally:
        for m in layers:
            m.active = None


def cached_table(cache: dict, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Memoised constant table (sin-cos positions); rebuilt while compiling, where dict mutation breaks graphs."""
    if torch.compiler.is_compiling():
        return build()
    if key not in cache:
        cache[key] = build()
    return cache[key]


#################################################################################
#                      Static base of the video and text DiTs                   #
#################################################################################


class PatchModel(nn.Module):
    """What VideoDiT and TextDiT share: config settings, DiT's init of common parts, the patch hooks.

    A subclass defines ``flexify_name`` (for error messages), ``_canonical_patch`` (user value -> the
    model's patch: an int or a per-axis tuple), ``_patch_dims`` (patch -> per-axis sizes), ``_key``
    (patch -> state-dict key), ``_check_divides(latent_shape, patch)`` and builds ``x_embedder.proj``,
    ``t_embedder`` and ``final_layer.linear``.
    """

    flexify_name: str

    def _init_settings(self, config: dict[str, Any], native_patch: Any) -> None:
        """Plain attributes from the config; the flexible subclass calls this too, then adopts the modules."""
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

    def _init_common_weights(self) -> None:
        """DiT's init of the shared parts: xavier linears (zero bias), the patch conv like a linear over the
        flattened patch, N(0, 0.02) timestep MLP, zero output linear (the model starts predicting 0)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def check_patch_size(self, patch_size: Any, latent_shape: Sequence[int]) -> Any:
        """Resolve None to the native patch; one-line error for an unknown or non-dividing one."""
        p = self.native_patch_size if patch_size is None else self._canonical_patch(patch_size)
        if p not in self.patch_sizes:
            raise ValueError(
                f"patch size {p} is not one of this model's patch sizes {self.patch_sizes}; "
                f"flexify it ({self.flexify_name}) with patch_sizes that include {p}"
            )
        self._check_divides(latent_shape, p)
        return p

    def run_blocks(self, x: torch.Tensor, *args: Any, patch_size: Any) -> torch.Tensor:
        """x (N, T, D) through every block as ``block(x, *args)`` with ``patch_size``'s LoRA set (if any),
        checkpointed per block when training with ``grad_checkpointing``."""
        lora_key = self.lora_key(patch_size)
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                x = checkpoint(lora_block_forward, block, lora_key, x, *args, use_reentrant=False)  # (N, T, D)
            else:
                x = lora_block_forward(block, lora_key, x, *args)  # (N, T, D)
        return x

    # Patch hooks of the static model (native patch only); FlexPatches overrides them.
    def lora_key(self, patch_size: Any) -> str | None:
        return None  # a static model has no adapters

    def embed_patches(self, x: torch.Tensor, patch_size: Any) -> torch.Tensor:
        return self.x_embedder(x)  # (N, T, D)

    def project_out(self, h: torch.Tensor, patch_size: Any) -> torch.Tensor:
        return self.final_layer.linear(h)  # (N, T, prod(p)·C_out)


#################################################################################
#                              Flexify (both modes)                             #
#################################################################################


class FlexPatches:
    """Mixin that makes a static :class:`PatchModel` subclass flexible: ``class FlexX(FlexPatches, X)``.

    ``base`` names the static class (for :meth:`from_config`).
    Layout as ``flex.FlexDiT``: the adopted trunk keeps its keys; new parameters are ``flex_embed.*``,
    ``flex_final.*``, ``patch_size_embed.<key>`` and ``blocks.N.{attn.qkv,attn.proj,mlp.fc1,mlp.fc2}.lora.<key>.*``.
    Cross-attention (text) is not in ``LORA_TARGETS``: it stays frozen without adapters (method doc §2.6).
    """

    base: type[nn.Module]
    # Identical bookkeeping to the 2-D model (they only touch LoRALinear layers and parameters).
    _lora_layers = FlexDiT._lora_layers
    lora_parameters = FlexDiT.lora_parameters
    trainable_parameters = FlexDiT.trainable_parameters
    merge_lora = FlexDiT.merge_lora
    unmerge_lora = FlexDiT.unmerge_lora

    def _flexify(
        self,
        model: nn.Module,
        patch_sizes: Iterable[Any],
        mode: str,
        lora_rank: int,
        lora_alpha: float | None,
        underlying_patch_size: Any,
    ) -> None:
        """Adopt ``model`` (no copy) and add the patch-size machinery; called by the subclass ``__init__``."""
        nn.Module.__init__(self)
        self._init_settings(model.config, model.native_patch_size)
        self.grad_checkpointing = model.grad_checkpointing
        native = self.native_patch_size
        sizes = tuple(sorted({self._canonical_patch(p) for p in patch_sizes}))
        dims = {p: self._patch_dims(p) for p in sizes}
        if native not in sizes:
            raise ValueError(f"patch_sizes {sizes} must include the native patch size {native}")
        if underlying_patch_size is None:  # elementwise max: (2, 4, 4) for the paper's video sizes
            underlying = tuple(max(axis) for axis in zip(*dims.values()))
        else:
            underlying = self._patch_dims(self._canonical_patch(underlying_patch_size))
        if mode not in MODES:
            raise ValueError(f"unknown flexify mode {mode!r}; use one of {MODES}")
        if any(u < n for u, n in zip(underlying, dims[native])):
            raise ValueError(
                f"underlying patch {underlying} is smaller than the native patch {dims[native]} on some axis, so "
                "the native path could not be reproduced; use an underlying patch >= the native one per axis"
            )
        if mode == "lora" and len(sizes) == 1:
            raise ValueError(f"mode='lora' needs a weak patch size besides the native {native}")
        if mode == "lora" and lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")

        self.mode = mode
        self.patch_sizes = sizes
        self.weak_patch_sizes = tuple(p for p in sizes if p != native)
        self.flex_config = dict(
            patch_sizes=[self._json_patch(p) for p in sizes],
            mode=mode,
            lora_rank=int(lora_rank),
            lora_alpha=None if lora_alpha is None else float(lora_alpha),
            underlying_patch_size=self._json_patch(self._canonical_patch(underlying)),
        )
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)

        conv, head = model.x_embedder.proj, model.final_layer.linear
        w_nat, b_nat = conv.weight.detach(), conv.bias.detach()  # (D, C_in, *p), (D,)
        head_w, head_b = head.weight.detach(), head.bias.detach()  # (prod p·C_out, D), (prod p·C_out,)
        like = dict(device=w_nat.device, dtype=w_nat.dtype)
        nat = dims[native]
        pinv_embed = torch.linalg.pinv(embed_projection_nd(nat, underlying)).to(w_nat.device)  # (prod p', prod p)
        pinv_de = torch.linalg.pinv(deembed_projection_nd(nat, underlying)).to(w_nat.device)  # (prod p, prod p')

        if mode == "shared":
            # Underlying weights whose projection back to the native size is the original (Q pinv(Q) = I:
            # a Kronecker product of full-row-rank matrices has full row rank).
            kernel = project_kernel_nd(w_nat.double(), pinv_embed, underlying).to(w_nat.dtype)  # (D, C_in, *p')
            self.flex_embed = PIResizedND("embed", kernel, b_nat.clone(), underlying, dims.values())
            self.flex_final = PIResizedND(
                "head",
                project_head(head_w.double(), pinv_de).to(head_w.dtype),
                project_head(head_b.double(), pinv_de).to(head_b.dtype),
                underlying,
                dims.values(),
            )
            del self.x_embedder
            # The final linear moves into flex_final; the rest of the final layer keeps its keys, in a new
            # container so the adopted model's own final layer is left intact.
            trunk = nn.Module()
            for name, child in model.final_layer.named_children():
                if name != "linear":
                    trunk.add_module(name, child)
            for name, param in model.final_layer.named_parameters(recurse=False):
                trunk.register_parameter(name, param)
            self.final_layer = trunk
            embed_sizes = sizes
        else:
            model.requires_grad_(False)
            conv_cls = nn.Conv3d if len(nat) == 3 else nn.Conv2d
            self.flex_embed = nn.ModuleDict()
            self.flex_final = nn.ModuleDict()
            for p in self.weak_patch_sizes:
                # The shared model's weak start: the PI projection of the native weights.
                q_embed = embed_projection_nd(dims[p], underlying).to(w_nat.device) @ pinv_embed  # (∏p, ∏p_nat)
                q_de = pinv_de @ deembed_projection_nd(dims[p], underlying).to(w_nat.device)  # (∏p_nat, ∏p)
                embed = conv_cls(self.in_channels, self.hidden_size, dims[p], stride=dims[p], **like)
                linear = nn.Linear(self.hidden_size, math.prod(dims[p]) * self.out_channels, **like)
                with torch.no_grad():
                    embed.weight.copy_(project_kernel_nd(w_nat.double(), q_embed, dims[p]))
                    embed.bias.copy_(b_nat)
                    linear.weight.copy_(project_head(head_w.double(), q_de))
                    linear.bias.copy_(project_head(head_b.double(), q_de))
                self.flex_embed[self._key(p)] = embed
                self.flex_final[self._key(p)] = linear
            alpha = float(lora_rank if lora_alpha is None else lora_alpha)
            keys = [self._key(p) for p in self.weak_patch_sizes]
            for block in self.blocks:
                for part, name in LORA_TARGETS:
                    parent = getattr(block, part)
                    setattr(parent, name, LoRALinear(getattr(parent, name), keys, lora_rank, alpha))
            embed_sizes = self.weak_patch_sizes  # none for the native size: its path stays bit-exact

        # Zero init: every size starts as the (projected) original model.
        self.patch_size_embed = nn.ParameterDict(
            {self._key(p): nn.Parameter(torch.zeros(self.hidden_size, **like)) for p in embed_sizes}
        )

    @classmethod
    def from_config(cls, model_config: dict, flex_config: dict):
        """A randomly initialised flexible model with the shapes of a saved one, to load its state dict strictly."""
        return cls(cls.base(**model_config), **flex_config)

    @staticmethod
    def _json_patch(p: Any) -> Any:
        return list(p) if isinstance(p, tuple) else p

    def _weak_lora_key(self, patch_size: Any) -> str:
        p = self._canonical_patch(patch_size)
        if self.mode != "lora" or p not in self.weak_patch_sizes:
            raise ValueError(
                f"LoRA merging needs mode='lora' (this model: {self.mode!r}) and a weak patch size "
                f"{self.weak_patch_sizes}, got {patch_size}"
            )
        return self._key(p)

    # ------------------------------------------------------------------ PatchModel hooks
    def lora_key(self, patch_size: Any) -> str | None:
        """Adapter set of ``patch_size``: none for the native size or in shared mode."""
        return self._key(patch_size) if self.mode == "lora" and patch_size != self.native_patch_size else None

    def embed_patches(self, x: torch.Tensor, patch_size: Any) -> torch.Tensor:
        """(N, C_in, *latent) -> (N, T, D) tokens in row-major grid order, with the patch-size embedding."""
        key = self._key(patch_size)
        if self.mode == "shared":
            dims = self._patch_dims(patch_size)
            weight, bias = self.flex_embed(dims)  # (D, C_in, *p), (D,)
            conv = F.conv3d if weight.ndim == 5 else F.conv2d
            x = conv(x, weight, bias, stride=dims)  # (N, D, *grid)
        elif patch_size == self.native_patch_size:
            x = self.x_embedder.proj(x)  # (N, D, *grid)
        else:
            x = self.flex_embed[key](x)  # (N, D, *grid)
        x = x.flatten(2).transpose(1, 2)  # (N, T, D)
        if key in self.patch_size_embed:
            x = x + self.patch_size_embed[key]  # (N, T, D)
        return x

    def project_out(self, h: torch.Tensor, patch_size: Any) -> torch.Tensor:
        """Final linear at ``patch_size``: (N, T, D) modulated tokens -> (N, T, prod(p)·C_out)."""
        if self.mode == "shared":
            weight, bias = self.flex_final(self._patch_dims(patch_size))  # (prod p·C_out, D), (prod p·C_out,)
            return F.linear(h, weight, bias)
        if patch_size == self.native_patch_size:
            return self.final_layer.linear(h)
        return self.flex_final[self._key(patch_size)](h)
