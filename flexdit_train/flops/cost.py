"""Analytic cost model of a network: ``patch -> MACs`` of one forward for one sample, and its breakdown.

A :class:`CostModel` is what budget schedules take as their cost (:mod:`flexdit_train.sampling.schedule`),
what the trainer counts its FLOPs with and what ``python -m flexdit_train.flops`` reports. The arch registry
(:mod:`flexdit_train.models.arch`) gives each family its terms (:mod:`.terms`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flexdit_train.flops.terms import DIT_TERMS, ForwardShape, Term
from flexdit_train.models.arch import ARCHS, Arch, arch_of
from flexdit_train.models.dit import check_patch_divides, to_2tuple
from flexdit_train.models.loading import preset_of
from flexdit_train.models.sparse_dit import sparse_grid_pair


def _patch(value: Any) -> int | tuple[int, ...]:
    """An int (square 2-D patch) or a per-axis tuple, from any sequence (a video config's [1, 2, 2])."""
    return tuple(int(v) for v in value) if isinstance(value, Sequence) else int(value)


@dataclass(frozen=True, eq=False)
class CostModel:
    """MACs of one forward for one sample at a fixed latent shape, per patch size.

    ``config`` is a model config (``model.config``), ``latent_shape`` (H, W) or (F, H, W), ``terms`` the
    arch's MAC terms. ``lora_rank`` models unmerged LoRA adapters on every patch except the native one,
    which has none (FlexiDiT's LoRA flavour); leave it 0 for shared weights or merged adapters.

    A SparseDiT (a config with ``sparse_grid``) also costs by its sparse grid: ``cost(patch, sparse_grid=s)``
    (None: the config's fixed grid). Its :meth:`reference` is the dense DiT of the same width and depth that
    its weights come from, so compute fractions are shares of the pretrained DiT's compute.
    """

    config: Mapping[str, Any]
    latent_shape: tuple[int, ...]
    terms: Mapping[str, Term]
    lora_rank: int = 0

    @property
    def native_patch(self) -> int | tuple[int, ...]:
        return _patch(self.config["patch_size"])

    @property
    def sparse(self) -> bool:
        """Whether the network runs a sparse token grid per forward (SparseDiT)."""
        return "sparse_grid" in self.config

    def shape(self, patch: Any, sparse_grid: Any = None) -> ForwardShape:
        """The sizes one forward at ``patch`` (and a SparseDiT's ``sparse_grid``) depends on; one-line error when
        the patch does not tile the latent or the sparse grid does not fit the token grid."""
        if sparse_grid is not None and not self.sparse:
            raise ValueError(f"sparse_grid={sparse_grid!r} prices a SparseDiT; this model has no sparse token grid")
        p = _patch(patch)
        lora_rank = 0 if p == self.native_patch else self.lora_rank
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = no or merged adapters), got {lora_rank}")
        check_patch_divides(self.latent_shape, p)
        dims = (p, p) if isinstance(p, int) else p
        grid = [size // d for size, d in zip(self.latent_shape, dims, strict=True)]
        width, in_channels = self.config["hidden_size"], self.config["in_channels"]
        return ForwardShape(
            depth=self.config["depth"],
            width=width,
            mlp_hidden=int(width * self.config["mlp_ratio"]),  # as the blocks build their Mlp
            tokens=math.prod(grid),
            patch_volume=math.prod(dims),
            in_channels=in_channels,
            out_channels=2 * in_channels if self.config["learn_sigma"] else in_channels,
            lora_rank=lora_rank,
            frames=grid[0] if len(grid) == 3 else 1,
            attention=self.config.get("attention", "full"),
            text_len=self.config.get("text_len", 0),
            caption_channels=self.config.get("caption_channels", 0),
            model_config=self.config,
            sparse_tokens=math.prod(self._sparse_hw(grid, sparse_grid)) if self.sparse else 0,
        )

    def _sparse_hw(self, grid: Sequence[int], sparse_grid: Any) -> tuple[int, int]:
        return sparse_grid_pair(self.config["sparse_grid"] if sparse_grid is None else sparse_grid, tuple(grid))

    def breakdown(self, patch: Any, sparse_grid: Any = None) -> dict[str, int]:
        """MACs of one forward at ``patch`` (and ``sparse_grid``), per term."""
        shape = self.shape(patch, sparse_grid)
        return {name: term(shape) for name, term in self.terms.items()}

    def __call__(self, patch: Any, sparse_grid: Any = None) -> int:
        """MACs of one forward at ``patch`` (DiT's "Gflops" x 1e9); a SparseDiT's at ``sparse_grid`` (None: its
        config's fixed grid)."""
        return sum(self.breakdown(patch, sparse_grid).values())

    def reference(self, patch: Any) -> int:
        """MACs of the full-density forward that compute fractions divide by: this network's at ``patch``, or for a
        SparseDiT the dense DiT of the same width and depth (the pretrained model it was converted from)."""
        if not self.sparse:
            return self(patch)
        shape = self.shape(patch)
        return sum(term(shape) for term in DIT_TERMS.values())

    def block_macs(self, patch: Any) -> float:
        """MACs of one transformer block at ``patch`` (the blocks' share of a forward over the depth): what a
        block plan saves when it reuses or forecasts a block instead of computing it."""
        shape = self.shape(patch)
        no_blocks = dataclasses.replace(shape, depth=0)
        blocks = sum(term(shape) - term(no_blocks) for term in self.terms.values())
        return blocks / shape.depth

    def forecast_macs(self, patch: Any, order: int) -> int:
        """MACs of forecasting one block's delta with a polynomial of ``order`` through ``order + 1`` computed
        deltas: ``order + 1`` multiply-adds per feature; reuse (order 0) is a plain add, like a residual, free."""
        shape = self.shape(patch)
        return 0 if order == 0 else (order + 1) * shape.tokens * shape.width

    def flops(self, patch: Any) -> int:
        """Hardware FLOPs (multiplies and adds counted separately) of one forward at ``patch``."""
        return 2 * self(patch)

    def training_flops(self, patch: Any, batch_size: int = 1) -> int:
        """Hardware FLOPs of one training step: forward + backward ~ 3 forwards per sample (DiT's convention)."""
        return 3 * batch_size * self.flops(patch)


def registry_arch(name: str) -> Arch:
    """The arch whose presets hold ``name`` (e.g. "DiT-XL/2" -> dit, "EDT-XL/2" -> edt), looked up in every arch."""
    for arch in ARCHS.values():
        if name in arch.presets:
            return arch
    names = [n for arch in ARCHS.values() for n in arch.presets]
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(names)}")


