"""Gaussian diffusion (DiT's DDPM with learned variance): schedules, hybrid loss, DDPM/DDIM samplers.

The objective interface the trainer relies on is ``sample_timesteps``, ``training_losses``, ``sample``,
``num_timesteps`` and ``timestep_map``; networks are plain callables ``model(x, t, **cond)``.
"""

from __future__ import annotations

from flexdit_train.diffusion.gaussian_diffusion import (
    SAMPLE_METHODS,
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
)
from flexdit_train.diffusion.guidance import cfg_model_fn
from flexdit_train.diffusion.respace import SpacedDiffusion
from flexdit_train.diffusion.schedules import BETA_SCHEDULES, get_named_beta_schedule, space_timesteps


def create_diffusion(
    timestep_respacing: str = "",
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """Build a diffusion with DiT's defaults.

    ``timestep_respacing``: "" (all steps, for training), "250", "10,10,5" or "ddimN" (which also
    makes DDIM the default sampler). ``rescale_learned_sigmas`` weights the bound by T / 1000.
    """
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
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        default_sample_method="ddim" if timestep_respacing.startswith("ddim") else "ddpm",
    )


__all__ = [
    "BETA_SCHEDULES",
    "SAMPLE_METHODS",
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "cfg_model_fn",
    "create_diffusion",
    "get_named_beta_schedule",
    "space_timesteps",
]
