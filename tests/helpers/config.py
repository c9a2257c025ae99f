"""Composing the training config as the train app does, for tests that call ``flexdit_train.train.run``."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import flexdit_train


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """conf/train.yaml with ``overrides``, its Hydra run directory set to ``output_dir``."""
    with initialize_config_dir(version_base="1.3", config_dir=flexdit_train.CONF_DIR):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg
