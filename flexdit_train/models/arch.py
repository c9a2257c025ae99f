"""Model families ("archs"): the one place that knows which networks are image, video or text models.

Each :class:`Arch` names its static and flexible classes, its presets, the config keys its data decides,
how a batch conditions it (and what its null condition is for guidance), its guidance convention and the
terms of its analytic cost model. Checkpoints store the arch name next to the model config, so loading
rebuilds the right class; the factory, the trainer, the sampler, flexify and the FLOPs model ask
:func:`arch_of` instead of testing a model's type. Code is named as "module:attribute" and imported when
used, so the registry imports no model code (no import cycles with the modules that use it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import Any

import torch
from torch import nn


def _resolve(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(import_module(module), name)


@dataclass(frozen=True)
class Arch:
    """One family of networks and everything the rest of the package needs to know about it."""

    name: str
    static_ref: str
    flexible_ref: str
    presets_ref: str  # {preset name: factory of the static model}; a name fixes depth, width, heads and patch
    data_keys: tuple[str, ...]  # config keys the data decides: a pretrained model must agree with them
    conditioning: str  # "class" (labels ``y``) or "text" (``text_emb``, ``text_mask``)
    dropout_key: str  # config key of the condition dropout rate (the CFG null condition in training)
    guides_all_channels: bool  # CFG default: DiT guides only its first 3 latent channels (its published FIDs)
    cost_terms_ref: str  # the MAC terms of its analytic cost model (flexdit_train.flops.terms)
    # Official facebookresearch/DiT files store no config: shapes are read off the tensors and a preset name
    # is checked against them. The other archs load only from files of this project, which store their config.
    official_layout: bool
    # An arch whose pretrained models this one is converted from ("dit" for SparseDiT), and the converter
    # (model, name, **config) -> model that build_model calls when model.pretrained holds one of them.
    source_arch: str | None = None
    converter_ref: str | None = None

    @property
    def static(self) -> type[nn.Module]:
        return _resolve(self.static_ref)

    @property
    def flexible(self) -> type[nn.Module]:
        return _resolve(self.flexible_ref)

    @property
    def presets(self) -> Mapping[str, Any]:
        return _resolve(self.presets_ref)

    @property
    def cost_terms(self) -> Mapping[str, Any]:
        return _resolve(self.cost_terms_ref)

    @property
    def converter(self) -> Any:
        return None if self.converter_ref is None else _resolve(self.converter_ref)

    def guide_all_channels(self, flag: bool | None) -> bool:
        """An explicit ``guide_all_channels`` setting, or this arch's convention for None."""
        return self.guides_all_channels if flag is None else bool(flag)

    def guided_channels(self, model: nn.Module, flag: bool | None) -> int:
        """How many eps channels guidance combines: all, or DiT's first 3; None follows this arch."""
        return model.in_channels if self.guide_all_channels(flag) else min(3, model.in_channels)

    def condition(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The model's condition kwargs of a training batch: ``y``, or ``text_emb`` and ``text_mask``.

        Missing caption embeddings go to the model as None, so its own one-line error names what it needs.
        """
        if self.conditioning == "text":
            return {"text_emb": batch.get("text_emb"), "text_mask": batch.get("text_mask")}
        return {"y": batch["y"]}

    def null_condition(self, model: nn.Module, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional counterpart of ``cond``: the null label, or the model's null caption and mask."""
        if self.conditioning == "text":
            emb, mask = model.null_text(cond["text_emb"].shape[0])  # (N, L, D_text), (N, L)
            return {"text_emb": emb.to(cond["text_emb"].dtype), "text_mask": mask}
        return {"y": torch.full_like(cond["y"], model.null_class)}


_DIT, _VIDEO, _TEXT = "flexdit_train.models.dit", "flexdit_train.models.video_dit", "flexdit_train.models.text_dit"
_FLEX, _TERMS = "flexdit_train.models.flex", "flexdit_train.flops.terms"
ARCHS: dict[str, Arch] = {
    "dit": Arch(
        name="dit",
        static_ref=f"{_DIT}:DiT",
        flexible_ref=f"{_FLEX}:FlexDiT",
        presets_ref=f"{_DIT}:DiT_models",
        data_keys=("input_size", "num_classes", "in_channels"),
        conditioning="class",
        dropout_key="class_dropout_prob",
        guides_all_channels=False,
        cost_terms_ref=f"{_TERMS}:DIT_TERMS",
        official_layout=True,
    ),
    "video_dit": Arch(
        name="video_dit",
        static_ref=f"{_VIDEO}:VideoDiT",
        flexible_ref=f"{_FLEX}:FlexVideoDiT",
        presets_ref=f"{_VIDEO}:VideoDiT_models",
        data_keys=("input_size", "num_classes", "in_channels"),
        conditioning="class",
        dropout_key="class_dropout_prob",
        guides_all_channels=True,
        cost_terms_ref=f"{_TERMS}:DIT_TERMS",  # its attention term follows the factorised/full block layout
        official_layout=False,
    ),
    "text_dit": Arch(
        name="text_dit",
        static_ref=f"{_TEXT}:TextDiT",
        flexible_ref=f"{_FLEX}:FlexTextDiT",
        presets_ref=f"{_TEXT}:TextDiT_models",
        data_keys=("input_size", "in_channels", "caption_channels", "text_len"),
        conditioning="text",
        dropout_key="caption_dropout_prob",
        guides_all_channels=True,
        cost_terms_ref=f"{_TERMS}:TEXT_TERMS",
        official_layout=False,
    ),
    "edt": Arch(
        name="edt",
        static_ref="flexdit_train.models.edt:EDT",
        flexible_ref="flexdit_train.models.edt:EDT",  # EDT is static: flexify refuses it (see models/edt.py)
        presets_ref="flexdit_train.models.edt:EDT_models",
        data_keys=("input_size", "num_classes", "in_channels"),
        conditioning="class",
        dropout_key="class_dropout_prob",
        guides_all_channels=False,  # as the authors' sampler: DiT's first 3 latent channels
        cost_terms_ref=f"{_TERMS}:EDT_TERMS",
        official_layout=False,
    ),
    "sparse_dit": Arch(
        name="sparse_dit",
        static_ref="flexdit_train.models.sparse_dit:SparseDiT",
        flexible_ref="flexdit_train.models.sparse_dit:SparseDiT",  # static: flexify refuses it (see models/sparse_dit.py)
        presets_ref="flexdit_train.models.sparse_dit:SparseDiT_models",
        data_keys=("input_size", "num_classes", "in_channels"),
        conditioning="class",
        dropout_key="class_dropout_prob",
        guides_all_channels=False,  # converted from DiT: its first 3 latent channels, as the authors' sampler
        cost_terms_ref=f"{_TERMS}:SPARSE_DIT_TERMS",
        official_layout=False,
        source_arch="dit",
        converter_ref="flexdit_train.models.sparse_dit:convert_pretrained",
    ),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown model arch {name!r}; use one of {list(ARCHS)}")
    return ARCHS[name]


def arch_of(model: nn.Module) -> Arch:
    """The family of a static or flexible network (flexible classes subclass the static ones), also inside a
    ``torch.compile`` wrapper."""
    model = getattr(model, "_orig_mod", model)
    for arch in ARCHS.values():
        if isinstance(model, (arch.static, arch.flexible)):
            return arch
    raise TypeError(f"{type(model).__name__} is not a model of a known arch ({', '.join(ARCHS)})")
