"""Cluster configs, the SLURM requeue plumbing, the submitit sweeps and the Docker image recipe."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment

from flexdit_train import CONF_DIR
from flexdit_train.runtime.cluster import parse_signal, slurm_environment
from flexdit_train.runtime.runs import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "data=synthetic", "trainer.max_steps=2", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
    "data.global_batch_size=4", "callbacks.sample_grid.num_images=4", "callbacks.sample_grid.sampling_steps=ddim2",
    "logger=csv",
]
# What srun exports to one task of a single-node, single-task job.
SLURM_TASK_ENV = {
    "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1",
}


def train_config(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose("train", overrides=overrides, return_hydra_config=True)


def cli_env(**extra: str) -> dict[str, str]:
    """A CLI subprocess's environment: one thread; no SLURM job, preempt signal or FLEXDIT_ROOT leaking in,
    so runs land in the default layout under the working directory."""
    leaks = ("SLURM_", "SUBMITIT_PREEMPT_SIGNAL", "FLEXDIT_ROOT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(leaks)}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_slurm_cluster_keeps_launcher_and_trainer_layout_in_sync():
    cfg = train_config(["cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=4", "task_name=dit_xl"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 4)
    assert launcher.name == "dit_xl"
    assert launcher.additional_parameters.requeue is True
    assert launcher.max_num_timeout == cfg.cluster.max_timeouts > 0


def test_slurm_cluster_keeps_atomic_checkpoints_and_adds_the_slurm_environment(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    plugins = instantiate(train_config(["cluster=slurm"]).trainer.plugins)
    assert [type(p) for p in plugins] == [AtomicCheckpointIO, SLURMEnvironment]
    assert plugins[1].auto_requeue and plugins[1].requeue_signal == signal.SIGUSR2
    # Lightning listens for whatever signal submitit asks SLURM to send
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert instantiate(train_config(["cluster=slurm"]).trainer.plugins)[1].requeue_signal == signal.SIGUSR1


def test_local_cluster_leaves_launcher_and_trainer_alone():
    default, local = train_config([]), train_config(["cluster=local"])
    assert default.hydra.launcher._target_ == local.hydra.launcher._target_
    assert default.hydra.launcher._target_.endswith("BasicLauncher")
    assert default.trainer == local.trainer
    assert "cluster" not in default


def test_parse_signal_accepts_names_and_numbers():
    assert parse_signal("USR2") == parse_signal("SIGUSR2") == parse_signal("usr2") == signal.SIGUSR2
    assert parse_signal(int(signal.SIGTERM)) == signal.SIGTERM
    with pytest.raises(ValueError, match="unknown signal 'USR3'"):
        parse_signal("USR3")


def test_lightning_requeues_only_when_no_other_handler_owns_the_signal(monkeypatch):
    """The premise of conf/cluster/slurm.yaml: under submitit exactly one party runs `scontrol requeue`."""
    for key, value in SLURM_TASK_ENV.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, plugins=[slurm_environment(True, "USR2")], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    connector = trainer._signal_connector
    previous = signal.getsignal(signal.SIGUSR2)

    def submitit_handler(signum, frame):
        """Stands in for the handler submitit installs before the training function runs."""

    try:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)  # a hand-written sbatch script: Lightning handles it
        connector.register_signal_handlers()
        assert signal.getsignal(signal.SIGUSR2) not in (signal.SIG_DFL, submitit_handler)
        connector.teardown()
        signal.signal(signal.SIGUSR2, submitit_handler)  # under the submitit launcher: submitit keeps it
        connector.register_signal_handlers()
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
        connector.teardown()
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.slow
def test_slurm_sweep_submits_one_requeueable_job_array(tmp_path):
    """`-m cluster=slurm` end to end, with stand-ins for srun (found = on a cluster) and sbatch (records)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_CAPTURE"\necho "no cluster here" >&2\nexit 1\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    captured = tmp_path / "job.sbatch"
    env = cli_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SBATCH_CAPTURE=str(captured))
    result = subprocess.run(
        [sys.executable, "-m", "flexdit_train", "-m", "cluster=slurm", "seed=0,1,2", "cluster.gpus_per_node=4",
         "cluster.partition=gpu", "cluster.time_min=600", "task_name=sweep_test"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert "no cluster here" in result.stderr, result.stderr[-3000:]  # our sbatch refused, as intended
    sbatch = captured.read_text()
    for line in ("--array=0-2%3", "--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=10",
                 "--partition=gpu", "--time=600", "--job-name=sweep_test", "--signal=USR2@120", "--requeue",
                 "--open-mode=append"):
        assert re.search(rf"^#SBATCH {re.escape(line)}$", sbatch, re.MULTILINE), line
    # job logs (and the pickled jobs a requeue re-runs) live in the sweep directory under the working directory
    assert f"#SBATCH --output={tmp_path}/outputs/sweep_test/multiruns/" in sbatch
    assert re.search(r"^srun .* -m submitit\.core\._submit ", sbatch, re.MULTILINE)


@pytest.mark.slow
def test_submitit_local_sweep_trains_both_jobs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flexdit_train", "-m", "hydra/launcher=submitit_local", "seed=0,1", *TINY_RUN],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [sweep] = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "final.ckpt").is_file(), sorted(p.name for p in sweep.iterdir())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, with comments dropped and continuations joined."""
    text = re.sub(r"\\\n", " ", (REPO / "docker" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_installs_the_package_from_a_cuda_image_without_weights_or_data():
    instructions = dockerfile_instructions()
    names = [name for name, _ in instructions]
    first = next(i for i, name in enumerate(names) if name != "ARG")  # only ARGs may precede FROM
    assert names[first] == "FROM"
    defaults = dict(args.split("=", 1) for _, args in instructions[:first] if "=" in args)
    image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], instructions[first][1])
    assert re.fullmatch(r"pytorch/pytorch:[\w.]+-cuda12\.\d+-cudnn9-runtime", image), image
    copied = " ".join(args for name, args in instructions if name in ("COPY", "ADD"))
    assert not re.search(r"\.(pt|pth|ckpt|safetensors|npz|tar)\b|\bdata/|\boutputs/", copied)
    assert any(name == "RUN" and re.search(r"pip install .*\s\.(\s|$)", args + " ") for name, args in instructions)
    entrypoint = next(args for name, args in instructions if name == "ENTRYPOINT")
    assert "flexdit_train" in entrypoint
    ignored = (REPO / ".dockerignore").read_text().split()
    for pattern in ("/.venv", "/outputs", "/data", "**/*.ckpt", "**/*.safetensors", "/.git"):
        assert pattern in ignored, pattern
