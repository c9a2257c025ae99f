"""The sibling methods through the training CLI on two CPU processes (DDP over gloo): train, be preempted after a
checkpoint, resume with the same command, then sample the result through the sampling CLI, as FlexiDiT does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flexdit_train.models import from_pretrained
from flexdit_train.models.arch import arch_of

TESTS_DIR = Path(__file__).parent
TINY_SAMPLING = ["callbacks.sample_grid.num_images=2", "callbacks.sample_grid.sampling_steps=ddim2"]
# Each method's miniature experiment, shrunk to a few thousand parameters (from scratch: the shipped teacher is
# wider); the arch its checkpoint must record; the sampling overrides of its own compute schedule and what the
# sampling card must then say.
METHODS = {
    "mnist_edt": (["model.widths=[32,48,64,48,32]", "model.num_heads=[2,2,2,2,2]"], "edt", ["amm_blocks=[8,11]"],
                  {"amm_blocks": [8, 11]}),
    "mnist_sparse_dit": (["model.pretrained=null", "model.hidden_size=32", "model.num_heads=2"], "sparse_dit",
                         ["budget=sparse_density"], {"budget": "sparse_density"}),
}


def run_module(module: str, args: list[str], cwd: Path, data_cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR), "OMP_NUM_THREADS": "1", "FLEXDIT_DATA_CACHE": str(data_cache)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(METHODS))
def test_method_trains_in_ddp_resumes_and_samples(experiment, tmp_path):
    tiny, arch, sampling, card_says = METHODS[experiment]
    base = [f"+experiment={experiment}", "trainer=ddp_cpu", *tiny, *TINY_SAMPLING, "data.global_batch_size=4",
            "data.num_workers=0", "logger=csv", "run_name=dist", "callbacks.model_checkpoint.every_n_train_steps=2"]
    cache = tmp_path / "data_cache"
    first = run_module("flexdit_train", [*base, "trainer.max_steps=2"], tmp_path, cache)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/runs/dist")  # one run directory for both processes
    second = run_module("flexdit_train", [*base, "trainer.max_steps=4"], tmp_path, cache)  # resume=auto: from step 2
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout + second.stderr
    final = run_dir / "checkpoints" / "final.ckpt"
    ckpt = torch.load(final, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["flexdit"]["samples_seen"] == 4 * 4
    assert len(ckpt["flexdit"]["rng_states"]) == 2  # one generator state per rank
    ema = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
    raw = {k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert set(ema) == set(raw) and any(not torch.equal(ema[k], raw[k]) for k in raw)  # the EMA moved and lags
    assert arch_of(from_pretrained(final)).name == arch  # the checkpoint rebuilds the method's network
    sample = run_module("flexdit_train.sample", [f"checkpoint={final}", "num_samples=2", "sampling_steps=ddim2",
                                                 "device=cpu", "progress=false", f"out_dir={tmp_path / 'samples'}",
                                                 *sampling], tmp_path, cache)
    assert sample.returncode == 0, sample.stderr[-3000:]
    images = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert images.shape == (2, 32, 32, 1) and images.dtype == np.uint8
    card = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert card["arch"] == arch and {k: card[k] for k in card_says} == card_says
