"""Model zoo: the DiT architecture, its official presets, and (in sibling modules) flexible variants."""

from flexdit_train.models.dit import DiT, DiT_models, create_model
from flexdit_train.models.factory import build_model

__all__ = ["DiT", "DiT_models", "build_model", "create_model"]
