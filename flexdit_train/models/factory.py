"""Hydra-facing model factory: a registry preset, explicit sizes, or a pretrained checkpoint, of any arch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from flexdit_train.models.arch import arch_of, get_arch

# What a registry name fixes; the config's other keys (shapes, label dropout, attention, init) still apply.
PRESET_SIZES = ("patch_size", "hidden_size", "depth", "num_heads")


def build_model(
    name: str | None = None,
    pretrained: str | None = None,
    grad_checkpointing: bool = False,
    arch: str = "dit",
    **kwargs,
) -> nn.Module:
    """Build the network described by a model config.

    ``arch`` picks the family (:mod:`flexdit_train.models.arch`: dit, video_dit, text_dit, edt, sparse_dit).
    ``pretrained`` loads a checkpoint (its shapes and arch win; a checkpoint of the arch's ``source_arch``, a DiT
    for sparse_dit, is converted with the config's layout) and checks them against the data-derived sizes in
    ``kwargs``; ``name`` picks a registry preset, which fixes the sizes of :data:`PRESET_SIZES`; otherwise
    the explicit sizes in ``kwargs`` build the model.
    """
    family = get_arch(arch)
    if pretrained:
        from flexdit_train.models.loading import from_pretrained

        # Official-layout names are checked against the weights; other archs' checkpoints store their config.
        model = from_pretrained(pretrained, model=name if family.official_layout else None)
        if family.source_arch is not None and arch_of(model).name == family.source_arch:
            # a pretrained source model (SparseDiT from a DiT): every layer loaded in order from it
            model = family.converter(model, name, **kwargs).eval()
        if arch_of(model).name != arch:
            raise ValueError(
                f"checkpoint {pretrained} holds a {arch_of(model).name}, the model config a {arch}: "
                "pick the matching model config or checkpoint"
            )
        check_matches_data(model, pretrained, **{k: kwargs[k] for k in family.data_keys if k in kwargs})
    elif name:
        if name not in family.presets:
            raise ValueError(f"unknown {arch} model {name!r}; choose one of {', '.join(family.presets)}")
        model = family.presets[name](**{k: v for k, v in kwargs.items() if k not in PRESET_SIZES})
    else:
        model = family.static(**kwargs)
    model.grad_checkpointing = grad_checkpointing
    return model


def _as_list(value: Any, like: Any) -> Any:
    """An int size broadcast to the length of ``like`` (a stored [H, W] or [F, H, W]); sequences as lists."""
    if isinstance(like, list) and not isinstance(value, Sequence):
        return [value] * len(like)
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def check_matches_data(model: nn.Module, source: str, **expected: Any) -> None:
    """One-line error when a pretrained model does not fit the configured data (keys of its config)."""
    actual = dict(model.config)
    wrong = [
        f"{key}={actual.get(key)} (data has {_as_list(value, actual.get(key))})"
        for key, value in expected.items()
        if value is not None and _as_list(value, actual.get(key)) != actual.get(key)
    ]
    if wrong:
        raise ValueError(
            f"checkpoint {source} does not fit the data config: {', '.join(wrong)}; "
            "pick a matching data config or checkpoint"
        )
