"""flexdit_train: train, flexify and evaluate flexible-patch Diffusion Transformers (FlexiDiT)."""

from pathlib import Path

from flexdit_train.runtime.resolvers import register_resolvers

# The Hydra config tree (top-level conf/, reached through the package's conf link or its installed copy).
# Absolute, because under `python -m` Hydra would read a relative config_path as a Python module.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")

register_resolvers()
