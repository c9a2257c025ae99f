"""Training entry point: ``python -m flexdit_train [+experiment=NAME] [overrides]``.

Hydra composes ``conf/train.yaml``; every object (data, model, objective, trainer, callbacks, loggers)
is built from its ``_target_``. This file only wires them together and reports where the run went.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from flexdit_train import CONF_DIR
from flexdit_train.diffusion import process_mismatch
from flexdit_train.runtime.errors import report_errors
from flexdit_train.runtime.loggers import finish_wandb
from flexdit_train.runtime.runs import resolve_ckpt_path
from flexdit_train.sampling.schedule import as_patch
from flexdit_train.training.console import silence_expected_warnings

log = logging.getLogger(__name__)


def build(node: DictConfig, **kwargs):
    """``instantiate``, re-raising a ValueError of the target itself unwrapped: Hydra's wrapper would turn
    the one-line errors of models, objectives and data modules into three lines."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise


def instantiate_group(group: DictConfig | None) -> list:
    """Build every non-null ``_target_`` entry of a named dict group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def apply_flex(model, flex_cfg: DictConfig | None, source: str | None):
    """Flexify a static model as configured; a checkpoint that is already flexible must agree with the config."""
    if not flex_cfg:
        return model
    existing = getattr(model, "flex_config", None)
    if existing is None:
        return build(flex_cfg)(model)
    wanted = sorted(as_patch(p) for p in flex_cfg.patch_sizes)
    have = sorted(as_patch(p) for p in existing["patch_sizes"])
    if wanted != have or flex_cfg.mode != existing["mode"]:
        raise ValueError(
            f"checkpoint {source} is already flexible (mode {existing['mode']}, patch sizes {have}) but the config "
            f"asks for mode {flex_cfg.mode}, patch sizes {wanted}; set flex.patch_sizes/flex.mode to match, or start "
            "from a static checkpoint"
        )
    return model


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The network (optionally flexified) inside its objective's LightningModule."""
    pretrained = cfg.model.get("pretrained")
    network = build(cfg.model)
    trained_process = getattr(network, "diffusion_process", None)
    model = apply_flex(network, cfg.get("flex"), pretrained)
    module = build(cfg.objective, model=model)
    process = getattr(module.diffusion, "process", None)  # None: a custom diffusion, nothing to compare
    mismatch = process_mismatch(trained_process, process, f"checkpoint {pretrained}") if pretrained and process else None
    if mismatch and not cfg.get("allow_process_change", False):
        raise ValueError(mismatch + " (or allow_process_change=true to convert on purpose)")
    # Set afterwards: passed to instantiate, its `_target_` entries would be instantiated too.
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    return module


def run(cfg: DictConfig) -> dict:
    """Train as configured; returns the final logged metrics (for sweepers) and the run directory."""
    silence_expected_warnings()
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.get("resume", "auto"), run_dir / "checkpoints")
    datamodule = build(cfg.data)
    module = build_module(cfg)
    loggers = instantiate_group(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(module.run_config)
        if isinstance(logger, WandbLogger):
            module.wandb_run_id = logger.version
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=loggers)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        final_ckpt = run_dir / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(final_ckpt, weights_only=False)  # full state: final.ckpt resumes too
    finally:
        finish_wandb()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        print(f"final checkpoint: {final_ckpt}")
        print(f"run directory: {run_dir}")
    return {"run_dir": str(run_dir), "metrics": metrics}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    result = run(cfg)
    metric = cfg.get("optimized_metric")
    return result["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    main()
