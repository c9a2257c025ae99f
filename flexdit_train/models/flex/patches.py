"""Flexify: one set of weights that denoises at several patch sizes, for every arch (FlexiDiT, arXiv 2502.20126).

:class:`FlexPatches` turns a static :class:`~flexdit_train.models.dit.PatchModel` (the image, video or text
DiT) into a flexible one. Only tokenisation and de-tokenisation depend on the patch size: their weights
are PI-resized (:mod:`.resize`) from the native ones, positions are the sin-cos table at native-grid
coordinates, and a learned vector per patch size is added to every token (§3.1 of the paper). Two modes
(§3.2 and App. C.2):

* ``"shared"``: one underlying embed/de-embed pair at patch size p' projected to every size (native
  included), everything trainable; the native path equals the original to float precision. Optional
  per-patch-size LayerNorms on the weak tokens (``patch_size_norm``).
* ``"lora"``: the original model is frozen and its native path is bit-exact; each weak size has its own
  embed/de-embed, patch-size embedding and LoRA adapters (:mod:`.lora`) on the blocks' self-attention
  and MLP.

The flexible class adopts (does not copy) the static model's modules and overrides its patch hooks, so
the static forward serves every patch size and the shared state-dict keys stay the original ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flexdit_train.models.dit import DiT, PatchModel
from flexdit_train.models.flex.lora import LoRALinear, attach_adapters, lora_block_forward
from flexdit_train.models.flex.resize import (
    PIResized,
    deembed_projection,
    embed_projection,
    project_head,
    project_kernel,
)
from flexdit_train.models.text_dit import TextDiT
from flexdit_train.models.video_dit import VideoDiT

MODES = ("shared", "lora")


def patch_key(patch: Any) -> str:
    """Key of a patch size in parameter names: ``p4``, ``p2x2x2``."""
    return "p" + ("x".join(map(str, patch)) if isinstance(patch, tuple) else str(patch))


class FlexPatches:
    """Mixin that makes a static :class:`PatchModel` flexible: ``class FlexX(FlexPatches, X)``.

    Built with :func:`flexdit_train.models.flexify` or :meth:`from_config`. ``base`` names the static class;
    ``default_patch_sizes``, ``default_mode`` and ``default_lora_rank`` are the arch's flexify defaults. The
    adopted trunk keeps its keys; new parameters are ``flex_embed.*``, ``flex_final.*``,
    ``patch_size_embed.<key>``, ``patch_size_norm.<key>.*`` and
    ``blocks.N.{attn.qkv,attn.proj,mlp.fc1,mlp.fc2}.lora.<key>.{A,B}``, with keys ``p4`` or ``p2x2x2``. Per-size
    parameters get no gradient in steps at other sizes, so DDP needs ``find_unused_parameters=True``.
    """

    base: type[PatchModel]
    default_mode = "shared"
    default_lora_rank = 32

    def default_patch_sizes(self, native: Any) -> tuple:
        return (2, 4)  # the paper's image sizes

    def __init__(
        self,
        model: PatchModel,
        patch_sizes: Iterable[Any] | None = None,
        mode: str | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        underlying_patch_size: Any = None,
        patch_size_norm: bool = False,
    ):
        """Adopt ``model`` (no copy: deep-copy it first to keep an independent original) and add the
        patch-size machinery. ``patch_sizes`` must include the native one; ``underlying_patch_size`` p'
        (default: the per-axis maximum, 4 for the paper's (2, 4)) must be >= the native patch on every
        axis for the native path to be reproducible; sizes above p' up-sample the kernel FlexiViT-style.
        LoRA scale is ``lora_alpha / lora_rank`` (alpha defaults to the rank: scale 1)."""
        nn.Module.__init__(self)
        self._init_settings(model.config, model.native_patch_size)
        self.grad_checkpointing = model.grad_checkpointing
        dims, underlying = self._set_flex_config(
            patch_sizes, mode, lora_rank, lora_alpha, underlying_patch_size, patch_size_norm
        )
        native_weight = model.x_embedder.proj.weight
        like = dict(device=native_weight.device, dtype=native_weight.dtype)
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        if self.mode == "shared":
            self._add_shared_embeddings(model, dims, underlying)
            embed_sizes = self.patch_sizes
        else:
            self._add_weak_embeddings_and_adapters(model, dims, underlying)
            embed_sizes = self.weak_patch_sizes  # the native size has no embedding: its path stays exact
        # Zero init: every size starts as the (projected) original model.
        self.patch_size_embed = nn.ParameterDict(
            {patch_key(p): nn.Parameter(torch.zeros(self.hidden_size, **like)) for p in embed_sizes}
        )
        # Weak sizes only: an affine LN normalises the tokens even at identity init, so putting one on
        # the native path would change the pre-trained function (and export_native could not fold it).
        self.patch_size_norm = nn.ModuleDict(
            {
                patch_key(p): nn.LayerNorm(self.hidden_size, eps=1e-6, **like)
                for p in (self.weak_patch_sizes if patch_size_norm else ())
            }
        )

    def _set_flex_config(
        self,
        patch_sizes: Iterable[Any] | None,
        mode: str | None,
        lora_rank: int | None,
        lora_alpha: float | None,
        underlying_patch_size: Any,
        patch_size_norm: bool,
    ) -> tuple[dict[Any, tuple[int, ...]], tuple[int, ...]]:
        """Check the options (one-line errors), set ``mode``, the patch sizes and ``flex_config``; returns the
        per-axis sizes of every patch and of the underlying patch p'."""
        native = self.native_patch_size
        mode = self.default_mode if mode is None else mode
        lora_rank = self.default_lora_rank if lora_rank is None else lora_rank
        if mode not in MODES:
            raise ValueError(f"unknown flexify mode {mode!r}; use one of {MODES}")
        requested = self.default_patch_sizes(native) if patch_sizes is None else patch_sizes
        sizes = tuple(sorted({self._canonical_patch(p) for p in requested}))
        dims = {p: self._patch_dims(p) for p in sizes}
        if native not in sizes:
            raise ValueError(f"patch_sizes {sizes} must be positive and include the native patch size {native}")
        if underlying_patch_size is None:  # per-axis maximum: (2, 4, 4) for the paper's video sizes
            underlying = tuple(max(axis) for axis in zip(*dims.values()))
        else:
            underlying = self._patch_dims(self._canonical_patch(underlying_patch_size))
        if any(u < n for u, n in zip(underlying, dims[native])):
            raise ValueError(
                f"underlying_patch_size {self._canonical_patch(underlying)} is smaller than the native patch size "
                f"{native} on some axis, so the native path could not be reproduced; use one >= {native} on every axis"
            )
        if mode == "lora" and len(sizes) == 1:
            raise ValueError(f"mode='lora' needs a weak patch size besides the native {native}")
        if mode == "lora" and lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
        if mode == "lora" and patch_size_norm:
            raise ValueError("patch_size_norm=True needs mode='shared'; the LoRA model keeps its trunk frozen")
        self.mode = mode
        self.patch_sizes = sizes
        self.weak_patch_sizes = tuple(p for p in sizes if p != native)
        self.flex_config = dict(
            patch_sizes=[self._json_patch(p) for p in sizes],
            mode=mode,
            lora_rank=int(lora_rank),
            lora_alpha=None if lora_alpha is None else float(lora_alpha),
            underlying_patch_size=self._json_patch(self._canonical_patch(underlying)),
            patch_size_norm=bool(patch_size_norm),
        )
        return dims, underlying

    def _native_pinvs(self, dims: dict, underlying: tuple[int, ...], device: torch.device) -> tuple:
        """pinv(Q_embed(p_nat)) (prod p', prod p) and pinv(Q_de(p_nat)) (prod p, prod p'): from the native
        weights to underlying ones whose projection back to the native size is the original (Q pinv(Q) = I:
        a Kronecker product of full-row-rank matrices has full row rank)."""
        nat = dims[self.native_patch_size]
        pinv_embed = torch.linalg.pinv(embed_projection(nat, underlying)).to(device)  # (prod p', prod p)
        pinv_de = torch.linalg.pinv(deembed_projection(nat, underlying)).to(device)  # (prod p, prod p')
        return pinv_embed, pinv_de

    def _add_shared_embeddings(self, model: PatchModel, dims: dict, underlying: tuple[int, ...]) -> None:
        """Shared mode: one underlying embed / de-embed pair (PIResized) replaces the native ones."""
        conv, head = model.x_embedder.proj, model.final_layer.linear
        w_nat, b_nat = conv.weight.detach(), conv.bias.detach()  # (D, C_in, *p), (D,)
        head_w, head_b = head.weight.detach(), head.bias.detach()  # (prod p·C_out, D), (prod p·C_out,)
        pinv_embed, pinv_de = self._native_pinvs(dims, underlying, w_nat.device)
        kernel = project_kernel(w_nat.double(), pinv_embed, underlying).to(w_nat.dtype)  # (D, C_in, *p')
        flex_embed = PIResized("embed", kernel, b_nat.clone(), underlying, dims)
        flex_final = PIResized(
            "head",
            project_head(head_w.double(), pinv_de).to(head_w.dtype),
            project_head(head_b.double(), pinv_de).to(head_b.dtype),
            underlying,
            dims,
        )
        # The final linear moves into flex_final; the rest of the final layer keeps its keys, in a new
        # container so the adopted model's own final layer is left intact. It is registered after
        # flex_embed/flex_final: optimizer states are saved in parameter order, and this is the order
        # the image DiT's shared checkpoints were trained with.
        trunk = nn.Module()
        for name, child in model.final_layer.named_children():
            if name != "linear":
                trunk.add_module(name, child)
        for name, param in model.final_layer.named_parameters(recurse=False):
            trunk.register_parameter(name, param)
        del self.x_embedder, self.final_layer
        self.flex_embed, self.flex_final, self.final_layer = flex_embed, flex_final, trunk

    def _add_weak_embeddings_and_adapters(self, model: PatchModel, dims: dict, underlying: tuple[int, ...]) -> None:
        """LoRA mode: the original is frozen; each weak size gets its own embed / de-embed and adapters."""
        model.requires_grad_(False)
        conv, head = model.x_embedder.proj, model.final_layer.linear
        w_nat, b_nat = conv.weight.detach(), conv.bias.detach()  # (D, C_in, *p), (D,)
        head_w, head_b = head.weight.detach(), head.bias.detach()  # (prod p·C_out, D), (prod p·C_out,)
        like = dict(device=w_nat.device, dtype=w_nat.dtype)
        pinv_embed, pinv_de = self._native_pinvs(dims, underlying, w_nat.device)
        conv_cls = nn.Conv3d if len(underlying) == 3 else nn.Conv2d
        self.flex_embed = nn.ModuleDict()
        self.flex_final = nn.ModuleDict()
        for p in self.weak_patch_sizes:
            # The shared model's weak start: the PI projection of the native weights.
            q_embed = embed_projection(dims[p], underlying).to(w_nat.device) @ pinv_embed  # (prod p, prod p_nat)
            q_de = pinv_de @ deembed_projection(dims[p], underlying).to(w_nat.device)  # (prod p_nat, prod p)
            embed = conv_cls(self.in_channels, self.hidden_size, dims[p], stride=dims[p], **like)
            linear = nn.Linear(self.hidden_size, math.prod(dims[p]) * self.out_channels, **like)
            with torch.no_grad():
                embed.weight.copy_(project_kernel(w_nat.double(), q_embed, dims[p]))
                embed.bias.copy_(b_nat)
                linear.weight.copy_(project_head(head_w.double(), q_de))
                linear.bias.copy_(project_head(head_b.double(), q_de))
            self.flex_embed[patch_key(p)] = embed
            self.flex_final[patch_key(p)] = linear
        lora = self.flex_config
        alpha = float(lora["lora_rank"] if lora["lora_alpha"] is None else lora["lora_alpha"])
        attach_adapters(self.blocks, [patch_key(p) for p in self.weak_patch_sizes], lora["lora_rank"], alpha)

    @classmethod
    def from_config(cls, model_config: dict, flex_config: dict):
        """A randomly initialised flexible model with the shapes of a saved one, to load its state dict strictly."""
        return cls(cls.base(**model_config), **flex_config)

    @staticmethod
    def _json_patch(p: Any) -> Any:
        return list(p) if isinstance(p, tuple) else p

    def _unknown_patch_message(self, patch: Any) -> str:
        return (
            f"patch size {patch} is not one of this model's patch sizes {self.patch_sizes}; "
            f"flexify with patch_sizes that include {patch} or pick one of those"
        )

    # ------------------------------------------------------------------ PatchModel hooks
    def lora_key(self, patch_size: Any) -> str | None:
        """Adapter set of ``patch_size``: none for the native size or in shared mode."""
        return patch_key(patch_size) if self.mode == "lora" and patch_size != self.native_patch_size else None

    def block_forward(self, block: nn.Module, patch_size: Any, *args: Any) -> torch.Tensor:
        return lora_block_forward(block, self.lora_key(patch_size), *args)  # (N, T, D)

    def embed_patches(self, x: torch.Tensor, patch_size: Any) -> torch.Tensor:
        """(N, C_in, *latent) -> (N, T, D) tokens with the patch-size LN and embedding, before positions."""
        key = patch_key(patch_size)
        if self.mode == "shared":
            weight, bias = self.flex_embed(patch_size)  # (D, C_in, *p), (D,)
            conv = F.conv3d if weight.ndim == 5 else F.conv2d
            x = conv(x, weight, bias, stride=self._patch_dims(patch_size))  # (N, D, *grid)
        elif patch_size == self.native_patch_size:
            x = self.x_embedder.proj(x)  # (N, D, *grid)
        else:
            x = self.flex_embed[key](x)  # (N, D, *grid)
        x = x.flatten(2).transpose(1, 2)  # (N, T, D)
        # The LN sees the patch tokens only: the fixed position code, added later, keeps its scale.
        if key in self.patch_size_norm:
            x = self.patch_size_norm[key](x)  # (N, T, D)
        if key in self.patch_size_embed:
            x = x + self.patch_size_embed[key]  # (N, T, D)
        return x

    def project_out(self, h: torch.Tensor, patch_size: Any) -> torch.Tensor:
        """Final linear at ``patch_size``: (N, T, D) modulated tokens -> (N, T, prod(p)·C_out)."""
        if self.mode == "shared":
            weight, bias = self.flex_final(patch_size)  # (prod p·C_out, D), (prod p·C_out,)
            return F.linear(h, weight, bias)
        if patch_size == self.native_patch_size:
            return self.final_layer.linear(h)
        return self.flex_final[patch_key(patch_size)](h)

    # ------------------------------------------------------------------ parameters, LoRA inference, export
    def _lora_layers(self) -> list[LoRALinear]:
        return [m for m in self.blocks.modules() if isinstance(m, LoRALinear)]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._lora_layers() for p in m.lora.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _weak_lora_key(self, patch_size: Any) -> str:
        p = self._canonical_patch(patch_size)
        if self.mode != "lora" or p not in self.weak_patch_sizes:
            raise ValueError(
                f"LoRA merging needs mode='lora' (this model: {self.mode!r}) and a weak patch size "
                f"{self.weak_patch_sizes}, got {patch_size}"
            )
        return patch_key(p)

    @torch.no_grad()
    def merge_lora(self, patch_size: Any) -> None:
        """For inference: give every adapted layer a merged copy W + BA used only at ``patch_size``.

        The frozen W is untouched, so the native path stays exact; the price is one extra copy of the
        blocks' qkv/proj/fc1/fc2 weights (~95 % of the parameters) instead of the unmerged adapters'
        extra N·r·(d_in + d_out) FLOPs per layer. Merged copies are detached (no training through
        them) and follow neither ``.to()`` nor later LoRA updates: merge after moving the model and
        again after training.
        """
        key = self._weak_lora_key(patch_size)
        for m in self._lora_layers():
            m.merge(key)

    def unmerge_lora(self) -> None:
        """Drop the merged copies; weak sizes go back to base + adapter."""
        for m in self._lora_layers():
            m.merged = None

    @torch.no_grad()
    def export_native(self) -> PatchModel:
        """The static model (for a DiT: the official layout) computing this model's native path, which
        never uses LoRA; shared mode folds the native projection and patch-size embedding into its weights."""
        p = self.native_patch_size
        flex_only = lambda k: ".lora." in k or k.startswith(("flex_", "patch_size_"))
        state = {k: v for k, v in self.state_dict().items() if not flex_only(k)}
        if self.mode == "shared":
            weight, bias = self.flex_embed.resize(p)
            if patch_key(p) in self.patch_size_embed:
                bias = bias + self.patch_size_embed[patch_key(p)]  # a constant added to every token is a bias
            state["x_embedder.proj.weight"], state["x_embedder.proj.bias"] = weight, bias
            state["final_layer.linear.weight"], state["final_layer.linear.bias"] = self.flex_final.resize(p)
        with torch.device("meta"):
            static = self.base(**self.config, grad_checkpointing=self.grad_checkpointing)
        static.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
        return static.train(self.training)


class FlexDiT(FlexPatches, DiT):
    """A DiT that runs at every size in ``patch_sizes``: the paper's class-conditional ImageNet model
    (shared mode, patches (2, 4)); official keys ``t_embedder.*``, ``y_embedder.*``, ``pos_embed``,
    ``blocks.N.*``, ``final_layer.adaLN_modulation.*`` (LoRA: also ``x_embedder.proj.*``, ``final_layer.linear.*``)."""

    base = DiT


class FlexVideoDiT(FlexPatches, VideoDiT):
    """A VideoDiT that runs at every patch in ``patch_sizes``; default: the native (1, 2, 2), the weak
    temporal (2, 2, 2) and spatial (1, 4, 4), LoRA rank 64 as the paper's video DiT (keys ``p2x2x2``, ``p1x4x4``)."""

    base = VideoDiT
    default_lora_rank = 64

    def default_patch_sizes(self, native: tuple[int, int, int]) -> tuple:
        pt, ph, pw = native  # native, weak temporal (2x frames), weak spatial (2x rows and columns)
        return ((pt, ph, pw), (2 * pt, ph, pw), (pt, 2 * ph, 2 * pw))


class FlexTextDiT(FlexPatches, TextDiT):
    """A TextDiT that runs at every size in ``patch_sizes``; default: LoRA mode, the paper's choice for
    text-to-image (rank 32 as its PixArt-alpha), cross-attention untouched. Distillation calls the same
    forward at the native and a weak ``patch_size``."""

    base = TextDiT
    default_mode = "lora"
