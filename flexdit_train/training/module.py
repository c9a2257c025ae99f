"""LightningModule that trains a DiT with a diffusion objective, keeping an fp32 EMA of its weights.

The network, the objective (``diffusion``) and the optimizer are injected, all built from Hydra configs;
this class owns only the loop logic: timestep sampling, loss logging (overall and per timestep
quartile), EMA updates, optimizer parameter groups, and the metadata that makes checkpoints loadable
by ``flexdit_train.models.from_pretrained``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from flexdit_train.diffusion import process_mismatch
from flexdit_train.flops import cost_model
from flexdit_train.models.arch import arch_of
from flexdit_train.sampling.schedule import patch_label
from flexdit_train.training.ema import make_ema, update_ema

CHECKPOINT_FORMAT_VERSION = 1
NO_DECAY_NAME_PARTS = ("pos_embed", "embedding_table", "patch_size_embed")


def rank_seed(seed: int, rank: int) -> int:
    """Distinct, reproducible per-rank seeds: identical ranks would draw identical timesteps and noise."""
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


def capture_rng_state() -> dict[str, Any]:
    """Generator states as tensors and plain containers, so checkpoints still load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """Trains ``model`` with ``diffusion.training_losses`` at the model's native patch size.

    Image, video and text DiTs train alike; :meth:`model_cond` turns a batch into the network's condition
    (class labels, or caption embeddings and their mask).
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion,
        optimizer: Callable[[Iterable], torch.optim.Optimizer],
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        weight_decay: float = 0.0,
        ema_decay: float = 0.9999,
        seed: int = 0,
        compile: bool = False,
    ):
        super().__init__()
        self.model = model
        self.arch = arch_of(model)
        # The process the weights are trained for rides with the network into exports and checkpoints, so
        # samplers rebuild it (noise schedule, prediction); a custom diffusion without one records None.
        model.diffusion_process = getattr(diffusion, "process", None)
        self.ema = make_ema(model)
        self.diffusion = diffusion
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.weight_decay = weight_decay
        self.ema_decay = ema_decay
        self.seed = seed
        self.compile = compile
        self.run_config: dict = {}  # the resolved Hydra config, stored in checkpoints as plain containers
        self.samples_seen = 0
        self.last_step_flops = 0.0  # hardware FLOPs of the last training step on this rank (fwd + bwd)
        self.wandb_run_id: str | None = None
        self._restored_rng: dict | None = None
        self.train_seconds = 0.0  # training wall-clock of earlier sessions of this run (resumes add up)
        self._session_start: float | None = None

    # ----------------------------------------------------------------------------- training
    def patch_size_for_step(self, step: int) -> Any:
        """Patch size of this optimisation step; the static objective always uses the native one."""
        return None

    def model_cond(self, batch: dict, patch_size: Any) -> dict[str, Any]:
        """Model kwargs of a batch: the arch's condition (labels or caption embeddings) and the patch size."""
        cond = self.arch.condition(batch)
        if patch_size is not None:
            cond["patch_size"] = patch_size
        return cond

    def sample_timesteps(self, n: int, device: torch.device, patch_size: Any) -> torch.Tensor:
        """(n,) training times of a batch at ``patch_size``, drawn by the process (DDPM: step indices uniform
        over the chain; flow: t in [0, 1] from its time distribution)."""
        return self.diffusion.sample_timesteps(n, device)

    def compute_losses(self, batch: dict, patch_size: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample losses (N,) and their timesteps (N,) for one batch."""
        x0 = batch["x"]
        t = self.sample_timesteps(x0.shape[0], x0.device, patch_size)  # (N,)
        terms = self.diffusion.training_losses(self.model, x0, t, cond=self.model_cond(batch, patch_size))
        return t, terms

    def batch_losses(self, batch: dict, patch_size: Any) -> dict[str, torch.Tensor]:
        """Weighted scalar losses over the whole batch added to the per-sample ones (none by default)."""
        return {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        patch_size = self.patch_size_for_step(self.global_step)
        t, terms = self.compute_losses(batch, patch_size)
        extra = self.batch_losses(batch, patch_size)
        loss = terms["loss"].mean() + sum(extra.values())
        batch_size = batch["x"].shape[0]
        for name, value in extra.items():
            self.log(f"train/{name}", value, sync_dist=True, batch_size=batch_size)
        self.samples_seen += batch_size * self.trainer.world_size
        self.last_step_flops = self.step_flops(batch["x"], patch_size)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        for name, value in terms.items():
            if name != "loss":
                self.log(f"train/{name}", value.mean(), sync_dist=True, batch_size=batch_size)
        self.log_loss_breakdown(terms["loss"].detach(), t, patch_size)
        return loss

    def step_flops(self, x: torch.Tensor, patch_size: Any) -> float:
        """Analytic fwd+bwd hardware FLOPs of one step on this rank (3x forward, DiT's convention).

        The arch's cost model (:func:`flexdit_train.flops.cost_model`) counts unmerged LoRA on weak
        patches only; hardware FLOPs are 2x MACs.
        """
        flex = getattr(self.model, "flex_config", None) or {}
        lora_rank = flex.get("lora_rank", 0) if flex.get("mode") == "lora" else 0
        latent = tuple(x.shape[2:])  # (H, W) or (F, H, W)
        cost = cost_model(self.model, latent, lora_rank)
        patch = self.model.native_patch_size if patch_size is None else patch_size
        return float(cost.training_flops(patch, x.shape[0]))

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            if isinstance(total, DTensor):  # FSDP2: reduce the per-shard norms
                total = total.full_tensor()
            self.log("train/grad_norm", total, rank_zero_only=True)

    def log_loss_breakdown(self, per_sample_loss: torch.Tensor, t: torch.Tensor, patch_size: Any) -> None:
        """Loss per timestep quartile (q0 = least noisy) and per patch size, from rank 0's batch.

        Rank-0-only on purpose: quartiles missing from one rank's batch would desynchronise an
        all-reduce.
        """
        quartile = self.diffusion.noise_quartile(t)  # (N,) 0..3
        for q in range(4):
            mask = quartile == q
            if mask.any():
                self.log(f"train/loss_q{q}", per_sample_loss[mask].mean(), rank_zero_only=True)
        p = self.model.native_patch_size if patch_size is None else patch_size
        self.log(f"train/loss_p{patch_label(p)}", per_sample_loss.mean(), rank_zero_only=True)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the step, before any on_train_batch_end hook: checkpoint callbacks save there, and a
        # checkpoint must hold the EMA of the weights it holds (else every resume would drop one update).
        update_ema(self.ema, self.model, self.ema_decay)

    # ----------------------------------------------------------------------- seeds and compile
    def trained_seconds(self) -> float:
        """Training wall-clock of the whole run so far: earlier sessions plus this one."""
        current = 0.0 if self._session_start is None else time.monotonic() - self._session_start
        return self.train_seconds + current

    def on_train_start(self) -> None:
        self._session_start = time.monotonic()
        # Ranks must differ (else they sample the same timesteps and noise); a resumed run continues
        # exactly where its checkpoint left this rank's generators.
        if self._restored_rng is not None:
            restore_rng_state(self._restored_rng)
            self._restored_rng = None
        else:
            seed = rank_seed(self.seed, self.global_rank)
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)

    def frozen_networks(self) -> list[nn.Module]:
        """Networks that follow the trained one but never train (EMA; a distillation teacher)."""
        return [self.ema]

    def configure_model(self) -> None:
        # FSDP2 under ModelParallelStrategy: shard each block, then the root, of every network. The EMA
        # is sharded exactly like the model, so its update is elementwise on matching local shards.
        if self.device_mesh is not None and not getattr(self, "_sharded", False):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for net in [self.model, *self.frozen_networks()]:
                for block in net.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(net, mesh=mesh)
            self._sharded = True
        # One compiled graph per patch size: each size is a new token count, i.e. a new shape.
        if self.compile and not getattr(self, "_compiled", False):
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
            self.model.compile()
            self._compiled = True

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
            "arch": self.arch.name,
            "model_config": dict(self.model.config),
            "flex_config": getattr(self.model, "flex_config", None),
            "diffusion": self.model.diffusion_process,
            "config": self.run_config,
            "samples_seen": self.samples_seen,
            "train_seconds": round(self.trained_seconds(), 3),
            "wandb_run_id": self.wandb_run_id,
            "rng_states": self.gather_rng_states(),
        }

    def gather_rng_states(self) -> list[dict[str, Any]]:
        """Every rank's generator states (a collective: on_save_checkpoint runs on all ranks)."""
        state = capture_rng_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            return states
        return [state]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("flexdit", {})
        # Resuming under another process would silently retrain the weights for a different target.
        trained, process = meta.get("diffusion"), self.model.diffusion_process  # None: a custom diffusion
        mismatch = process_mismatch(trained, process, "the resumed checkpoint") if trained and process else None
        if mismatch and not (self.run_config or {}).get("allow_process_change", False):
            raise ValueError(mismatch + " (or start a new run: resume=never or another task_name)")
        self.samples_seen = int(meta.get("samples_seen", 0))
        self.train_seconds = float(meta.get("train_seconds", 0.0))
        self.wandb_run_id = meta.get("wandb_run_id")
        states = meta.get("rng_states") or []
        rank = self.global_rank if self._trainer is not None else 0
        # Same world size: each rank continues its own stream; otherwise fresh per-rank seeds (logged).
        self._restored_rng = states[rank] if len(states) == self.trainer.world_size else None

    def train(self, mode: bool = True):
        super().train(mode)
        self.ema.eval()  # the EMA copy never trains (label dropout stays off)
        return self
