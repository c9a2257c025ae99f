"""Gaussian diffusion (DiT's DDPM with learned variance): schedules, hybrid loss, DDPM/DDIM samplers.

The objective interface the trainer relies on is ``sample_timesteps``, ``training_losses``, ``sample``,
``num_timesteps`` and ``timestep_map``; networks are plain callables ``model(x, t, **cond)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexdit_train.diffusion.gaussian_diffusion import (
    SAMPLE_METHODS,
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
)
from flexdit_train.diffusion.respace import SpacedDiffusion
from flexdit_train.diffusion.schedules import BETA_SCHEDULES, get_named_beta_schedule, space_timesteps

# What the network's mean channels predict, by config name.
PREDICTIONS = {"epsilon": ModelMeanType.EPSILON, "x0": ModelMeanType.START_X, "v": ModelMeanType.VELOCITY}


def create_diffusion(
    timestep_respacing: str = "",
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
    prediction: str = "epsilon",
) -> SpacedDiffusion:
    """Build a diffusion with DiT's defaults.

    ``timestep_respacing``: "" (all steps, for training), "250", "10,10,5" or "ddimN" (which also
    makes DDIM the default sampler). ``rescale_learned_sigmas`` weights the bound by T / 1000.
    ``prediction``: what the network's first C channels predict, "epsilon" (DiT), "x0" (the same as
    ``predict_xstart=True``) or "v" (velocity; well suited to small pixel-space models).
    """
    if predict_xstart:
        if prediction not in ("epsilon", "x0"):
            raise ValueError(f"predict_xstart=True contradicts prediction={prediction!r}; set one of them")
        prediction = "x0"
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; use one of {', '.join(PREDICTIONS)}")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    diffusion = SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas,
        model_mean_type=PREDICTIONS[prediction],
        model_var_type=var_type,
        loss_type=loss_type,
        default_sample_method="ddim" if timestep_respacing.startswith("ddim") else "ddpm",
    )
    # What a sampler must reproduce: checkpoints store it, sampling_diffusion rebuilds from it.
    diffusion.process = {
        "noise_schedule": noise_schedule, "diffusion_steps": int(diffusion_steps), "prediction": prediction,
        "learn_sigma": bool(learn_sigma), "sigma_small": bool(sigma_small),
    }
    return diffusion


# The process of the official DiT checkpoints, and of any checkpoint that does not record one.
DIT_PROCESS = {"noise_schedule": "linear", "diffusion_steps": 1000, "prediction": "epsilon", "sigma_small": False}


def sampling_diffusion(process: Mapping[str, Any] | None, timestep_respacing: str, learn_sigma: bool) -> SpacedDiffusion:
    """The diffusion a checkpoint was trained with (``process``, None = DiT's), respaced for sampling."""
    spec = {**DIT_PROCESS, **(process or {}), "learn_sigma": bool(learn_sigma)}
    unknown = sorted(set(spec) - set(DIT_PROCESS) - {"learn_sigma"})
    if unknown:
        raise ValueError(f"diffusion process keys {unknown} are unknown; this flexdit_train reads {sorted(DIT_PROCESS)}")
    return create_diffusion(str(timestep_respacing), **spec)


def process_differences(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict[str, tuple[Any, Any]]:
    """``{key: (a's value, b's value)}`` for every forward-process or prediction setting that differs
    (None = DiT's process; ``sigma_small`` only counts when neither learns its variance)."""
    a, b = {**DIT_PROCESS, **(a or {})}, {**DIT_PROCESS, **(b or {})}
    keys = [k for k in DIT_PROCESS if not (k == "sigma_small" and (a.get("learn_sigma") or b.get("learn_sigma")))]
    return {k: (a[k], b[k]) for k in keys if a[k] != b[k]}


def process_mismatch(trained: Mapping[str, Any] | None, configured: Mapping[str, Any] | None, source: str,
                     fix: str | None = None) -> str | None:
    """None when ``source``'s weights were trained with the ``configured`` process; otherwise the one-line
    error, ending in ``fix`` (default: the ``objective.diffusion`` overrides that match the weights)."""
    differences = process_differences(trained, configured)
    if not differences:
        return None
    was = ", ".join(f"{k}={a}" for k, (a, _) in differences.items())
    now = ", ".join(f"{k}={b}" for k, (_, b) in differences.items())
    fix = fix or "set " + " ".join(f"objective.diffusion.{k}={a}" for k, (a, _) in differences.items())
    return f"{source} was trained with {was} but the objective uses {now}: {fix}"


__all__ = [
    "BETA_SCHEDULES",
    "SAMPLE_METHODS",
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "PREDICTIONS",
    "SpacedDiffusion",
    "DIT_PROCESS",
    "create_diffusion",
    "process_differences",
    "process_mismatch",
    "sampling_diffusion",
    "get_named_beta_schedule",
    "space_timesteps",
]
