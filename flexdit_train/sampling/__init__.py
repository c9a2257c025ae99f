"""Sampling as a library: per-sample seeds, guidance, budget schedules, the sampler pipeline and its outputs.

:mod:`.seeds` (noise and labels from ``(seed, sample index)``), :mod:`.guidance` (per-step CFG and
weak-conditional guidance), :mod:`.schedule` (the patch size of every step: the compute budget),
:mod:`.pipeline` (:class:`Sampler`: from a network or a checkpoint to images) and :mod:`.outputs` (grid,
ADM npz, mp4s and the sampling card). The sample and evaluate apps and the training callbacks use it.
"""

from flexdit_train.sampling.guidance import ScheduledDenoiser, cat_conditions, weak_guidance_scale
from flexdit_train.sampling.outputs import sampling_card, save_grid, write_outputs
from flexdit_train.sampling.pipeline import Sampler, generate, latent_decoder, text_condition, to_uint8
from flexdit_train.sampling.schedule import (
    BudgetSchedule,
    as_patch,
    build_schedule,
    patch_label,
    patch_volume,
)
from flexdit_train.sampling.seeds import sample_generator, sample_labels, sample_noise

__all__ = [
    "BudgetSchedule",
    "Sampler",
    "ScheduledDenoiser",
    "as_patch",
    "build_schedule",
    "cat_conditions",
    "generate",
    "latent_decoder",
    "patch_label",
    "patch_volume",
    "sample_generator",
    "sample_labels",
    "sample_noise",
    "sampling_card",
    "save_grid",
    "text_condition",
    "to_uint8",
    "weak_guidance_scale",
    "write_outputs",
]
