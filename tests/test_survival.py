"""Training survives what clusters do to it, tried from outside through the CLI, as a user meets it.

SIGKILL of the whole process group at random moments (between checkpoints that fall mid-epoch, data
loader workers running), then the same command again, until the run ends: the final weights, EMA and
optimizer state equal an uninterrupted run's.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY = ["+experiment=mnist_pretrain", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
        "data.global_batch_size=8", "data.num_workers=2", "data.steps_per_epoch=10", "trainer.max_steps=100",
        "callbacks.model_checkpoint.every_n_train_steps=7", "callbacks.sample_grid=null", "callbacks.progress_bar=null",
        "objective.lr_scheduler.warmup_steps=10", "objective.ema_decay=0.9", "logger=csv", "seed=5"]


def launch(args: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLEXDIT_DATA_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "flexdit_train", *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.ckpt"))


def kill_after(proc: subprocess.Popen, run_dir: Path, step: int, delay: float, timeout: float = 300) -> bool:
    """SIGKILL the process group once a checkpoint at or past ``step`` exists, ``delay`` seconds later (so
    mid-way to the next one). False if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if any(s >= step for s in checkpoint_steps(run_dir)):
            time.sleep(delay)
            if proc.poll() is not None:
                return False
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint at step {step} after {timeout} s")


def state(path: Path) -> tuple[dict, list]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["optimizer_states"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_five_random_sigkills_mid_epoch_leave_the_final_state_of_an_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    reference = launch([*TINY, "run_name=uninterrupted"], tmp_path, cache)
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-3000:]
    runs = tmp_path / "outputs" / "mnist_pretrain" / "runs"

    rng = random.Random(20261202)
    command = [*TINY, "run_name=preempted"]
    run_dir = runs / "preempted"
    kills = []
    while len(kills) < 5:
        # wait for the first or second checkpoint after the resumed one (every 7 steps, an epoch every 10),
        # then kill at a random moment before the next
        resumed = max(checkpoint_steps(run_dir), default=0) if run_dir.exists() else 0
        proc = launch(command, tmp_path, cache)
        if not kill_after(proc, run_dir, resumed + rng.randint(1, 14), delay=rng.uniform(0.0, 0.25)):
            break
        kills.append(max(checkpoint_steps(run_dir)))
    assert len(kills) == 5, kills
    assert any(s % 10 for s in kills) and kills[-1] < 100, kills  # resumed from checkpoints that fall mid-epoch
    final = launch(command, tmp_path, cache)
    out, _ = final.communicate(timeout=600)
    assert final.returncode == 0, out[-3000:]
    assert "data: 0 of" in out and "training samples lost" in out  # the end-of-run summary line

    expected, expected_opt = state(runs / "uninterrupted" / "checkpoints" / "final.ckpt")
    got, got_opt = state(run_dir / "checkpoints" / "final.ckpt")
    assert set(got) == set(expected)
    for key in expected:  # model and EMA
        assert torch.allclose(got[key], expected[key], rtol=0, atol=1e-6), (key, kills)
    for a, b in zip(expected_opt[0]["state"].values(), got_opt[0]["state"].values()):
        assert a["step"] == b["step"]
        assert torch.allclose(a["exp_avg"], b["exp_avg"], rtol=0, atol=1e-6)
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=1e-6)
