"""Model zoo: the DiT architecture, its official presets, checkpoint loading/export, flexible variants."""

from flexdit_train.models.dit import DiT, DiT_models, create_model
from flexdit_train.models.factory import build_model
from flexdit_train.models.flex import FlexDiT, flexify
from flexdit_train.models.loading import (
    CheckpointError,
    export_official,
    export_safetensors,
    from_pretrained,
    infer_config,
)
from flexdit_train.models.text_dit import (
    FlexTextDiT,
    TextDiT,
    TextDiT_models,
    create_text_model,
    flexify_text,
)
from flexdit_train.models.video_dit import (
    FlexVideoDiT,
    VideoDiT,
    VideoDiT_models,
    create_video_model,
    flexify_video,
)

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
    "flexify_text",
    "flexify_video",
    "from_pretrained",
    "infer_config",
]
