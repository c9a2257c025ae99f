"""EDT's token relation-enhanced masking training (arXiv 2410.23788) as an objective.

Every step computes the normal diffusion loss and, on the same noisy input (the same x0, t and noise), a
second one whose forward zeroes random tokens inside each down-sampling module of the EDT (after its
modulated norm, before its reduction linear); the step's loss is their sum. The share of zeroed tokens is
drawn per step and module from ``token_mask_ratios`` (EDT: U(0.4, 0.5) in the first, U(0.1, 0.2) in the
second module). Reconstructing from a partly masked down-sampled map makes the network relate tokens
instead of copying them through the skips. ``position_mask`` adds EDT-XL's extra mask to the same forward:
before block ``block`` (1-indexed) of the first stage a share drawn from ``ratio`` (EDT-XL: block 5,
U(0.15, 0.25)) of the tokens is replaced by the position embedding.

With ``token_mask_ratios`` None the module is :class:`~flexdit_train.training.DiffusionModule` exactly
(same random draws, same loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flexdit_train.training.module import DiffusionModule


def check_mask_ranges(ranges: Sequence[Sequence[float]] | None, model: torch.nn.Module) -> list[tuple[float, float]]:
    """[(lo, hi)] per down-sampling module of ``model``; one-line errors for what cannot apply."""
    if ranges is None:
        return []
    down_blocks = getattr(model, "down_blocks", None)
    if down_blocks is None:
        raise ValueError(
            f"token_mask_ratios masks tokens inside EDT's down-sampling modules; {type(model).__name__} has none: "
            "set objective.token_mask_ratios=null or train an EDT (model=edt_mnist)"
        )
    pairs = [tuple(float(v) for v in pair) for pair in ranges]
    if len(pairs) != len(down_blocks) or any(len(p) != 2 or not 0.0 <= p[0] <= p[1] < 1.0 for p in pairs):
        raise ValueError(
            f"token_mask_ratios={[list(p) for p in pairs]} needs one [lo, hi] range with 0 <= lo <= hi < 1 per "
            f"down-sampling module ({len(down_blocks)}), e.g. [[0.4, 0.5], [0.1, 0.2]]"
        )
    return pairs


def check_position_mask(position_mask: Mapping[str, Any] | None, model: torch.nn.Module,
                        masking: bool) -> tuple[int, tuple[float, float]] | None:
    """(block, (lo, hi)) of EDT-XL's position-embedding mask; one-line errors for what cannot apply."""
    if position_mask is None:
        return None
    if not masking:
        raise ValueError(
            "objective.position_mask belongs to the masked forward, which is off: set objective.token_mask_ratios "
            "(e.g. [[0.4, 0.5], [0.1, 0.2]]) or position_mask=null"
        )
    ratio = position_mask.get("ratio")
    if set(position_mask) != {"block", "ratio"} or not isinstance(ratio, Sequence) or len(ratio) != 2:
        raise ValueError(
            f"objective.position_mask={dict(position_mask)} needs the keys block and ratio (a [lo, hi] range), e.g. "
            "{block: 5, ratio: [0.15, 0.25]}"
        )
    block, (lo, hi) = position_mask["block"], (float(v) for v in ratio)
    if not lo <= hi:
        raise ValueError(f"objective.position_mask.ratio=[{lo}, {hi}] needs lo <= hi, e.g. [0.15, 0.25]")
    model.check_position_mask((block, lo))
    model.check_position_mask((block, hi))
    return int(block), (lo, hi)


def draw(lo: float, hi: float) -> float:
    """Uniform in [lo, hi], from torch's global stream (seeded per rank by the trainer)."""
    return lo + (hi - lo) * float(torch.rand(()))


class EDTMaskingModule(DiffusionModule):
    """:class:`DiffusionModule` plus EDT's masked second forward; its loss is added to the step's loss."""

    def __init__(self, *args: Any, token_mask_ratios: Sequence[Sequence[float]] | None = None,
                 position_mask: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.token_mask_ranges = check_mask_ranges(token_mask_ratios, self.model)
        self.position_mask = check_position_mask(position_mask, self.model, bool(self.token_mask_ranges))

    def draw_mask_ratios(self) -> list[float]:
        """This step's share of zeroed tokens per down-sampling module, uniform in its range."""
        return [draw(lo, hi) for lo, hi in self.token_mask_ranges]

    def masked_cond(self) -> dict[str, Any]:
        """This step's masks for the second forward: the down-sampling ratios and, for EDT-XL, the position mask."""
        cond: dict[str, Any] = {"token_mask_ratios": self.draw_mask_ratios()}
        if self.position_mask is not None:
            block, (lo, hi) = self.position_mask
            cond["position_mask"] = (block, draw(lo, hi))
        return cond

    def compute_losses(self, batch: dict, patch_size: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.token_mask_ranges:
            return super().compute_losses(batch, patch_size)
        x0 = batch["x"]
        t = self.sample_timesteps(x0.shape[0], x0.device, patch_size)  # (N,)
        noise = torch.randn_like(x0)  # drawn where training_losses would draw it: the plain loss is unchanged
        cond = self.model_cond(batch, patch_size)
        terms = self.diffusion.training_losses(self.model, x0, t, cond=cond, noise=noise)
        masks = self.masked_cond()  # after the plain forward, for the same reason
        masked = self.diffusion.training_losses(self.model, x0, t, cond={**cond, **masks}, noise=noise)
        return t, {**terms, "loss": terms["loss"] + masked["loss"], "masked_loss": masked["loss"]}

    def step_flops(self, x: torch.Tensor, patch_size: Any) -> float:
        """Two forwards (and their backwards) per step while masking."""
        return (2.0 if self.token_mask_ranges else 1.0) * super().step_flops(x, patch_size)
