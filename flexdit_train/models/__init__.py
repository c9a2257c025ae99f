"""Model zoo: the DiT architecture, its official presets, checkpoint loading/export, flexible variants."""

from flexdit_train.models.dit import DiT, DiT_models, create_model
from flexdit_train.models.factory import build_model
from flexdit_train.models.loading import (
    CheckpointError,
    export_official,
    export_safetensors,
    from_pretrained,
    infer_config,
)

__all__ = [
    "CheckpointError",
    "DiT",
    "DiT_models",
    "build_model",
    "create_model",
    "export_official",
    "export_safetensors",
    "from_pretrained",
    "infer_config",
]
