"""Training survives what clusters do to it, tried from outside through the CLI, as a user meets it.

SIGKILL of the whole process group at random moments (between checkpoints that fall mid-epoch, data
loader workers running), then the same command again, until the run ends: the final weights, EMA and
optimizer state equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

TINY = ["+experiment=mnist_pretrain", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
        "data.global_batch_size=8", "data.num_workers=2", "data.steps_per_epoch=10", "trainer.max_steps=100",
        "callbacks.model_checkpoint.every_n_train_steps=7", "callbacks.sample_grid=null", "callbacks.progress_bar=null",
        "objective.lr_scheduler.warmup_steps=10", "objective.ema_decay=0.9", "logger=csv", "seed=5"]


# The digits as a user's WebDataset image shards (3 channels, the ImageNet reader), for tests on that path.
SHARD_DATA = ["data=imagenet_wds", "data.val_shards=null", "data.image_size=32", "data.input_size=32",
              "data.num_classes=10", "data.random_flip=true", "data.shuffle_buffer=200"]


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
@pytest.mark.parametrize("data, kills", [("digits", 5), ("shards", 3)])
def test_random_sigkills_mid_epoch_leave_the_final_state_of_an_uninterrupted_run(data, kills, digit_shards, tmp_path):
    """The bundled digits (their own data module) and the same digits read as a user's WebDataset shards."""
    cache = tmp_path / "cache"
    args = TINY if data == "digits" else [*TINY, *SHARD_DATA, f"data.train_shards={digit_shards / 'train.json'}"]
    reference = launch([*args, "run_name=uninterrupted"], tmp_path, cache)
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-3000:]
    runs = tmp_path / "outputs" / "mnist_pretrain" / "runs"

    rng = random.Random(20261202)
    command = [*args, "run_name=preempted"]
    run_dir = runs / "preempted"
    killed = []
    while len(killed) < kills:
        # wait for the first or second checkpoint after the resumed one (every 7 steps, an epoch every 10),
        # then kill at a random moment before the next
        resumed = max(checkpoint_steps(run_dir), default=0) if run_dir.exists() else 0
        proc = launch(command, tmp_path, cache)
        if not kill_after(proc, run_dir, resumed + rng.randint(1, 14), delay=rng.uniform(0.0, 0.25)):
            break
        killed.append(max(checkpoint_steps(run_dir)))
    assert len(killed) == kills, killed
    assert any(s % 10 for s in killed) and killed[-1] < 100, killed  # resumed from checkpoints that fall mid-epoch
    final = launch(command, tmp_path, cache)
    out, _ = final.communicate(timeout=600)
    assert final.returncode == 0, out[-3000:]
    assert "data: 0 of" in out and "samples read from the training shards lost" in out  # the end-of-run summary line

    expected, expected_opt = state(runs / "uninterrupted" / "checkpoints" / "final.ckpt")
    got, got_opt = state(run_dir / "checkpoints" / "final.ckpt")
    assert set(got) == set(expected)
    for key in expected:  # model and EMA
        assert torch.allclose(got[key], expected[key], rtol=0, atol=1e-6), (key, killed)
    for a, b in zip(expected_opt[0]["state"].values(), got_opt[0]["state"].values()):
        assert a["step"] == b["step"]
        assert torch.allclose(a["exp_avg"], b["exp_avg"], rtol=0, atol=1e-6)
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- damaged data
SHARDS = [*SHARD_DATA, "data.num_workers=2", "data.global_batch_size=16",
          "data.steps_per_epoch=20", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
          "callbacks.sample_grid=null", "callbacks.progress_bar=null", "callbacks.data_skips.every_n_steps=5",
          "callbacks.data_skips.min_samples=200", "logger=csv"]


def members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def truncate(shard: Path, keep: float) -> int:
    """Cut ``shard`` inside a member after ``keep`` of its bytes; returns the samples still complete in it."""
    infos = members(shard)
    cut = int(shard.stat().st_size * keep)
    shard.write_bytes(shard.read_bytes()[:cut])
    # a sample is complete when all its members end before the cut (512-byte blocks, header first)
    ends: dict[str, int] = {}
    for info in infos:
        key = info.name.split(".")[0]
        ends[key] = max(ends.get(key, 0), info.offset_data + info.size)
    return sum(end <= cut for end in ends.values())


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    from flexdit_train.data.mnist import write_mnist_shards

    out = tmp_path_factory.mktemp("digits")
    write_mnist_shards(out)
    return out