def registry_config(name: str, input_size: int | Sequence[int] | None = None) -> dict[str, Any]:
    """Config of a registered preset of any arch at ``input_size`` (None: the factory's default, 32 for the
    image archs), with the registry factories' defaults.

    DiT names ("DiT-XL/2") give the config built from the name (4 latent channels, learned sigma, MLP
    ratio 4) instead of instantiating the model (~1 s even on meta). Another arch's factory may carry a
    ``preset_config`` dict (what its name fixes) for the same shortcut; otherwise the preset is built on
    the meta device and its ``config`` read.
    """
    arch = registry_arch(name)
    if arch.name == "dit":
        return dict(
            input_size=list(to_2tuple(32 if input_size is None else input_size)),
            in_channels=4,
            mlp_ratio=4.0,
            learn_sigma=True,
            **preset_of(name),
        )
    factory = arch.presets[name]
    preset = getattr(factory, "preset_config", None)
    if preset is not None:
        size = 32 if input_size is None else input_size
        size = list(to_2tuple(size)) if isinstance(size, int) else [int(s) for s in size]
        return dict(input_size=size, in_channels=4, mlp_ratio=4.0, learn_sigma=True, **preset)
    with torch.device("meta"):
        return dict(factory(**({} if input_size is None else {"input_size": input_size})).config)


def cost_model(
    model: nn.Module | str, latent_shape: int | Sequence[int] | None = None, lora_rank: int = 0
) -> CostModel:
    """The cost model of a network of any registered arch, or of a preset name of any arch, at ``latent_shape``
    ((H, W) or (F, H, W); default the model's input size); ``lora_rank`` counts unmerged adapters."""
    if isinstance(model, str):
        config, terms = registry_config(model), registry_arch(model).cost_terms
    else:
        config, terms = dict(model.config), arch_of(model).cost_terms
    latent = config["input_size"] if latent_shape is None else latent_shape
    latent = to_2tuple(latent) if isinstance(latent, int) else tuple(int(s) for s in latent)
    return CostModel(config, latent, terms, lora_rank)
