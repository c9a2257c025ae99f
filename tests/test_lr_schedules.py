"""Learning-rate schedules: warmup then constant or cosine, resumable, and the default that trains at full LR."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import flexdit_train
from flexdit_train.training.lr_schedules import WarmupDecay, warmup_decay


def lrs(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_warmup_then_cosine_to_the_final_factor_then_constant():
    opt = optimizer(2.0)
    values = lrs(warmup_decay(opt, warmup_steps=4, decay="cosine", total_steps=12, final_factor=0.1), opt, 16)
    assert values[0] == pytest.approx(0.02)  # start_factor 0.01 x 2.0
    assert values[2] == pytest.approx(2.0 * (0.01 + 0.99 * 2 / 4))
    assert values[4] == pytest.approx(2.0)
    mid = 4 + (12 - 4) // 2
    assert values[mid] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert values[12:] == pytest.approx([0.2] * 4)  # past total_steps: the final LR, no new cycle
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_warmup_then_linear_to_the_final_factor_then_constant():
    """EDT's recipe: a straight line from the base LR to final_factor x it at total_steps."""
    opt = optimizer(5e-4)
    values = lrs(warmup_decay(opt, warmup_steps=2, decay="linear", total_steps=10, final_factor=0.1), opt, 13)
    assert values[2] == pytest.approx(5e-4)
    assert values[6] == pytest.approx(5e-4 * (1.0 - 0.9 * 4 / 8))
    assert values[10:] == pytest.approx([5e-5] * 3)
    steps = [a - b for a, b in zip(values[2:10], values[3:11])]
    assert steps == pytest.approx([steps[0]] * len(steps))  # a constant decrement: linear


def test_constant_after_warmup_and_a_run_shorter_than_its_warmup_only_warms_up():
    opt = optimizer()
    assert lrs(warmup_decay(opt, warmup_steps=0), opt, 3) == [1.0, 1.0, 1.0]
    opt = optimizer()
    values = lrs(warmup_decay(opt, warmup_steps=10, decay="cosine", total_steps=5), opt, 5)
    assert values == pytest.approx([0.01 + 0.99 * s / 10 for s in range(5)])


def test_schedule_state_resumes_mid_run():
    opt = optimizer()
    sched = warmup_decay(opt, warmup_steps=2, decay="cosine", total_steps=10)
    lrs(sched, opt, 6)
    state = sched.state_dict()
    expected = lrs(sched, opt, 4)
    opt2 = optimizer()
    sched2 = warmup_decay(opt2, warmup_steps=2, decay="cosine", total_steps=10)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert lrs(sched2, opt2, 4) == pytest.approx(expected)


@pytest.mark.parametrize("kwargs, match", [
    ({"decay": "step"}, "is not one of"),
    ({"decay": "linear", "total_steps": 0}, "a linear decay needs total_steps >= 1"),
    ({"decay": "cosine", "total_steps": None}, "needs total_steps >= 1"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"final_factor": 1.5}, "final_factor must lie in"),
])
def test_bad_settings_fail_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupDecay(**kwargs)


def test_default_objective_trains_at_the_configured_lr_from_the_first_step():
    # torch's LinearLR(start_factor=0.01, total_iters=0), the former default, held the LR at 1% for good.
    with initialize_config_dir(version_base="1.3", config_dir=flexdit_train.CONF_DIR):
        cfg = compose("train", overrides=["objective.optimizer.lr=0.5"])
    opt = instantiate(cfg.objective.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    sched = instantiate(cfg.objective.lr_scheduler)(opt)
    assert lrs(sched, opt, 3) == [0.5, 0.5, 0.5]
