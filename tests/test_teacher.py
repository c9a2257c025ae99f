"""The MNIST teacher shipped in the package: loadable like a user's checkpoint, described by its card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import flexdit_train
from flexdit_train.models import flexify, from_pretrained
from flexdit_train.runtime.resolvers import ASSETS_DIR, asset_path

TEACHER = Path(asset_path("mnist_dit_teacher.safetensors"))
FLOW_TEACHER = Path(asset_path("mnist_flow_teacher.safetensors"))


def check_card(weights: Path, sampling_steps: str) -> tuple[dict, torch.nn.Module]:
    """A shipped teacher against its card: hash, config, process, size and a complete evaluation record."""
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert weights.parent == ASSETS_DIR and weights.stat().st_size < 8 * 2**20  # a few MB in the repository
    model = from_pretrained(weights)
    assert dict(model.config) == card["model_config"] and model.diffusion_process == card["diffusion"]
    assert model.patch_size == 4 and model.num_classes == 10
    assert sum(p.numel() for p in model.parameters()) == card["num_parameters"]
    evaluation = card["evaluation"]
    assert len(evaluation["seeds"]) >= 3 and evaluation["fid_mean"] > 0 and evaluation["fid_std"] >= 0
    assert "eval.reference=mnist:val" in evaluation["protocol"] and 0.9 < evaluation["label_accuracy_mean"] <= 1
    assert f"eval.sampling_steps={sampling_steps}" in evaluation["protocol"]
    assert card["steps"] > 0 and card["train_wall_clock_s"] > 0 and card["command"] and card["commit"]
    return card, model


def test_the_shipped_flow_teacher_matches_its_card():
    card, model = check_card(FLOW_TEACHER, "euler50")
    assert model.diffusion_process["kind"] == "flow" and model.diffusion_process["prediction"] == "velocity"
    assert model.learn_sigma is False and "mnist_flow_pretrain" in card["command"]


def test_the_shipped_teacher_matches_its_card():
    card, model = check_card(TEACHER, "ddim50")
    assert model.diffusion_process["prediction"] == "v"
    # The shipped weights' convergence check: 50% more steps improve FID by less than 3%. A teacher that `make
    # pretrain` retrains gets a new card without one until it is measured (mnist_flex_repro.py --convergence).
    convergence = card.get("convergence") or pytest.skip("this card's weights have no convergence record")
    assert convergence["weights_sha256"] == card["sha256"]
    assert convergence["improvement"] < 0.03 and convergence["converged"] is True
    assert len(convergence["x1.5_steps_fid_per_seed"]) == len(convergence["teacher_fid_per_seed"]) >= 3


@pytest.mark.parametrize("weights", [TEACHER, FLOW_TEACHER], ids=["ddpm", "flow"])
def test_lora_flexify_of_the_teacher_keeps_its_native_path_bit_for_bit(weights):
    teacher = from_pretrained(weights)
    flex = flexify(from_pretrained(weights), patch_sizes=(4, 8), mode="lora", lora_rank=16).eval()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(6, 1, 32, 32, generator=g), torch.randint(0, 1000, (6,), generator=g), torch.arange(6)
    with torch.no_grad():
        assert torch.equal(flex(x, t, y, patch_size=4), teacher(x, t, y))
        assert flex(x, t, y, patch_size=8).shape == teacher(x, t, y).shape  # (6, 2 or 1, 32, 32): sigma or not


def test_the_mnist_flexify_experiments_start_from_the_shipped_teacher():
    with initialize_config_dir(version_base="1.3", config_dir=flexdit_train.CONF_DIR):
        for experiment in ("mnist_flex_lora", "mnist_flex_lora_high_noise", "mnist_flex", "mnist_flex_high_noise",
                           "mnist_control"):
            cfg = compose("train", overrides=[f"+experiment={experiment}"])
            assert Path(cfg.model.pretrained) == TEACHER
            assert cfg.objective.diffusion.prediction == "v"  # the teacher's process
        # the high-noise recipe differs from mnist_flex_lora only where it says so
        base, high = (compose("train", overrides=[f"+experiment={e}"])
                      for e in ("mnist_flex_lora", "mnist_flex_lora_high_noise"))
        assert high.objective.timestep_ranges == {8: [0.3, 1.0]} and high.objective.ema_decay == 0.99
        assert high.trainer.max_steps == base.trainer.max_steps and high.flex == base.flex
        assert high.objective.optimizer == base.objective.optimizer
        shared, shared_high = (compose("train", overrides=[f"+experiment={e}"])
                               for e in ("mnist_flex", "mnist_flex_high_noise"))
        assert shared_high.objective.timestep_ranges == {8: [0.3, 1.0]} and shared.objective.timestep_ranges is None
        assert shared_high.objective.ema_decay == shared.objective.ema_decay and shared_high.flex == shared.flex
        assert shared_high.trainer.max_steps == shared.trainer.max_steps
        # the flow teacher's LoRA recipe is the high-noise one, on the flow process
        flow = compose("train", overrides=["+experiment=mnist_flow_flex_lora"])
        assert Path(flow.model.pretrained) == FLOW_TEACHER and flow.model.learn_sigma is False
        assert flow.objective.diffusion._target_.endswith("create_flow") and flow.objective.diffusion.prediction == "velocity"
        assert flow.objective.timestep_ranges == high.objective.timestep_ranges and flow.flex == high.flex
        assert flow.objective.ema_decay == high.objective.ema_decay and flow.trainer.max_steps == high.trainer.max_steps
        assert flow.objective.optimizer == high.objective.optimizer
        demo = compose("demo")
        assert Path(demo.teacher) == TEACHER
        # the flow demo: its teacher, the flow experiments, and flow samplers wherever the DDPM demo samples with DDIM
        flow_demo = compose("demo_flow")
        assert Path(flow_demo.teacher) == FLOW_TEACHER and flow_demo.pretrain == ["+experiment=mnist_flow_pretrain"]
        assert flow_demo.flexify == ["+experiment=mnist_flow_flex_lora"]  # the full recipe: 800 steps were measured short
        assert [o for o in flow_demo.evaluate if "sampling_steps" not in o] == [o for o in demo.evaluate if "sampling_steps" not in o]
        assert "eval.sampling_steps=euler50" in flow_demo.evaluate and flow_demo.teacher_evaluate == ["eval.num_samples=2000"]
        # unresolved: run_name is a timestamp, which two composes straddling a second boundary resolve differently
        own = ("teacher", "pretrain", "flexify", "evaluate", "teacher_evaluate")
        flow_rest, demo_rest = (OmegaConf.to_container(c, resolve=False) for c in (flow_demo, demo))
        assert {k: v for k, v in flow_rest.items() if k not in own} == {k: v for k, v in demo_rest.items() if k not in own}


def test_same_weights_tells_a_bit_identical_reproduction_from_a_different_one(tmp_path):
    """`make pretrain` keeps the card only when the retrained teacher equals the shipped one bit for bit."""
    from flexdit_train.demo import same_weights
    from flexdit_train.models.loading import export_safetensors

    model = from_pretrained(TEACHER)
    copy = tmp_path / "teacher.safetensors"
    assert not same_weights(model, copy)  # nothing shipped yet
    export_safetensors(model, copy)
    assert same_weights(model, copy)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-7  # one float, one ulp-sized change
    assert not same_weights(model, copy)
