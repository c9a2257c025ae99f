"""Model families ("archs"): which classes, conditioning and patch check a network has.

Checkpoints store the arch name next to the model config, so loading rebuilds the right class; the
trainer and the sampler ask :func:`arch_of` how to condition a network and which patch check applies.
Classes are named as "module:attribute" and imported when used, so the registry imports no model code
(no import cycles with the modules that use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from torch import nn


def _resolve(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(import_module(module), name)


@dataclass(frozen=True)
class Arch:
    """One family: static and flexible class, condition kind ("class" or "text"), patch check, dropout key."""

    name: str
    static_ref: str
    flexible_ref: str
    conditioning: str
    check_divides_ref: str  # (input_size, patch) -> None: one-line error when the patch does not tile it
    dropout_key: str  # config key of the condition dropout rate (the CFG null condition in training)
    guides_all_channels: bool  # CFG default: DiT guides only its first 3 latent channels (its published FIDs)

    def guide_all_channels(self, flag: bool | None) -> bool:
        """An explicit ``guide_all_channels`` setting, or this arch's convention for None."""
        return self.guides_all_channels if flag is None else bool(flag)

    @property
    def static(self) -> type[nn.Module]:
        return _resolve(self.static_ref)

    @property
    def flexible(self) -> type[nn.Module]:
        return _resolve(self.flexible_ref)

    def check_divides(self, input_size: tuple[int, ...], patch: Any) -> None:
        _resolve(self.check_divides_ref)(input_size, patch)


_DIT, _VIDEO, _TEXT = "flexdit_train.models.dit", "flexdit_train.models.video_dit", "flexdit_train.models.text_dit"
ARCHS: dict[str, Arch] = {
    "dit": Arch("dit", f"{_DIT}:DiT", "flexdit_train.models.flex:FlexDiT", "class", f"{_DIT}:check_patch_divides",
                "class_dropout_prob", False),
    "video_dit": Arch("video_dit", f"{_VIDEO}:VideoDiT", f"{_VIDEO}:FlexVideoDiT", "class",
                      f"{_VIDEO}:check_video_patch_divides", "class_dropout_prob", True),
    "text_dit": Arch("text_dit", f"{_TEXT}:TextDiT", f"{_TEXT}:FlexTextDiT", "text", f"{_DIT}:check_patch_divides",
                     "caption_dropout_prob", True),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown model arch {name!r}; use one of {list(ARCHS)}")
    return ARCHS[name]


def arch_of(model: nn.Module) -> Arch:
    """The family of a static or flexible network (flexible video/text classes subclass the static ones)."""
    for arch in ARCHS.values():
        if isinstance(model, (arch.static, arch.flexible)):
            return arch
    raise TypeError(f"{type(model).__name__} is not a model of a known arch ({', '.join(ARCHS)})")
