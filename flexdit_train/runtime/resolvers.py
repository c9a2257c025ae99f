"""OmegaConf resolvers used by the configs; registered when the package is imported."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf


def default_run_name() -> str:
    """``slurm-<array job>_<task>`` or ``slurm-<job id>`` under SLURM, else a timestamp.

    A requeued SLURM job keeps its job id, so a run named from it lands in the same directory and finds
    its own checkpoints; every task of a multi-node job also agrees on it, unlike a timestamp.
    """
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


# Files shipped inside the package (the MNIST teacher and its card), found wherever it is installed.
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


def asset_path(name: str) -> str:
    """Absolute path of a shipped asset, e.g. ``${flexdit.asset:mnist_dit_teacher.safetensors}``."""
    return str(ASSETS_DIR / name)


def register_resolvers() -> None:
    """``${flexdit.run_name:}``, ``${flexdit.cwd:}`` and ``${flexdit.asset:NAME}``; safe to call more than once."""
    if not OmegaConf.has_resolver("flexdit.run_name"):
        OmegaConf.register_new_resolver("flexdit.run_name", default_run_name, use_cache=True)
    if not OmegaConf.has_resolver("flexdit.cwd"):
        # The launch directory; unlike ${hydra:runtime.cwd} it resolves before Hydra has set its config,
        # which a multirun needs for its sweep dir and the submitit launcher's folder.
        OmegaConf.register_new_resolver("flexdit.cwd", os.getcwd, use_cache=True)
    if not OmegaConf.has_resolver("flexdit.asset"):
        OmegaConf.register_new_resolver("flexdit.asset", asset_path, use_cache=True)
