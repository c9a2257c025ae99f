"""Lightning training pieces: objectives as LightningModules, EMA and callbacks."""

from flexdit_train.training.module import DiffusionModule, parameter_groups

__all__ = ["DiffusionModule", "parameter_groups"]
