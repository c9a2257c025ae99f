"""The training app end to end: experiments, kill-and-resume, DDP and FSDP2 on CPU, bad configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.config import compose_train
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import flexdit_train
from flexdit_train.diffusion import create_diffusion
from flexdit_train.models import DiT, export_safetensors, from_pretrained
from flexdit_train.train import run

TESTS_DIR = Path(__file__).parent
TINY_SAMPLING = ["callbacks.sample_grid.num_images=2", "callbacks.sample_grid.sampling_steps=ddim2"]
TINY_MODEL = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2"]
SYNTHETIC = ["data=synthetic", "data.input_size=8", "data.in_channels=4", "data.num_classes=10",
             "data.global_batch_size=4"]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A tiny latent-shaped DiT (8x8x4, patch 2) and a tiny MNIST-shaped one (32x32x1, patch 4), safetensors (config stored)."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    latent = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    pixel = DiT(input_size=32, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    pixel.diffusion_process = create_diffusion("", prediction="v").process  # as mnist_pretrain records it
    return {"latent": export_safetensors(latent, root / "latent.safetensors"),
            "pixel": export_safetensors(pixel, root / "pixel.safetensors")}


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLEXDIT_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "data_cache"))


def experiment_overrides(name: str, ckpt: dict) -> list[str]:
    common = ["trainer=cpu", "trainer.max_steps=2", "logger=csv", "callbacks.sample_grid.vae=null", *TINY_SAMPLING]
    if name == "mnist_pretrain":
        return [*common, *TINY_MODEL, "data.global_batch_size=4", "data.num_workers=0"]
    if name == "mnist_flex":
        return [*common, f"model.pretrained={ckpt['pixel']}", "data.global_batch_size=4", "data.num_workers=0"]
    return [*common, *SYNTHETIC, "model.name=null", f"model.pretrained={ckpt['latent']}"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["mnist_pretrain", "mnist_flex", "dit_xl_flex", "dit_xl_flex_lora", "dit_s_flex"])
def test_every_experiment_composes_and_runs_two_steps(experiment, tiny_checkpoints, tmp_path):
    cfg = compose_train([f"+experiment={experiment}", *experiment_overrides(experiment, tiny_checkpoints)], tmp_path)
    assert cfg.task_name == experiment
    result = run(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    meta = ckpt["flexdit"]
    assert isinstance(meta["config"], dict) and meta["config"]["task_name"] == experiment  # plain containers
    assert meta["samples_seen"] == 2 * 4
    model = from_pretrained(tmp_path / "checkpoints" / "final.ckpt")
    if experiment != "mnist_pretrain":
        assert model.flex_config["mode"] == ("lora" if experiment.endswith("lora") else "shared")
        assert (tmp_path / "samples").is_dir()
    assert Path(result["run_dir"]) == tmp_path


def test_paper_hyperparameters_of_dit_xl_flex():
    with initialize_config_dir(version_base="1.3", config_dir=flexdit_train.CONF_DIR):
        cfg = compose("train", overrides=["+experiment=dit_xl_flex"])
    assert cfg.model.name == "DiT-XL/2" and cfg.model.pretrained.endswith("DiT-XL-2-256x256.pt")
    assert cfg.objective.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.objective.optimizer.lr == 1e-4 and cfg.objective.weight_decay == 0.0
    assert cfg.objective.ema_decay == 0.9999 and cfg.data.global_batch_size == 256
    assert list(cfg.flex.patch_sizes) == [2, 4] and cfg.flex.mode == "shared"


def test_unknown_config_key_fails_with_hydras_error():
    with initialize_config_dir(version_base="1.3", config_dir=flexdit_train.CONF_DIR):
        with pytest.raises(ConfigCompositionException, match="objective.learning_rate"):
            compose("train", overrides=["objective.learning_rate=1e-3"])
        with pytest.raises(ConfigCompositionException):
            compose("train", overrides=["+experiment=no_such_experiment"])


def test_flexible_checkpoint_whose_patch_sizes_differ_from_the_config_is_refused(tiny_checkpoints, tmp_path):
    from flexdit_train.models import export_safetensors
    from flexdit_train.models.flex import flexify
    from flexdit_train.train import build_module

    flex = flexify(from_pretrained(tiny_checkpoints["latent"]), patch_sizes=(2, 4), mode="shared")
    path = export_safetensors(flex, tmp_path / "flex.safetensors")
    cfg = compose_train([*SYNTHETIC, "model.name=null", f"model.pretrained={path}", "flex=shared",
                         "flex.patch_sizes=[2,8]", "objective=flex_shared"], tmp_path)
    with pytest.raises(ValueError, match=r"already flexible \(mode shared, patch sizes \[2, 4\]\)"):
        build_module(cfg)


def test_fine_tuning_under_another_prediction_is_refused_unless_allowed(tiny_checkpoints, tmp_path):
    from flexdit_train.train import build_module

    model = from_pretrained(tiny_checkpoints["latent"])
    model.diffusion_process = {"prediction": "v"}  # as a checkpoint trained with v prediction records it
    path = export_safetensors(model, tmp_path / "v.safetensors")
    overrides = [*SYNTHETIC, "model.name=null", f"model.pretrained={path}"]
    with pytest.raises(ValueError) as err:
        build_module(compose_train(overrides, tmp_path))
    message = str(err.value)
    assert "was trained with prediction=v but the objective uses prediction=epsilon" in message
    assert "set objective.diffusion.prediction=v" in message and "\n" not in message
    assert build_module(compose_train([*overrides, "objective.diffusion.prediction=v"], tmp_path)).diffusion.process[
        "prediction"] == "v"
    assert build_module(compose_train([*overrides, "allow_process_change=true"], tmp_path)) is not None


def test_resuming_under_another_process_is_refused(tmp_path):
    from flexdit_train.train import build_module

    module = build_module(compose_train([*SYNTHETIC, *TINY_MODEL, "model.name=null", "model.input_size=8",
                                         "model.in_channels=4"], tmp_path))
    resumed = {"flexdit": {"diffusion": {**module.diffusion.process, "prediction": "v"}}}
    with pytest.raises(ValueError) as err:
        module.on_load_checkpoint(resumed)
    message = str(err.value)
    assert message.startswith("the resumed checkpoint was trained with prediction=v but the objective uses "
                              "prediction=epsilon: set objective.diffusion.prediction=v (or start a new run")
    assert "\n" not in message


@pytest.mark.slow
def test_a_copied_run_directory_resumes_and_keeps_one_last_checkpoint(tmp_path):
    import shutil

    base = [*SYNTHETIC, *TINY_MODEL, *TINY_SAMPLING, "logger=csv", "callbacks.model_checkpoint.every_n_train_steps=2"]
    run(compose_train([*base, "trainer.max_steps=2"], tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)  # e.g. moved to another filesystem
    run(compose_train([*base, "trainer.max_steps=4"], tmp_path / "b"))
    checkpoints = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("last*")) == ["last.ckpt"]
    assert (checkpoints / "last.ckpt").resolve().name == "step_0000004.ckpt"
    assert torch.load(checkpoints / "final.ckpt", weights_only=True)["global_step"] == 4


def cli(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "flexdit_train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    base = [*SYNTHETIC, *TINY_MODEL, *TINY_SAMPLING, "logger=csv", "trainer.max_steps=12",
            "data.steps_per_epoch=4", "callbacks.model_checkpoint.every_n_train_steps=4", "seed=3",
            "objective.ema_decay=0.9", "objective.optimizer.lr=1e-3"]
    reference = cli([*base, "run_name=uninterrupted"], tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killer = ["+callbacks.killer._target_=helpers.kill.KillOnce", "+callbacks.killer.at_step=10",
              f"+callbacks.killer.marker={tmp_path / 'killed'}"]
    command = [*base, "run_name=preempted", *killer]
    first = cli(command, tmp_path)
    assert first.returncode == -9, (first.returncode, first.stderr[-3000:])  # SIGKILL
    run_dir = tmp_path / "outputs" / "train" / "runs"
    assert not (run_dir / "preempted" / "checkpoints" / "final.ckpt").exists()
    second = cli(command, tmp_path)  # the same command again: resume=auto finds step 8
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "resuming from" in output and "step_0000008.ckpt" in output, output[-2000:]
    resumed = torch.load(run_dir / "preempted" / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 12 and resumed["flexdit"]["samples_seen"] == 12 * 4
    expected = weights(run_dir / "uninterrupted" / "checkpoints" / "final.ckpt")
    got = resumed["state_dict"]
    assert set(got) == set(expected)
    for key in expected:  # model and EMA weights
        assert torch.allclose(got[key], expected[key], atol=1e-5), key
    ref_opt = torch.load(run_dir / "uninterrupted" / "checkpoints" / "final.ckpt", weights_only=True)["optimizer_states"]
    for a, b in zip(ref_opt[0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], atol=1e-8) and a["step"] == b["step"]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp_cpu", "fsdp_cpu"])
def test_two_process_training_on_cpu(trainer, tmp_path):
    flex = ["flex=shared", "flex.patch_sizes=[2,4]", "objective=flex_shared"]
    result = cli([f"trainer={trainer}", *SYNTHETIC, *TINY_MODEL, "model.patch_size=2", *flex, *TINY_SAMPLING,
                  "logger=csv", "trainer.max_steps=4", "run_name=dist"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "train" / "runs" / "dist"
    assert sorted(p.name for p in (tmp_path / "outputs" / "train" / "runs").iterdir()) == ["dist"]  # one run dir
    ckpt = torch.load(run_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["flexdit"]["samples_seen"] == 4 * 4
    assert len(ckpt["flexdit"]["rng_states"]) == 2  # one generator state per rank
    model = from_pretrained(run_dir / "checkpoints" / "final.ckpt")
    assert model.patch_sizes == (2, 4)
    ema = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
    raw = {k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert set(ema) == set(raw) and any(not torch.equal(ema[k], raw[k]) for k in raw)  # EMA moved, lags
