"""`python -m flexdit_train.doctor`: preflight findings on the composed training config, and its exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds

from flexdit_train.doctor import main
from flexdit_train.evaluation.features import INCEPTION_WEIGHTS_FILE
from flexdit_train.models import DiT, export_safetensors

# Keep the host's SLURM job or W&B login (if any) out of the findings under test.
HOST_VARIABLES = ("SLURM_", "WANDB_", "NETRC")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith(HOST_VARIABLES):
            monkeypatch.delenv(key)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.chdir(tmp_path)  # resume=auto looks under ./outputs


def write_shards(folder: Path, prefix: str, count: int) -> Path:
    """``count`` one-sample tar shards ``<prefix>-000000.tar``, ... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{prefix}-%06d.tar"), maxcount=1, verbose=0) as sink:
        for i in range(count):
            sink.write({"__key__": f"{prefix}{i:06d}", "cls": i})
    return folder


def doctor(capsys, *overrides: str) -> tuple[int, list[str]]:
    code = main(list(overrides))
    return code, capsys.readouterr().out.splitlines()


def lines_of(lines: list[str], status: str, check: str) -> list[str]:
    return [line for line in lines if line.startswith(f"{status:<4} {check}:")]


def shard_overrides(folder: Path, train: int, val: int, ranks: int, workers: int) -> list[str]:
    write_shards(folder, "train", train)
    write_shards(folder, "val", val)
    return [
        "data=imagenet_wds",
        # a brace pattern (quoted for Hydra) and a glob: both spellings the readers accept
        f"data.train_shards='{folder}/train-{{000000..{train - 1:06d}}}.tar'",
        f"data.val_shards={folder}/val-*.tar",
        f"trainer.devices={ranks}",
        f"data.num_workers={workers}",
        "data.global_batch_size=8",
    ]


def test_default_config_is_healthy(capsys):
    code, lines = doctor(capsys)
    assert code == 0, lines
    assert not [line for line in lines if line.startswith("FAIL")]
    checks = {line.split(":", 1)[0].split()[-1] for line in lines[:-1]}
    assert checks == {"accelerator", "slurm", "batch", "shards", "checkpoint", "inception", "wandb"}
    assert lines[-1].startswith("doctor: 0 failed")


def test_enough_shards_for_every_reader_pass(capsys, tmp_path):
    code, lines = doctor(capsys, *shard_overrides(tmp_path / "shards", train=4, val=4, ranks=2, workers=2))
    assert code == 0, lines
    assert len(lines_of(lines, "OK", "shards")) == 2


def test_fewer_val_shards_than_ranks_x_workers_fail_with_the_fix(capsys, tmp_path):
    code, lines = doctor(capsys, *shard_overrides(tmp_path / "shards", train=4, val=3, ranks=2, workers=2))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "shards")
    assert "data.val_shards has 3 shard(s) for 2 rank(s) x 2 worker(s) = 4 readers" in line
    assert "--maxcount" in line and "data.num_workers=1" in line


def test_fewer_train_shards_than_ranks_fail_and_than_readers_warn(capsys, tmp_path):
    code, lines = doctor(capsys, *shard_overrides(tmp_path / "a", train=3, val=8, ranks=4, workers=2))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "shards")
    assert "data.train_shards has 3 shard(s) for 4 rank(s)" in line and "--maxcount" in line
    # enough for the ranks but not for every worker: resampled training streams cope, with correlated batches
    code, lines = doctor(capsys, *shard_overrides(tmp_path / "b", train=4, val=8, ranks=2, workers=4))
    assert code == 0
    [line] = lines_of(lines, "WARN", "shards")
    assert "data.num_workers=2" in line


def test_missing_shards_fail(capsys, tmp_path):
    code, lines = doctor(capsys, "data=latents_wds", f"data.train_shards={tmp_path}/nothing-*.tar", "data.val_shards=null")
    assert code == 1
    [line] = lines_of(lines, "FAIL", "shards")
    assert "no shards match" in line


def test_global_batch_not_divisible_by_world_size_fails(capsys):
    code, lines = doctor(capsys, "trainer.devices=3", "data.global_batch_size=64")
    assert code == 1
    [line] = lines_of(lines, "FAIL", "batch")
    assert "multiple of 3 (e.g. 63)" in line


@pytest.mark.parametrize("content", [None, b"not a checkpoint at all, just text\n"])
def test_missing_or_corrupt_pretrained_checkpoint_fails(capsys, tmp_path, content):
    path = tmp_path / "weights.pt"
    if content is not None:
        path.write_bytes(content)
    code, lines = doctor(capsys, f"model.pretrained={path}")
    assert code == 1
    [line] = lines_of(lines, "FAIL", "checkpoint")
    assert line.startswith("FAIL checkpoint: model.pretrained:") and str(path) in line
    assert ("does not exist" if content is None else "is not a DiT checkpoint") in line


def test_loadable_pretrained_checkpoint_passes(capsys, tmp_path):
    # shaped like data=synthetic: 32x32 inputs, 4 channels, 1000 classes
    torch.manual_seed(0)
    net = DiT(input_size=32, patch_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=1000)
    path = export_safetensors(net, tmp_path / "tiny.safetensors")
    code, lines = doctor(capsys, "data=synthetic", f"model.pretrained={path}")
    assert code == 0, lines
    assert any("loads" in line for line in lines_of(lines, "OK", "checkpoint"))