def damaged_set(digit_shards: Path, tmp_path: Path, shards: int, keep: float) -> tuple[Path, dict[str, int], float]:
    """A copy of the digits with the first ``shards`` train shards truncated to ``keep`` of their bytes: the
    copy, the samples each damaged shard lost, and the true fraction of the set's samples lost."""
    out = tmp_path / "damaged"
    shutil.copytree(digit_shards, out)
    counts = {s["url"]: s["count"] for s in json.loads((out / "train.json").read_text())["shards"]}
    lost = {name: counts[name] - truncate(out / name, keep) for name in sorted(counts)[:shards]}
    return out, lost, sum(lost.values()) / sum(counts.values())


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "flexdit_train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def summary_rate(output: str) -> tuple[int, int, float]:
    match = re.search(r"data: (\d+) of (\d+) samples read from the training shards lost \(([\d.]+)%\)", output)
    assert match, output[-3000:]
    return int(match[1]), int(match[2]), float(match[3]) / 100


@pytest.mark.slow
def test_a_few_damaged_shards_are_named_counted_and_survived(digit_shards, tmp_path):
    damaged, lost, _ = damaged_set(digit_shards, tmp_path, shards=3, keep=0.5)  # 5% of the 60 shards
    result = run_cli([*SHARDS, f"data.train_shards={damaged / 'train.json'}", "trainer.max_steps=150",
                      "callbacks.data_skips.max_skip_rate=0.2"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    total_lost, met, _ = summary_rate(output)
    assert total_lost > 0 and met >= 150 * 16 / 2
    reports = re.findall(r"lost (\d+) sample\(s\) of \S*/(train-\d+\.tar): (\w+)", output)
    assert reports and {name for _, name, _ in reports} <= set(lost), reports  # names only the damaged shards
    for count, name, error in reports:
        if error in ("ReadError", "shard"):  # the tar ends early: the index count minus what was read
            assert abs(int(count) - lost[name]) <= 1, (name, count, lost[name])  # +-1: the sample the cut splits
        else:  # that split sample, read without its image bytes, does not decode
            assert int(count) == 1, (name, count, error)


@pytest.mark.slow
def test_the_loss_rate_is_the_share_of_samples_lost(digit_shards, tmp_path):
    damaged, _, true_fraction = damaged_set(digit_shards, tmp_path, shards=60, keep=0.8)  # all shards: no sampling noise
    result = run_cli([*SHARDS, f"data.train_shards={damaged / 'train.json'}", "trainer.max_steps=40",
                      "callbacks.data_skips.max_skip_rate=0.5"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    _, _, rate = summary_rate(output)
    assert abs(rate - true_fraction) <= 0.1 * true_fraction, (rate, true_fraction)


@pytest.mark.slow
def test_mostly_broken_data_stops_the_run_with_one_line(digit_shards, tmp_path):
    damaged, _, true_fraction = damaged_set(digit_shards, tmp_path, shards=50, keep=0.2)
    assert true_fraction > 0.6
    result = run_cli([*SHARDS, f"data.train_shards={damaged / 'train.json'}", "trainer.max_steps=200"], tmp_path)
    assert result.returncode != 0
    assert re.search(r"\d+\.\d% of the training samples were lost \(\d+ of \d+\), above max_skip_rate=1\.0%",
                     result.stderr), result.stderr[-3000:]
    assert "shards verify" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_full_disk_during_a_checkpoint_write_leaves_the_previous_one_and_the_run_resumable(tmp_path):
    cache = tmp_path / "cache"
    short = [*TINY, "trainer.max_steps=30"]
    reference = launch([*short, "run_name=uninterrupted"], tmp_path, cache)
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-3000:]
    run_dir = tmp_path / "outputs" / "mnist_pretrain" / "runs" / "full"
    full_disk = "trainer.plugins=[{_target_: helpers.disk.FullDiskAt, at_step: 14}]"
    env_tests = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    failed = subprocess.run([sys.executable, "-m", "flexdit_train", *short, "run_name=full", full_disk], cwd=tmp_path,
                            env={**env_tests, "OMP_NUM_THREADS": "1", "FLEXDIT_DATA_CACHE": str(cache)},
                            capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert re.search(r"^error: no space left on device while writing \S+step_0000014", failed.stderr, re.M), failed.stderr
    assert checkpoint_steps(run_dir) == [7]  # the previous checkpoint, whole, and no half-written one
    assert not list((run_dir / "checkpoints").glob(".*tmp*")) and not (run_dir / "checkpoints" / "final.ckpt").exists()
    torch.load(run_dir / "checkpoints" / "step_0000007.ckpt", map_location="cpu", weights_only=True)
    resumed = launch([*short, "run_name=full"], tmp_path, cache)  # space freed: the same command again
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and "step_0000007.ckpt" in out, out[-3000:]
    expected, _ = state(tmp_path / "outputs" / "mnist_pretrain" / "runs" / "uninterrupted" / "checkpoints" / "final.ckpt")
    got, _ = state(run_dir / "checkpoints" / "final.ckpt")
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=0, atol=1e-6), key
