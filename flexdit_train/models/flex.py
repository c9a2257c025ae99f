"""Flexible DiT (FlexiDiT, arXiv 2502.20126): one set of weights that denoises at several patch sizes.

``flexify`` turns a (pre-trained) DiT into a :class:`FlexDiT`. Only tokenisation and de-tokenisation
depend on the patch size: their weights are PI-resized (FlexiViT's pseudo-inverse of bilinear resize)
from the native ones, positions are the sin-cos table at native-grid coordinates, and a learned vector
per patch size is added to every token. Two modes (method doc §2.6):

* ``"shared"``: one underlying embed/de-embed pair at patch size p' projected to every size (native
  included), everything trainable; the native path equals the original to float precision.
* ``"lora"``: the original model is frozen and its native path is bit-exact; each weak size has its own
  embed/de-embed, patch-size embedding and LoRA adapters on the blocks' qkv/proj/fc1/fc2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flexdit_train.models.dit import DiT, check_patch_divides, guided_forward, modulate, sincos_2d, unpatchify

MODES = ("shared", "lora")
# Self-attention and MLP linears of every block get adapters (method doc §2.6); adaLN does not.
LORA_TARGETS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))

#################################################################################
#                     PI-resize matrices (method doc §2.2-2.3)                  #
#################################################################################


def bilinear_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """B (size_out², size_in²) float64 mapping a row-major flattened patch to its bilinear resize.

    torch semantics (align_corners=False, no antialias); bilinear is separable, so B = kron(R, R)
    with R the 1-D matrix, built by resizing the one-hot basis vectors.
    """
    basis = torch.eye(size_in, dtype=torch.float64)[:, None, :]  # (in, 1, in)
    r = F.interpolate(basis, size=size_out, mode="linear", align_corners=False)[:, 0].T  # (out, in)
    return torch.kron(r, r)  # (out², in²)


def embed_projection(patch_size: int, underlying: int) -> torch.Tensor:
    """Q_embed(p) = pinv(B_{p'->p}ᵀ), (p², p'²): underlying kernel slice -> kernel slice at patch size p."""
    return torch.linalg.pinv(bilinear_resize_matrix(underlying, patch_size).T)


def deembed_projection(patch_size: int, underlying: int) -> torch.Tensor:
    """Q_de(p) = pinv(B_{p->p'}ᵀ), (p'², p²), applied per output channel of the final linear."""
    return torch.linalg.pinv(bilinear_resize_matrix(patch_size, underlying).T)


def project_kernel(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Conv kernel (D, C, a, a) -> (D, C, b, b) with q (b², a²) applied to every spatial slice."""
    d, c, a, _ = weight.shape
    b = math.isqrt(q.shape[0])
    out = torch.einsum("ij,ocj->oci", q, weight.reshape(d, c, a * a))  # (D, C, b²)
    return out.reshape(d, c, b, b)


def project_head(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Final-linear weight (a²·C, D) or bias (a²·C,) -> (b²·C, ...) with q (a², b²) per channel.

    DiT's output index is (p_row, p_col, channel) with the channel fastest, so the leading dim splits
    as (a², C).
    """
    rest = weight.shape[1:]
    out = torch.einsum("ab,ac...->bc...", q, weight.reshape(q.shape[0], -1, *rest))  # (b², C, ...)
    return out.reshape(-1, *rest)


class PIResized(nn.Module):
    """Underlying weight/bias at patch size p', PI-resized to any patch size (shared mode).

    Projections are recomputed while autograd records (training needs the graph anyway, and the
    einsum costs ~1e-4 of a forward) and cached otherwise (sampling), keyed on the parameters' version
    counters and storage: optimizer steps, EMA lerps and ``load_state_dict`` all bump the version, so a
    stale projection is never served. In-place edits through ``.data`` bypass the counter; call
    :meth:`clear_cache` after those.
    """

    def __init__(
        self, kind: str, weight: torch.Tensor, bias: torch.Tensor, underlying: int, patch_sizes: Iterable[int]
    ):
        super().__init__()
        self.kind = kind  # "embed": conv kernel (D, C_in, p', p'); "head": linear (p'²·C_out, D)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        # Plain dicts, not buffers: kept out of the state dict and of DDP's buffer broadcast.
        project = embed_projection if kind == "embed" else deembed_projection
        self._fp64 = {p: project(p, underlying) for p in patch_sizes}  # float64 on CPU
        self._matrices: dict = {}  # (p, device, dtype) -> projection matrix
        self._resized: dict = {}  # p -> (parameter state, weight, bias)

    def clear_cache(self) -> None:
        self._resized.clear()

    def matrix(self, patch_size: int) -> torch.Tensor:
        """Projection matrix in the compute dtype (at least fp32: bf16 would round the pinv entries)."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        if torch.compiler.is_compiling():
            return self._fp64[patch_size].to(self.weight.device, dtype)
        key = (patch_size, self.weight.device, dtype)
        if key not in self._matrices:
            self._matrices[key] = self._fp64[patch_size].to(self.weight.device, dtype)
        return self._matrices[key]

    def resize(self, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) at ``patch_size``, differentiable w.r.t. the underlying parameters."""
        q = self.matrix(patch_size)
        if self.kind == "embed":
            weight = project_kernel(self.weight.to(q.dtype), q)  # (D, C_in, p, p)
            return weight.to(self.weight.dtype), self.bias
        weight = project_head(self.weight.to(q.dtype), q)  # (p²·C_out, D)
        bias = project_head(self.bias.to(q.dtype), q)  # (p²·C_out,)
        return weight.to(self.weight.dtype), bias.to(self.bias.dtype)

    def forward(self, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.resize(patch_size)
        w, b = self.weight, self.bias
        state = (w._version, b._version, w.data_ptr(), b.data_ptr(), w.device, w.dtype)
        hit = self._resized.get(patch_size)
        if hit is None or hit[0] != state:
            hit = (state, *self.resize(patch_size))
            self._resized[patch_size] = hit
        return hit[1], hit[2]


#################################################################################
#                                     LoRA                                      #
#################################################################################


class LoRAAdapter(nn.Module):
    """Low-rank update ``scale * B @ A``; B starts at zero so the adapted layer starts unchanged."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, like: torch.Tensor):
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=like.device, dtype=like.dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=like.device, dtype=like.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear / peft

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.scale  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale  # (out, in)


class LoRALinear(nn.Linear):
    """An nn.Linear that keeps the original ``weight``/``bias`` (and keys) plus one adapter per patch size.

    ``active`` ("p4", ... or None for the plain layer) is switched by FlexDiT around each block call;
    adapters live under ``lora.<key>.{A,B}``.
    """

    def __init__(self, base: nn.Linear, keys: Iterable[str], rank: int, alpha: float):
        # Built on the meta device (nothing allocated): the original Parameters are assigned right away.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.lora = nn.ModuleDict(
            {k: LoRAAdapter(base.in_features, base.out_features, rank, alpha, base.weight) for k in keys}
        )
        self.active: str | None = None
        self.merged: tuple[str, torch.Tensor] | None = None  # (key, W + BA), a copy outside the state dict

    def merge(self, key: str) -> None:
        self.merged = (key, (self.weight + self.lora[key].delta_weight()).detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            return F.linear(x, self.weight, self.bias)
        if self.merged is not None and self.merged[0] == self.active:
            return F.linear(x, self.merged[1], self.bias)
        return F.linear(x, self.weight, self.bias) + self.lora[self.active](x)


def _block_forward(block: nn.Module, x: torch.Tensor, c: torch.Tensor, lora_key: str | None) -> torch.Tensor:
    """One DiT block with the LoRA set ``lora_key`` switched on for exactly this call.

    The switch is made inside the function that activation checkpointing re-runs, so the recomputed
    forward uses the same adapters, and it is reset afterwards so no state leaks into later calls.
    """
    if lora_key is None:
        return block(x, c)
    layers = [m for m in block.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.active = lora_key
    try:
        return block(x, c)  # (N, T, D)
    finally:
        for m in layers:
            m.active = None


#################################################################################
#                                    FlexDiT                                    #
#################################################################################


def _key(patch_size: int) -> str:
    return f"p{patch_size}"


class FlexDiT(nn.Module):
    """A DiT that runs at every size in ``patch_sizes``; build it with :func:`flexify` or :meth:`from_config`.

    It adopts (does not copy) the trunk of the DiT it is built from, so the shared state-dict keys stay
    the official ones (``t_embedder.*``, ``y_embedder.*``, ``pos_embed``, ``blocks.N.*``,
    ``final_layer.adaLN_modulation.*``; under LoRA also ``x_embedder.proj.*``, ``final_layer.linear.*``).
    New parameters: ``flex_embed.*``, ``flex_final.*``, ``patch_size_embed.pP``, ``patch_size_norm.pP.*``
    and ``blocks.N.{attn.qkv,attn.proj,mlp.fc1,mlp.fc2}.lora.pP.{A,B}``. Per-size parameters get no
    gradient in steps at other sizes, so DDP needs ``find_unused_parameters=True``.
    """

    def __init__(
        self,
        model: DiT,
        patch_sizes: Iterable[int] = (2, 4),
        mode: str = "shared",
        lora_rank: int = 32,
        lora_alpha: float | None = None,
        underlying_patch_size: int | None = None,
        patch_size_norm: bool = False,
    ):
        super().__init__()
        native = model.patch_size
        sizes = tuple(sorted({int(p) for p in patch_sizes}))
        underlying = max(sizes) if underlying_patch_size is None else int(underlying_patch_size)
        if mode not in MODES:
            raise ValueError(f"unknown flexify mode {mode!r}; use one of {MODES}")
        if native not in sizes or min(sizes) < 1:
            raise ValueError(f"patch_sizes {sizes} must be positive and include the native patch size {native}")
        if underlying < native:
            raise ValueError(
                f"underlying_patch_size {underlying} is smaller than the native patch size {native}, so the "
                f"native path could not be reproduced; use underlying_patch_size >= {native}"
            )
        if mode == "lora" and len(sizes) == 1:
            raise ValueError(
                f"mode='lora' needs a weak patch size besides the native {native}, "
                f"e.g. patch_sizes=({native}, {2 * native})"
            )
        if mode == "lora" and lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
        if mode == "lora" and patch_size_norm:
            raise ValueError("patch_size_norm=True needs mode='shared'; the LoRA model keeps its trunk frozen")

        self.mode = mode
        self.native_patch_size = native
        self.patch_sizes = sizes
        self.weak_patch_sizes = tuple(p for p in sizes if p != native)
        self.config = dict(model.config)
        self.flex_config = dict(
            patch_sizes=list(sizes),
            mode=mode,
            lora_rank=int(lora_rank),
            lora_alpha=None if lora_alpha is None else float(lora_alpha),
            underlying_patch_size=underlying,
            patch_size_norm=bool(patch_size_norm),
        )
        self.input_size = model.input_size
        self.hidden_size = model.hidden_size
        self.in_channels = model.in_channels
        self.out_channels = model.out_channels
        self.learn_sigma = model.learn_sigma
        self.num_classes = model.num_classes
        self.grad_checkpointing = model.grad_checkpointing
        self._pos_cache: dict = {}  # (grid, p, device, dtype) -> (1, T, D) table

        self.t_embedder = model.t_embedder
        self.y_embedder = model.y_embedder
        self.pos_embed = model.pos_embed
        self.blocks = model.blocks
        hidden = self.hidden_size
        w_nat = model.x_embedder.proj.weight.detach()  # (D, C_in, p, p)
        b_nat = model.x_embedder.proj.bias.detach()  # (D,)
        head_w = model.final_layer.linear.weight.detach()  # (p²·C_out, D)
        head_b = model.final_layer.linear.bias.detach()  # (p²·C_out,)
        like = dict(device=w_nat.device, dtype=w_nat.dtype)
        pinv_embed = torch.linalg.pinv(embed_projection(native, underlying)).to(w_nat.device)  # (p'², p²)
        pinv_de = torch.linalg.pinv(deembed_projection(native, underlying)).to(w_nat.device)  # (p², p'²)

        if mode == "shared":
            # Underlying weights chosen so that projecting them back to the native size gives the
            # pre-trained weights (Q pinv(Q) = I since Q_embed(p_nat) has full row rank).
            kernel = project_kernel(w_nat.double(), pinv_embed).to(w_nat.dtype)  # (D, C_in, p', p')
            self.flex_embed = PIResized("embed", kernel, b_nat.clone(), underlying, sizes)
            self.flex_final = PIResized(
                "head",
                project_head(head_w.double(), pinv_de).to(head_w.dtype),
                project_head(head_b.double(), pinv_de).to(head_b.dtype),
                underlying,
                sizes,
            )
            # The final linear moves into flex_final; keep the modulation under its official keys.
            self.final_layer = nn.Module()
            self.final_layer.norm_final = model.final_layer.norm_final
            self.final_layer.adaLN_modulation = model.final_layer.adaLN_modulation
            embed_sizes = sizes
        else:
            model.requires_grad_(False)
            self.x_embedder = model.x_embedder
            self.final_layer = model.final_layer
            self.flex_embed = nn.ModuleDict()
            self.flex_final = nn.ModuleDict()
            for p in self.weak_patch_sizes:
                # Same start as the shared model's weak path: the PI projection of the native weights.
                q_embed = embed_projection(p, underlying).to(w_nat.device) @ pinv_embed  # (p², p_nat²)
                q_de = pinv_de @ deembed_projection(p, underlying).to(w_nat.device)  # (p_nat², p²)
                conv = nn.Conv2d(self.in_channels, hidden, p, stride=p, **like)
                linear = nn.Linear(hidden, p * p * self.out_channels, **like)
                with torch.no_grad():
                    conv.weight.copy_(project_kernel(w_nat.double(), q_embed))
                    conv.bias.copy_(b_nat)
                    linear.weight.copy_(project_head(head_w.double(), q_de))
                    linear.bias.copy_(project_head(head_b.double(), q_de))
                self.flex_embed[_key(p)] = conv
                self.flex_final[_key(p)] = linear
            alpha = float(lora_rank if lora_alpha is None else lora_alpha)
            keys = [_key(p) for p in self.weak_patch_sizes]
            for block in self.blocks:
                for part, name in LORA_TARGETS:
                    parent = getattr(block, part)
                    setattr(parent, name, LoRALinear(getattr(parent, name), keys, lora_rank, alpha))
            embed_sizes = self.weak_patch_sizes  # the native size has no embedding: its path stays exact

        self.patch_size_embed = nn.ParameterDict(
            {_key(p): nn.Parameter(torch.zeros(hidden, **like)) for p in embed_sizes}
        )
        # Weak sizes only: an affine LN normalises the tokens even at identity init, so putting one on
        # the native path would change the pre-trained function (and export_native could not fold it).
        self.patch_size_norm = nn.ModuleDict(
            {
                _key(p): nn.LayerNorm(hidden, eps=1e-6, **like)
                for p in (self.weak_patch_sizes if patch_size_norm else ())
            }
        )

    @classmethod
    def from_config(cls, model_config: dict, flex_config: dict) -> FlexDiT:
        """A randomly initialised FlexDiT with the shapes of a saved one, to load its state dict strictly."""
        return cls(DiT(**model_config), **flex_config)

    @property
    def null_class(self) -> int:
        """Label id of the classifier-free-guidance null row."""
        return self.num_classes

    def _lora_layers(self) -> list[LoRALinear]:
        return [m for m in self.blocks.modules() if isinstance(m, LoRALinear)]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._lora_layers() for p in m.lora.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def check_patch_size(self, patch_size: int | None, latent_hw: tuple[int, int]) -> int:
        """Resolve None to the native size and fail with one line on an unknown or non-dividing size."""
        p = self.native_patch_size if patch_size is None else int(patch_size)
        if p not in self.patch_sizes:
            raise ValueError(
                f"patch size {p} is not one of this model's patch sizes {self.patch_sizes}; "
                f"flexify with patch_sizes that include {p} or pick one of those"
            )
        check_patch_divides(tuple(latent_hw), p)
        return p

    # ------------------------------------------------------------------ per-patch-size pieces
    def position_embedding(self, grid_hw: tuple[int, int], patch_size: int) -> torch.Tensor:
        """(1, T, D) sin-cos table at native-grid coordinates (index * p / p_nat); stored table when native."""
        p_nat = self.native_patch_size
        if patch_size == p_nat and tuple(grid_hw) == (self.input_size[0] // p_nat, self.input_size[1] // p_nat):
            return self.pos_embed
        key = (tuple(grid_hw), patch_size, self.pos_embed.device, self.pos_embed.dtype)
        table = None if torch.compiler.is_compiling() else self._pos_cache.get(key)
        if table is None:
            table = sincos_2d(self.hidden_size, grid_hw, patch_size / self.native_patch_size)  # (T, D)
            table = table.unsqueeze(0).to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
            if not torch.compiler.is_compiling():
                self._pos_cache[key] = table
        return table

    def embed_patches(self, x: torch.Tensor, patch_size: int) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, T, D) tokens with the patch-size LN and embedding, before positions."""
        key = _key(patch_size)
        if self.mode == "shared":
            weight, bias = self.flex_embed(patch_size)  # (D, C_in, p, p), (D,)
            x = F.conv2d(x, weight, bias, stride=patch_size)  # (N, D, H/p, W/p)
        elif patch_size == self.native_patch_size:
            x = self.x_embedder.proj(x)  # (N, D, H/p, W/p)
        else:
            x = self.flex_embed[key](x)  # (N, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (N, T, D)
        # The LN sees the patch tokens only: the fixed position code, added later, keeps its scale.
        if key in self.patch_size_norm:
            x = self.patch_size_norm[key](x)  # (N, T, D)
        if key in self.patch_size_embed:
            x = x + self.patch_size_embed[key]  # (N, T, D)
        return x

    def project_out(self, h: torch.Tensor, patch_size: int) -> torch.Tensor:
        """Final linear at ``patch_size``: (N, T, D) modulated tokens -> (N, T, p*p*C_out)."""
        if self.mode == "shared":
            weight, bias = self.flex_final(patch_size)  # (p²·C_out, D), (p²·C_out,)
            return F.linear(h, weight, bias)
        if patch_size == self.native_patch_size:
            return self.final_layer.linear(h)
        return self.flex_final[_key(patch_size)](h)

    def embed_condition(
        self, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        t_emb = self.t_embedder(t)  # (N, D)
        y_emb = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        return t_emb + y_emb  # (N, D)

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor, patch_size: int) -> torch.Tensor:
        lora_key = _key(patch_size) if self.mode == "lora" and patch_size != self.native_patch_size else None
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(_block_forward, block, x, c, lora_key, use_reentrant=False)  # (N, T, D)
            else:
                x = _block_forward(block, x, c, lora_key)  # (N, T, D)
        return x

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        patch_size: int | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels -> (N, C_out, H, W) at ``patch_size``.

        ``patch_size`` None means the native size; ``force_drop_ids`` (N,) fixes the label dropout as in DiT.
        """
        p = self.check_patch_size(patch_size, x.shape[-2:])
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        x = self.embed_patches(x, p) + self.position_embedding(grid, p)  # (N, T, D)
        c = self.embed_condition(t, y, force_drop_ids)  # (N, D)
        x = self.run_blocks(x, c, p)  # (N, T, D)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each, one for all sizes
        x = modulate(self.final_layer.norm_final(x), shift, scale)  # (N, T, D)
        x = self.project_out(x, p)  # (N, T, p*p*C_out)
        return unpatchify(x, grid, p, self.out_channels)  # (N, C_out, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        patch_size: int | None = None,
        guide_all_channels: bool | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Classifier-free guidance at one patch size, same arithmetic as ``DiT.forward_with_cfg``."""
        forward = partial(self.forward, patch_size=patch_size, **kwargs)
        return guided_forward(self, forward, x, t, y, cfg_scale, guide_all_channels)

    # ------------------------------------------------------------------ LoRA inference, export
    def _weak_lora_key(self, patch_size: int) -> str:
        if self.mode != "lora" or patch_size not in self.weak_patch_sizes:
            raise ValueError(
                f"LoRA merging needs mode='lora' (this model: {self.mode!r}) and a weak patch size "
                f"{self.weak_patch_sizes}, got {patch_size}"
            )
        return _key(patch_size)

    @torch.no_grad()
    def merge_lora(self, patch_size: int) -> None:
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
    def export_native(self) -> DiT:
        """A static DiT (official layout) computing this model's native path (which never uses LoRA)."""
        p = self.native_patch_size
        flex_only = lambda k: ".lora." in k or k.startswith(("flex_", "patch_size_"))
        state = {k: v for k, v in self.state_dict().items() if not flex_only(k)}
        if self.mode == "shared":
            weight, bias = self.flex_embed.resize(p)
            if _key(p) in self.patch_size_embed:
                bias = bias + self.patch_size_embed[_key(p)]  # a constant added to every token is a bias
            state["x_embedder.proj.weight"], state["x_embedder.proj.bias"] = weight, bias
            state["final_layer.linear.weight"], state["final_layer.linear.bias"] = self.flex_final.resize(p)
        with torch.device("meta"):
            dit = DiT(**self.config, grad_checkpointing=self.grad_checkpointing)
        dit.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
        return dit.train(self.training)


def flexify(
    model: DiT,
    patch_sizes: Iterable[int] = (2, 4),
    mode: str = "shared",
    lora_rank: int = 32,
    lora_alpha: float | None = None,
    underlying_patch_size: int | None = None,
    patch_size_norm: bool = False,
) -> FlexDiT:
    """Make ``model`` run at every size in ``patch_sizes`` (which must include its native one).

    The FlexDiT takes over ``model``'s modules (deep-copy it first to keep an independent original).
    ``underlying_patch_size`` p' (default: the largest patch size, 4 for the paper's (2, 4)) must be
    >= the native size for the native path to be reproducible; sizes above p' up-sample the kernel
    FlexiViT-style. LoRA scale is ``lora_alpha / lora_rank`` (alpha defaults to the rank: scale 1).
    """
    return FlexDiT(model, patch_sizes, mode, lora_rank, lora_alpha, underlying_patch_size, patch_size_norm)
