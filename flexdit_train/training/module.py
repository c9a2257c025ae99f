"""LightningModule that trains a DiT with a diffusion objective, keeping an fp32 EMA of its weights.

The network, the objective (``diffusion``) and the optimizer are injected, all built from Hydra configs;
this class owns only the loop logic: timestep sampling, loss logging (overall and per timestep
quartile), EMA updates, optimizer parameter groups, and the metadata that makes checkpoints loadable
by ``flexdit_train.models.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import nn

from flexdit_train.training.ema import make_ema, update_ema

CHECKPOINT_FORMAT_VERSION = 1
NO_DECAY_NAME_PARTS = ("pos_embed", "embedding_table", "patch_size_embed")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norm weights (1-D tensors) and embedding tables."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(part in name for part in NO_DECAY_NAME_PARTS):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class DiffusionModule(L.LightningModule):
    """Trains ``model`` with ``diffusion.training_losses`` at the model's native patch size."""

    def __init__(
        self,
        model: nn.Module,
        diffusion,
        optimizer: Callable[[Iterable], torch.optim.Optimizer],
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        weight_decay: float = 0.0,
        ema_decay: float = 0.9999,
        run_config: dict | None = None,
    ):
        super().__init__()
        self.model = model
        self.ema = make_ema(model)
        self.diffusion = diffusion
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.weight_decay = weight_decay
        self.ema_decay = ema_decay
        self.run_config = run_config or {}
        self._last_ema_step = -1

    # ----------------------------------------------------------------------------- training
    def patch_size_for_step(self, step: int) -> int | None:
        """Patch size of this optimisation step; the static objective always uses the native one."""
        return None

    def model_cond(self, batch: dict, patch_size: int | None) -> dict[str, Any]:
        cond: dict[str, Any] = {"y": batch["y"]}
        if patch_size is not None:
            cond["patch_size"] = patch_size
        return cond

    def compute_losses(self, batch: dict, patch_size: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample losses (N,) and their timesteps (N,) for one batch."""
        x0 = batch["x"]
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device)  # (N,)
        terms = self.diffusion.training_losses(self.model, x0, t, cond=self.model_cond(batch, patch_size))
        return t, terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        patch_size = self.patch_size_for_step(self.global_step)
        t, terms = self.compute_losses(batch, patch_size)
        loss = terms["loss"].mean()
        batch_size = batch["x"].shape[0]
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        for name, value in terms.items():
            if name != "loss":
                self.log(f"train/{name}", value.mean(), sync_dist=True, batch_size=batch_size)
        self.log_loss_breakdown(terms["loss"].detach(), t, patch_size)
        return loss

    def log_loss_breakdown(self, per_sample_loss: torch.Tensor, t: torch.Tensor, patch_size: int | None) -> None:
        """Loss per timestep quartile (q0 = least noisy) and per patch size, from rank 0's batch.

        Rank-0-only on purpose: quartiles missing from one rank's batch would desynchronise an
        all-reduce.
        """
        quartile = (t * 4 // self.diffusion.num_timesteps).clamp(max=3)
        for q in range(4):
            mask = quartile == q
            if mask.any():
                self.log(f"train/loss_q{q}", per_sample_loss[mask].mean(), rank_zero_only=True)
        p = patch_size or self.model.native_patch_size
        self.log(f"train/loss_p{p}", per_sample_loss.mean(), rank_zero_only=True)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Once per optimizer step (global_step advances only when the optimizer stepped).
        if self.global_step != self._last_ema_step:
            update_ema(self.ema, self.model, self.ema_decay)
            self._last_ema_step = self.global_step

    # ---------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(parameter_groups(self.model, self.weight_decay))
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain containers only, so the file loads with torch.load(weights_only=True).
        checkpoint["flexdit"] = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "model_config": dict(self.model.config),
            "flex_config": getattr(self.model, "flex_config", None),
            "config": self.run_config,
        }

    def train(self, mode: bool = True):
        super().train(mode)
        self.ema.eval()  # the EMA copy never trains (label dropout stays off)
        return self
