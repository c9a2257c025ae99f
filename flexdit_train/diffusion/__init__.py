"""The two training processes: Gaussian diffusion (DiT's DDPM with learned variance: schedules, hybrid loss,
DDPM/DDIM samplers) and flow matching (:mod:`.flow`: velocity prediction, Euler/Heun/SDE samplers).

The objective interface the trainer and the samplers rely on is ``sample_timesteps``, ``training_losses``,
``q_sample``, ``network_time``, ``noise_quartile``, ``sample``, ``timestep_map``, ``default_sample_method``
and ``process`` (the record checkpoints keep); networks are plain callables ``model(x, t, **cond)``. A
process record without ``kind`` is the Gaussian diffusion (every checkpoint written before flow matching);
flow records say ``kind: flow``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexdit_train.diffusion.flow import (
    FLOW_SAMPLE_METHODS,
    FLOW_TARGET_KEYS,
    FlowMatching,
    create_flow,
    parse_flow_steps,
    sampling_flow,
)
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


def process_kind(process: Mapping[str, Any] | None) -> str:
    """"flow" or "ddpm" (records without a kind, and None = DiT's process)."""
    return str((process or {}).get("kind", "ddpm"))


def sampling_diffusion(
    process: Mapping[str, Any] | None, timestep_respacing: str, learn_sigma: bool
) -> SpacedDiffusion | FlowMatching:
    """The process a checkpoint was trained with (``process``, None = DiT's), set up for sampling with
    ``timestep_respacing``: a DDPM/DDIM respacing ("250", "ddim50") for the Gaussian diffusion, a flow
    sampler ("euler50", "heun25", "sde100") for flow matching; the wrong family is a one-line error."""
    if process_kind(process) == "flow":
        return sampling_flow(dict(process), str(timestep_respacing))
    if process_kind(process) != "ddpm":
        raise ValueError(f"diffusion process kind {process_kind(process)!r} is unknown; this flexdit_train reads "
                         "ddpm (no kind) and flow")
    if parse_flow_steps(str(timestep_respacing)) is not None:
        raise ValueError(
            f"this model was trained with Gaussian diffusion (DDPM), which the flow sampler "
            f"sampling_steps={timestep_respacing!r} cannot sample: use a DDPM/DDIM respacing, e.g. "
            "sampling_steps=ddim50 or 250"
        )
    spec = {**DIT_PROCESS, **(process or {}), "learn_sigma": bool(learn_sigma)}
    unknown = sorted(set(spec) - set(DIT_PROCESS) - {"learn_sigma"})
    if unknown:
        raise ValueError(f"diffusion process keys {unknown} are unknown; this flexdit_train reads {sorted(DIT_PROCESS)}")
    return create_diffusion(str(timestep_respacing), **spec)


def process_differences(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict[str, tuple[Any, Any]]:
    """``{key: (a's value, b's value)}`` for every forward-process or prediction setting that differs
    (None = DiT's process; ``sigma_small`` only counts when neither learns its variance). Processes of
    different kinds differ in ``kind`` alone; two flows in :data:`FLOW_TARGET_KEYS` (their training-time
    distributions may differ: they weight the same target differently)."""
    kind_a, kind_b = process_kind(a), process_kind(b)
    if kind_a != kind_b:
        return {"kind": (kind_a, kind_b)}
    if kind_a == "flow":
        return {k: (a.get(k), b.get(k)) for k in FLOW_TARGET_KEYS if a.get(k) != b.get(k)}
    a, b = {**DIT_PROCESS, **(a or {})}, {**DIT_PROCESS, **(b or {})}
    keys = [k for k in DIT_PROCESS if not (k == "sigma_small" and (a.get("learn_sigma") or b.get("learn_sigma")))]
    return {k: (a[k], b[k]) for k in keys if a[k] != b[k]}


def process_mismatch(trained: Mapping[str, Any] | None, configured: Mapping[str, Any] | None, source: str,
                     fix: str | None = None) -> str | None:
    """None when ``source``'s weights were trained with the ``configured`` process; otherwise the one-line
    error, ending in ``fix`` (default: the overrides that match the weights: ``process=KIND`` for another
    kind of process, else the ``objective.diffusion`` keys)."""
    differences = process_differences(trained, configured)
    if not differences:
        return None
    was = ", ".join(f"{k}={a}" for k, (a, _) in differences.items())
    now = ", ".join(f"{k}={b}" for k, (_, b) in differences.items())
    if fix is None and "kind" in differences:
        fix = f"set process={differences['kind'][0]} (the Hydra group conf/process/)"
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
    "FLOW_SAMPLE_METHODS",
    "FLOW_TARGET_KEYS",
    "FlowMatching",
    "create_flow",
    "parse_flow_steps",
    "process_kind",
    "sampling_flow",
    "create_diffusion",
    "process_differences",
    "process_mismatch",
    "sampling_diffusion",
    "get_named_beta_schedule",
    "space_timesteps",
]