def test_pretrained_checkpoint_of_another_prediction_fails_with_the_override(capsys, tmp_path):
    net = DiT(input_size=32, patch_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=1000)
    net.diffusion_process = {"prediction": "v"}
    path = export_safetensors(net, tmp_path / "v.safetensors")
    code, lines = doctor(capsys, "data=synthetic", f"model.pretrained={path}")
    assert code == 1
    [line] = lines_of(lines, "FAIL", "checkpoint")
    assert "was trained with prediction=v but the objective uses prediction=epsilon: set objective.diffusion.prediction=v" in line
    code, _ = doctor(capsys, "data=synthetic", f"model.pretrained={path}", "objective.diffusion.prediction=v")
    assert code == 0


def test_unreadable_resume_checkpoint_fails(capsys, tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"\x80truncated")
    code, lines = doctor(capsys, f"ckpt_path={bad}")
    assert code == 1
    assert "not a readable Lightning checkpoint" in lines_of(lines, "FAIL", "checkpoint")[0]


def test_resume_checkpoint_of_another_prediction_fails_with_the_override(capsys, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"global_step": 5, "state_dict": {}, "flexdit": {"diffusion": {"prediction": "v"}}}, ckpt)
    code, lines = doctor(capsys, "data=synthetic", f"ckpt_path={ckpt}")
    assert code == 1
    [line] = lines_of(lines, "FAIL", "checkpoint")
    assert f"resume checkpoint {ckpt} was trained with prediction=v" in line
    assert "set objective.diffusion.prediction=v" in line
    code, _ = doctor(capsys, "data=synthetic", f"ckpt_path={ckpt}", "objective.diffusion.prediction=v")
    assert code == 0


def test_slurm_task_layout_must_match_the_trainer(capsys, monkeypatch):
    for key, value in {"SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "4",
                       "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "1"}.items():
        monkeypatch.setenv(key, value)
    code, lines = doctor(capsys, "trainer.devices=2", "trainer.num_nodes=2", "data.global_batch_size=64")
    assert code == 1
    fails = lines_of(lines, "FAIL", "slurm")
    assert any("--ntasks-per-node=2" in line for line in fails)
    assert any("--nodes=2" in line for line in fails)
    code, lines = doctor(capsys, "trainer.devices=4")
    assert code == 0 and lines_of(lines, "OK", "slurm"), lines


def test_gpu_trainer_needs_enough_visible_gpus_with_bf16(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, lines = doctor(capsys, "trainer=gpu")
    assert code == 1 and "set trainer=cpu" in lines_of(lines, "FAIL", "accelerator")[0]
    # a node with 4 GPUs, faked: this machine has none
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    code, lines = doctor(capsys, "trainer=gpu", "trainer.devices=8", "data.global_batch_size=64")
    assert code == 1 and "set trainer.devices=4" in lines_of(lines, "FAIL", "accelerator")[0]
    code, lines = doctor(capsys, "trainer=gpu", "trainer.devices=4")
    assert code == 0 and "4 of 4 visible GPU(s)" in lines_of(lines, "OK", "accelerator")[0]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    code, lines = doctor(capsys, "trainer=gpu", "trainer.precision=bf16-mixed")
    assert code == 1 and "trainer.precision=16-mixed" in lines_of(lines, "FAIL", "accelerator")[0]


def test_inception_weights_must_be_on_disk_when_fid_runs(capsys, tmp_path):
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    fid = ["+eval.metrics=[fid,kid]", f"+eval.inception_weights={weights}"]
    code, lines = doctor(capsys, *fid)
    assert code == 1
    [line] = lines_of(lines, "FAIL", "inception")
    assert line.startswith("FAIL inception: eval.inception_weights:") and "eval.inception_weights=" in line
    weights.write_bytes(b"weights")
    code, lines = doctor(capsys, *fid)
    assert code == 0 and lines_of(lines, "OK", "inception")
    # the MNIST classifier's features need no Inception weights
    code, lines = doctor(capsys, "+eval.metrics=[fid]", "+eval.feature_extractor=mnist-cnn")
    assert code == 0 and "no FID evaluation" in lines_of(lines, "OK", "inception")[0]


def test_wandb_without_credentials_warns_and_offline_is_fine(capsys, monkeypatch):
    wandb_logger = "+logger.wandb._target_=lightning.pytorch.loggers.WandbLogger"
    code, lines = doctor(capsys, wandb_logger)
    assert code == 0
    [line] = lines_of(lines, "WARN", "wandb")
    assert "wandb login" in line and "WANDB_MODE=offline" in line
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, lines = doctor(capsys, wandb_logger)
    assert code == 0 and "wandb sync" in lines_of(lines, "OK", "wandb")[0]


def test_bad_override_fails_on_one_line(capsys):
    code, lines = doctor(capsys, "data=no_such_data")
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("FAIL config:")


def test_cli_exit_code(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(HOST_VARIABLES)}
    result = subprocess.run(
        [sys.executable, "-m", "flexdit_train.doctor", "model.pretrained=/nonexistent.pt"],
        cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "FAIL checkpoint: model.pretrained: checkpoint /nonexistent.pt does not exist" in result.stdout
