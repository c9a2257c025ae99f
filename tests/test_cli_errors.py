"""Bad input to every app, tried as a user would through subprocesses: one short answer, not a crash.

Each case must exit non-zero, print at most 8 non-empty lines in all, and name its cause. User errors exit
with 2 and keep their traceback out of the console (it goes to the run's log).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexdit_train.diffusion import create_diffusion, create_flow
from flexdit_train.models import DiT, export_safetensors, flexify

MAX_LINES = 8
TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "data.global_batch_size=4",
        "data.num_workers=0", "trainer.max_steps=1", "callbacks.sample_grid=null", "logger=csv"]
TINY_TRAIN = ["+experiment=mnist_pretrain", *TINY]


class Evil:
    """A pickled object that would run a command on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    static = DiT(input_size=32, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    static.diffusion_process = create_diffusion("", prediction="v").process
    paths = {"static": export_safetensors(static, root / "static.safetensors")}
    static.diffusion_process = create_flow().process
    paths["flow"] = export_safetensors(static, root / "flow.safetensors")
    static.diffusion_process = create_diffusion("", prediction="v").process
    flex = flexify(static, patch_sizes=(4, 8), mode="lora", lora_rank=2)
    paths["flex"] = export_safetensors(flex, root / "flex.safetensors")
    truncated = root / "truncated.pt"
    torch.save({"model": static.state_dict()}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:4000])
    paths["truncated"] = truncated
    paths["text"] = root / "notes.txt"
    paths["text"].write_text("these are my notes, not weights\n" * 10)
    paths["evil"] = root / "evil.pt"
    paths["marker"] = root / "pwned"
    torch.save({"model": Evil(paths["marker"])}, paths["evil"])
    return paths


def run(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "", "FLEXDIT_VERBOSE": ""}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


# (id, module, args (with {static}, {flex}, ... placeholders), regex the answer must contain, exit code)
CASES = [
    ("train-missing-checkpoint", "flexdit_train", [*TINY_TRAIN, "model.pretrained=/nope/dit.pt"], r"does not exist", 2),
    ("train-truncated-checkpoint", "flexdit_train", [*TINY_TRAIN, "model.pretrained={truncated}"], r"truncated or corrupt", 2),
    ("train-text-file", "flexdit_train", [*TINY_TRAIN, "model.pretrained={text}"], r"is a text file", 2),
    ("train-unsafe-pickle", "flexdit_train", [*TINY_TRAIN, "model.pretrained={evil}"], r"is unsafe: it pickles a \S*system", 2),
    ("train-unknown-key", "flexdit_train", [*TINY_TRAIN, "objective.learning_rate=1e-3"], r"objective\.learning_rate", 1),
    ("train-unknown-model", "flexdit_train", [*TINY_TRAIN, "model.name=DiT-Q/2"], r"DiT-Q/2", 2),
    ("train-patch-does-not-divide", "flexdit_train", [*TINY_TRAIN, "model.patch_size=5"], r"does not divide", 2),
    ("train-missing-shards", "flexdit_train",
     [*TINY_TRAIN, "data=imagenet_wds", "data.train_shards=/nope/train.json", "data.val_shards=null",
      "data.image_size=32", "data.input_size=32", "data.num_classes=10"], r"/nope/train.json", 2),
    ("train-other-diffusion", "flexdit_train",
     ["+experiment=mnist_flex_lora", *TINY, "model.pretrained={static}", "objective.diffusion.prediction=epsilon"],
     r"trained with prediction=v", 2),
    ("train-flow-from-ddpm", "flexdit_train",
     ["+experiment=mnist_flex_lora", *TINY, "model.pretrained={static}", "process=flow",
      "objective.diffusion.prediction=velocity"],
     r"trained with kind=ddpm but the objective uses kind=flow: set process=ddpm", 2),
    ("train-skip-rate-range", "flexdit_train", [*TINY_TRAIN, "callbacks.data_skips.max_skip_rate=2"], r"max_skip_rate", 2),
    ("train-lr-schedule", "flexdit_train", [*TINY_TRAIN, "objective.lr_scheduler.decay=step"], r"decay='step'", 2),
    ("sample-no-checkpoint", "flexdit_train.sample", [], r"checkpoint is required", 2),
    ("sample-negative-count", "flexdit_train.sample", ["checkpoint={static}", "num_samples=-3"], r"num_samples=-3", 2),
    ("sample-unknown-class", "flexdit_train.sample", ["checkpoint={static}", "class_labels=[12]"], r"\[12\].*10", 2),
    ("sample-budget-below-floor", "flexdit_train.sample",
     ["checkpoint={flex}", "budget=target", "budget.compute_fraction=0.05"], r"below the minimum", 2),
    ("sample-budget-on-static", "flexdit_train.sample", ["checkpoint={static}", "budget=paper_70_70"], r"weak patch", 2),
    ("sample-prompts-for-class-model", "flexdit_train.sample", ["checkpoint={static}", "prompts=[a cat]"], r"text models", 2),
    ("sample-bad-steps", "flexdit_train.sample", ["checkpoint={static}", "sampling_steps=fast"], r"fast", 2),
    ("sample-flow-steps-for-ddpm", "flexdit_train.sample", ["checkpoint={static}", "sampling_steps=euler50"],
     r"trained with Gaussian diffusion \(DDPM\).*sampling_steps=ddim50", 2),
    ("sample-ddim-steps-for-flow", "flexdit_train.sample", ["checkpoint={flow}", "sampling_steps=ddim50"],
     r"trained with flow matching.*sampling_steps=euler50", 2),
    ("evaluate-missing-inception", "flexdit_train.evaluate",
     ["checkpoint={static}", "eval=fid10k", "eval.inception_weights=/nope/inception.pth"], r"/nope/inception.pth", 2),
    ("evaluate-missing-reference", "flexdit_train.evaluate",
     ["checkpoint={static}", "eval=mnist", "eval.reference=/nope/ref.npz"], r"/nope/ref.npz", 2),
    ("evaluate-one-sample", "flexdit_train.evaluate", ["checkpoint={static}", "eval=mnist", "eval.num_samples=1"],
     r"eval.num_samples=1", 2),
    ("shards-missing", "flexdit_train.shards", ["verify", "/nope/a.tar", "/nope/b.tar"], r"no shards match", 2),
    ("flops-unknown-model", "flexdit_train.flops", ["--model", "DiT-Q/2"], r"DiT-Q/2", 2),
    ("flops-image-does-not-tile", "flexdit_train.flops", ["--model", "DiT-S/4", "--image-size", "36"], r"not a multiple", 2),
    ("demo-missing-teacher", "flexdit_train.demo", ["teacher=/nope/teacher.safetensors"], r"/nope/teacher", 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, module, args, expected, code", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_short_answer(case, module, args, expected, code, files, tmp_path):
    result = run(module, [a.format(**files) for a in args], tmp_path)
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert result.returncode == code, output[-3000:]
    assert len(lines) <= MAX_LINES, output
    assert re.search(expected, output), output
    assert "Traceback" not in output
    if code == 2:
        assert lines[-1].startswith("error: "), output
    assert not files["marker"].exists()  # the unsafe pickle never ran
