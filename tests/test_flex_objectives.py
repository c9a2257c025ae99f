"""FlexiDiT objectives: per-step patch-size draws, distillation that closes the weak/native gap, DDP agreement."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.models import pretrained_like

from flexdit_train.data.synthetic import SyntheticDataModule
from flexdit_train.diffusion import create_diffusion
from flexdit_train.models import export_safetensors
from flexdit_train.models.flex import flexify
from flexdit_train.training.flex_objectives import DistillModule, FlexSharedModule, PatchSizeSampler


def adamw(lr: float):
    return partial(torch.optim.AdamW, lr=lr)


def test_patch_size_sampler_is_a_function_of_seed_and_step():
    a = PatchSizeSampler({2: 0.25, 4: 0.75}, seed=3)
    b = PatchSizeSampler({2: 0.25, 4: 0.75}, seed=3)
    draws = [a(s) for s in range(2000)]
    assert draws == [b(s) for s in range(2000)]
    assert [a(s) for s in (17, 5, 17)] == [draws[17], draws[5], draws[17]]  # no hidden state
    assert 0.70 < draws.count(4) / 2000 < 0.80
    assert draws != [PatchSizeSampler({2: 0.25, 4: 0.75}, seed=4)(s) for s in range(2000)]
    with pytest.raises(ValueError, match="must be >= 0 and not all zero"):
        PatchSizeSampler({2: 0.0, 4: 0.0}, seed=0)


def test_objectives_reject_sizes_the_model_does_not_have():
    model = flexify(pretrained_like(), patch_sizes=(2, 4), mode="lora", lora_rank=4)
    with pytest.raises(ValueError, match=r"uses patch sizes \[8\] but the model has \[2, 4\]"):
        FlexSharedModule(model, create_diffusion(""), adamw(1e-3), patch_size_weights={2: 1, 8: 1})
    with pytest.raises(ValueError, match="trains weak sizes only"):
        DistillModule(model, create_diffusion(""), adamw(1e-3), patch_size_weights={2: 1, 4: 1})
    shared = flexify(pretrained_like(), patch_sizes=(2, 4), mode="shared")
    with pytest.raises(ValueError, match="teacher='self' needs mode='lora'"):
        DistillModule(shared, create_diffusion(""), adamw(1e-3), patch_size_weights={4: 1})


def test_a_teacher_of_another_prediction_is_refused(tmp_path):
    teacher = pretrained_like()
    teacher.diffusion_process = create_diffusion("", prediction="v").process
    path = export_safetensors(teacher, tmp_path / "teacher.safetensors")
    student = flexify(pretrained_like(), patch_sizes=(2, 4), mode="shared")
    with pytest.raises(ValueError, match="was trained with prediction=v but the objective uses prediction=epsilon"):
        DistillModule(student, create_diffusion(""), adamw(1e-3), patch_size_weights={4: 1}, teacher=str(path))
    module = DistillModule(student, create_diffusion("", prediction="v"), adamw(1e-3), patch_size_weights={4: 1},
                           teacher=str(path))
    assert module.teacher.diffusion_process["prediction"] == "v"


def weak_native_gap(model, x_t, t, y) -> float:
    with torch.no_grad():
        native = model(x_t, t, y, patch_size=2)
        weak = model(x_t, t, y, patch_size=4)
    return float((weak - native).square().mean())


@pytest.mark.slow
def test_lora_distillation_shrinks_the_weak_native_gap_five_fold():
    torch.manual_seed(0)
    model = flexify(pretrained_like(), patch_sizes=(2, 4), mode="lora", lora_rank=8)
    diffusion = create_diffusion("")
    module = DistillModule(model, diffusion, adamw(3e-3), patch_size_weights={4: 1.0}, teacher="self", seed=0)
    module.train()
    optimizer = module.configure_optimizers()
    data = {"x": torch.randn(16, 4, 8, 8), "y": torch.randint(0, 5, (16,))}
    # a fixed evaluation set of noisy inputs, labels including the null class
    g = torch.Generator().manual_seed(1)
    t_eval = torch.randint(0, 1000, (32,), generator=g)
    x_eval = diffusion.q_sample(torch.randn(32, 4, 8, 8, generator=g), t_eval)
    y_eval = torch.cat([torch.randint(0, 5, (24,), generator=g), torch.full((8,), 5)])
    model.eval()
    gap_before = weak_native_gap(model, x_eval, t_eval, y_eval)
    native_before = model(x_eval, t_eval, y_eval, patch_size=2).detach()
    model.train()
    for step in range(300):
        _, terms = module.compute_losses(data, module.patch_size_for_step(step))
        optimizer.zero_grad()
        terms["loss"].mean().backward()
        optimizer.step()
    model.eval()
    gap_after = weak_native_gap(model, x_eval, t_eval, y_eval)
    assert gap_before / gap_after >= 5.0, (gap_before, gap_after)
    assert torch.equal(model(x_eval, t_eval, y_eval, patch_size=2), native_before)  # teacher untouched


class RecordingShared(FlexSharedModule):
    """Writes (rank, step, patch size) of every training step to a JSON-lines file."""

    def __init__(self, *args, record_dir: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.record_dir = record_dir

    def patch_size_for_step(self, step: int) -> int:
        p = super().patch_size_for_step(step)
        with open(Path(self.record_dir) / f"rank{self.global_rank}.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, "patch_size": p}) + "\n")
        return p


@pytest.mark.slow
def test_ddp_ranks_use_the_same_patch_size_every_step(tmp_path):
    model = flexify(pretrained_like(), patch_sizes=(2, 4), mode="shared")
    module = RecordingShared(
        model, create_diffusion(""), adamw(1e-3), patch_size_weights={2: 0.5, 4: 0.5}, seed=0, ema_decay=0.9,
        record_dir=str(tmp_path),
    )
    data = SyntheticDataModule(global_batch_size=4, num_workers=0, seed=0, input_size=8, in_channels=4,
                               num_classes=5, steps_per_epoch=12, val_batches=None)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn_find_unused_parameters_true", max_steps=12,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    records = {r: [json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()]
               for r in (0, 1)}
    assert len(records[0]) == len(records[1]) == 12
    assert records[0] == records[1]
    assert {r["patch_size"] for r in records[0]} == {2, 4}  # both sizes were exercised
