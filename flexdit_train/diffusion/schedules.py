"""Noise schedules (betas) and timestep respacing, all in float64 numpy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BETA_SCHEDULES = ("linear", "cosine")


def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    """Ho et al.'s 1e-4 -> 0.02 ramp, rescaled so any step count spans the same total noise as 1000 steps."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_beta_schedule(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's schedule: alpha_bar(s) = cos^2((s + offset) / (1 + offset) * pi/2), s in [0, 1]."""
    s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps  # (T+1,)
    alpha_bar = np.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2  # (T+1,)
    # Clipping keeps the last steps from having beta = 1 (alpha_bar reaches 0 at s = 1).
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)  # (T,)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """(T,) float64 betas of a named schedule."""
    if name == "linear":
        return linear_beta_schedule(num_timesteps)
    if name == "cosine":
        return cosine_beta_schedule(num_timesteps)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def _respacing_error(spec: object, reason: str = "") -> ValueError:
    detail = f" ({reason})" if reason else ""
    return ValueError(
        f"invalid timestep respacing {spec!r}{detail}; use '' (all steps), a step count like '250', "
        "comma-separated section counts like '10,10,5', or 'ddimN' like 'ddim50'"
    )


def space_timesteps(num_timesteps: int, spec: str | Sequence[int]) -> list[int]:
    """Original steps (ascending) to keep from a ``num_timesteps`` chain.

    ``"ddimN"`` keeps ``range(0, T, stride)`` for the integer stride giving exactly N steps. Otherwise
    the chain is cut into equal sections, one per count, and each section keeps its count of
    evenly spaced steps, first and last included. ``""`` keeps every step.
    """
    if isinstance(spec, str):
        if spec == "":
            return list(range(num_timesteps))
        if spec.startswith("ddim"):
            count = spec[len("ddim") :]
            if not count.isdigit():
                raise _respacing_error(spec)
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == int(count):
                    return list(range(0, num_timesteps, stride))
            raise _respacing_error(spec, f"no integer stride gives exactly {count} of {num_timesteps} steps")
        try:
            counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise _respacing_error(spec) from None
    else:
        counts = [int(c) for c in spec]
    if not counts or min(counts) < 1:
        raise _respacing_error(spec, "every section needs at least one step")

    base, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        # The first `extra` sections absorb the remainder so the sections tile the whole chain.
        size = base + (1 if i < extra else 0)
        if count > size:
            raise _respacing_error(spec, f"cannot take {count} steps from a section of {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return kept
