"""The eval card: one JSON per evaluation with every knob that changes the numbers, and the numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flexdit_train.runtime.atomic import atomic_write

# Everything a reader needs to reproduce or compare a number; write_card refuses a card without them.
CARD_KEYS = (
    "checkpoint", "preset", "budget", "sampling_steps", "num_steps", "sampler", "cfg_scale", "guidance",
    "weak_guidance_scale", "guide_all_channels", "vae", "latent_scale_factor", "schedule", "schedule_summary",
    "schedule_order", "compute_fraction", "gmacs_per_image", "nfe", "num_samples", "seed", "seeds", "precision",
    "metric_backend", "reference", "metrics", "skipped",
)


def write_card(path: str | os.PathLike, card: dict) -> Path:
    """Write ``card`` as sorted JSON (atomically); a missing key is a bug, so it raises."""
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise KeyError(f"eval card lacks {missing}; every card carries {list(CARD_KEYS)}")
    text = json.dumps(card, indent=2, sort_keys=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
