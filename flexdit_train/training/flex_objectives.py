"""FlexiDiT training objectives: a shared fine-tune over patch sizes, and weak-from-native distillation.

Both draw the patch size of every optimisation step from an RNG keyed by (seed, global step), so all
DDP ranks agree without communication: ranks that used different patch sizes in one step would touch
different parameter sets and DDP's gradient reduction would hang or fail. Patch sizes are ints or, for
video DiTs, (pt, ph, pw) tuples (weights keys may be labels such as "2x2x2").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flexdit_train.diffusion import process_kind, process_mismatch
from flexdit_train.models.dit import check_patch_divides
from flexdit_train.models.loading import from_pretrained
from flexdit_train.sampling.schedule import Patch, as_patch, patch_volume
from flexdit_train.training.ema import make_ema
from flexdit_train.training.mmd import BootstrappedMMD
from flexdit_train.training.module import DiffusionModule


class PatchSizeSampler:
    """Draws one patch size per step from a weighted list; a pure function of (seed, step)."""

    def __init__(self, weights: Mapping[Patch, float], seed: int):
        if not weights:
            raise ValueError("patch-size distribution is empty; give at least one size with a positive weight")
        self.sizes = [as_patch(p) for p in weights]
        probs = np.asarray([float(w) for w in weights.values()], dtype=np.float64)
        if (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"patch-size weights must be >= 0 and not all zero, got {dict(weights)}")
        self.probs = probs / probs.sum()
        self.seed = seed

    def __call__(self, step: int) -> Patch:
        rng = np.random.default_rng([self.seed, int(step)])
        return self.sizes[int(rng.choice(len(self.sizes), p=self.probs))]


def size_weights(weights: Mapping[Any, float] | None, default_sizes) -> dict[Patch, float]:
    """Explicit ``{patch: weight}`` or, when None, equal weights over ``default_sizes``."""
    if weights is None:
        return {as_patch(p): 1.0 for p in default_sizes}
    return {as_patch(p): float(w) for p, w in weights.items()}


def check_sizes_available(model: nn.Module, sizes, what: str) -> None:
    """One-line errors for a size the model lacks or one that does not tile its input (e.g. a temporal
    patch 2 on an odd frame count), before the first step rather than whenever the size is drawn."""
    available = tuple(model.patch_sizes)
    missing = [p for p in sizes if p not in available]
    if missing:
        raise ValueError(
            f"{what} uses patch sizes {missing} but the model has {list(available)}; "
            "flexify with those sizes (flex.patch_sizes) or change the distribution"
        )
    for p in sizes:
        check_patch_divides(tuple(model.input_size), p)


class TimestepRanges:
    """The noise levels each patch size trains on: ``{patch: [lo, hi]}`` as fractions of the process (0 = clean
    data, 1 = pure noise). The process draws the times (:meth:`sample_timesteps` with ``within``): DDPM step
    indices uniform in [lo·T, hi·T), flow times from its distribution mapped onto [lo, hi]. Sizes not listed
    train on the whole range. A weak size that sampling schedules only use on the noisy start need not spend
    its training on low-noise steps, where its coarse tokens cannot match the native prediction anyway."""

    def __init__(self, ranges: Mapping[Any, Any] | None):
        self.ranges: dict[Patch, tuple[float, float]] = {}
        for patch, bounds in (ranges or {}).items():
            lo, hi = (float(b) for b in bounds)
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(
                    f"timestep_ranges[{patch}] = {list(bounds)} must satisfy 0 <= lo < hi <= 1 "
                    "(fractions of the chain: 0 = clean, 1 = pure noise)"
                )
            self.ranges[as_patch(patch)] = (lo, hi)

    def sample(self, diffusion, n: int, device, patch: Patch | None) -> torch.Tensor:
        """(n,) training times for a batch at ``patch``."""
        bounds = self.ranges.get(patch)
        if bounds is None:  # the process's own draw: a custom process need not know ``within``
            return diffusion.sample_timesteps(n, device)
        return diffusion.sample_timesteps(n, device, within=bounds)


class FlexSharedModule(DiffusionModule):
    """Shared-parameter flexification: the DiT diffusion loss at a patch size drawn every step.

    Knobs against the weak steps' interference with the shared (native) weights: ``patch_size_loss_weights``
    scales the loss (hence the gradient) of steps at a size, ``timestep_ranges`` restricts the noise levels a
    size trains on, and ``mmd`` adds the paper's bootstrapped distribution-matching loss
    (:class:`~flexdit_train.training.mmd.BootstrappedMMD`) on chains that run weak steps first.
    """

    def __init__(
        self,
        *args,
        patch_size_weights: Mapping[int, float] | None = None,
        patch_size_loss_weights: Mapping[int, float] | None = None,
        timestep_ranges: Mapping[int, Any] | None = None,
        mmd: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        weights = size_weights(patch_size_weights, self.model.patch_sizes)
        check_sizes_available(self.model, weights, "the shared objective")
        self.patch_size_sampler = PatchSizeSampler(weights, self.seed)
        self.loss_weights = {as_patch(p): float(w) for p, w in (patch_size_loss_weights or {}).items()}
        check_sizes_available(self.model, self.loss_weights, "patch_size_loss_weights")
        self.timestep_ranges = TimestepRanges(timestep_ranges)
        check_sizes_available(self.model, self.timestep_ranges.ranges, "timestep_ranges")
        self.mmd = BootstrappedMMD(**dict(mmd or {}))
        if self.mmd.weight > 0 and process_kind(getattr(self.diffusion, "process", None)) != "ddpm":
            raise ValueError("the MMD loss walks DDIM chains of the Gaussian diffusion; with process=flow set "
                             "objective.mmd.weight=0")

    def patch_size_for_step(self, step: int) -> Patch:
        return self.patch_size_sampler(step)

    def sample_timesteps(self, n: int, device, patch_size) -> torch.Tensor:
        return self.timestep_ranges.sample(self.diffusion, n, device, patch_size)

    def compute_losses(self, batch: dict, patch_size: Patch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t, terms = super().compute_losses(batch, patch_size)
        weight = self.loss_weights.get(patch_size, 1.0)
        if weight != 1.0:
            terms = {**terms, "loss": terms["loss"] * weight}
        return t, terms

    def batch_losses(self, batch: dict, patch_size: Patch) -> dict[str, torch.Tensor]:
        if not self.mmd.active(self.global_step) or batch["x"].shape[0] < 4:
            return {}
        native = self.model.native_patch_size
        weak = max(self.model.patch_sizes, key=patch_volume)
        rng = np.random.default_rng([self.seed, int(self.global_step), 1])
        loss, drawn = self.mmd.loss(self.model, batch["x"], self.model_cond(batch, None),
                                    self.diffusion.process, self.model.learn_sigma, native, weak, rng)
        for name, value in drawn.items():
            self.log(f"train/{name}", value, rank_zero_only=True)
        return {"mmd_loss": loss}


class DistillModule(DiffusionModule):
    """Distil the native-patch prediction into the weak patch sizes (mode A or B of FlexiDiT).

    The teacher is the same network at its native size (exact under LoRA, whose native path is the
    frozen pretrained model), a frozen snapshot of the starting network (shared mode, where the native
    path moves during training), or a separate checkpoint. The loss is the MSE between teacher and
    student over all output channels (eps and variance), optionally plus the data diffusion loss. Both
    see the same condition (:meth:`model_cond`: labels or caption embeddings), dropped to the null
    class / null caption with the model's dropout rate identically for both (``force_drop_ids``), so the
    weak model also learns the unconditional prediction used by guidance.
    """

    def __init__(
        self,
        *args,
        patch_size_weights: Mapping[int, float] | None = None,
        teacher: str | None = "self",
        data_loss_weight: float = 0.0,
        timestep_ranges: Mapping[int, Any] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        weak_sizes = [p for p in self.model.patch_sizes if p != self.model.native_patch_size]
        weights = size_weights(patch_size_weights, weak_sizes)
        check_sizes_available(self.model, weights, "the distillation objective")
        native = self.model.native_patch_size
        if native in weights:
            raise ValueError(f"distillation trains weak sizes only; remove the native size {native} from the weights")
        self.patch_size_sampler = PatchSizeSampler(weights, self.seed)
        self.data_loss_weight = data_loss_weight
        self.label_dropout = float(self.model.config[self.arch.dropout_key])
        self.teacher_source = teacher
        self.teacher = self.build_teacher(teacher)
        self.timestep_ranges = TimestepRanges(timestep_ranges)
        check_sizes_available(self.model, self.timestep_ranges.ranges, "timestep_ranges")

    def build_teacher(self, teacher: str | None) -> nn.Module | None:
        """None means "the student's own native path"; otherwise a frozen fp32 network kept in eval mode."""
        if teacher in (None, "self"):
            if getattr(self.model, "flex_config", {}).get("mode") != "lora":
                raise ValueError(
                    "teacher='self' needs mode='lora' (the native path must stay frozen); "
                    "use teacher='snapshot' or a checkpoint path for shared-mode distillation"
                )
            return None
        if teacher == "snapshot":
            return make_ema(self.model)
        network = from_pretrained(teacher)
        # The student learns the teacher's outputs as its own: both must predict the same quantity.
        mismatch = process_mismatch(network.diffusion_process, getattr(self.diffusion, "process", None),
                                    f"teacher {teacher}",
                                    "pick a teacher of the same process or set objective.diffusion to match it")
        if mismatch:
            raise ValueError(mismatch)
        return make_ema(network)

    def patch_size_for_step(self, step: int) -> Patch:
        return self.patch_size_sampler(step)

    def sample_timesteps(self, n: int, device, patch_size) -> torch.Tensor:
        return self.timestep_ranges.sample(self.diffusion, n, device, patch_size)

    def frozen_networks(self) -> list[nn.Module]:
        return [self.ema] if self.teacher is None else [self.ema, self.teacher]

    def compute_losses(self, batch: dict, patch_size: Patch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0 = batch["x"]  # (N, C, H, W) or video (N, C, F, H, W)
        n = x0.shape[0]
        t = self.sample_timesteps(n, x0.device, patch_size)  # (N,) DDPM step indices or flow times
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise=noise)  # like x0
        t_model = self.diffusion.network_time(t)  # (N,) the timesteps the network was trained on
        drop = (torch.rand(n, device=x0.device) < self.label_dropout).long()  # (N,) 1 = null condition
        cond = {**self.model_cond(batch, None), "force_drop_ids": drop}
        teacher = self.model if self.teacher is None else self.teacher
        with torch.no_grad():
            target = teacher(x_t, t_model, **cond, patch_size=self.model.native_patch_size)  # (N, C_out, ...)
        student = self.model(x_t, t_model, **cond, patch_size=patch_size)  # (N, C_out, ...)
        distill = F.mse_loss(student, target, reduction="none").flatten(1).mean(1)  # (N,)
        terms = {"distill": distill, "loss": distill}
        if self.data_loss_weight > 0:
            data = self.diffusion.training_losses(
                self.model, x0, t, cond={**cond, "patch_size": patch_size}, noise=noise
            )
            terms["data"] = data["loss"]
            terms["loss"] = distill + self.data_loss_weight * data["loss"]
        return t, terms

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self
