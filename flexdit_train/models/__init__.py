"""Model zoo: the DiT family (image, video and text DiTs), its presets, checkpoint loading/export and
:func:`flexify`, which makes any of them run at several patch sizes."""

from flexdit_train.models.dit import DiT, DiT_models, create_model
from flexdit_train.models.factory import build_model
from flexdit_train.models.flex import FlexDiT, FlexTextDiT, FlexVideoDiT, flexify
from flexdit_train.models.loading import (
    CheckpointError,
    export_official,
    export_safetensors,
    from_pretrained,
    infer_config,
)
from flexdit_train.models.text_dit import TextDiT, TextDiT_models, create_text_model
from flexdit_train.models.video_dit import VideoDiT, VideoDiT_models, create_video_model

# The per-arch flexify functions this package had; flexify now serves every arch.
_REPLACED = {"flexify_video": "flexify", "flexify_text": "flexify"}


def __getattr__(name: str):
    if name in _REPLACED:
        raise AttributeError(
            f"flexdit_train.models.{name} is gone: flexdit_train.models.{_REPLACED[name]} flexifies every arch "
            "(image, video and text DiTs) with its arch's defaults"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "DiT",
    "DiT_models",
    "FlexDiT",
    "FlexTextDiT",
    "FlexVideoDiT",
    "TextDiT",
    "TextDiT_models",
    "VideoDiT",
    "VideoDiT_models",
    "build_model",
    "create_model",
    "create_text_model",
    "create_video_model",
    "export_official",
    "export_safetensors",
    "flexify",
    "from_pretrained",
    "infer_config",
]
