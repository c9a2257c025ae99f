"""Analytic DiT compute: the DiT paper's Gflops table, a measured cross-check and the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flexdit_train.flops import DIT_TERMS, CostModel, cost_model, registry_config
from flexdit_train.flops.__main__ import main
from flexdit_train.models.dit import DiT

# DiT paper (Peebles & Xie 2023) "Gflops" = GMACs per forward, latent = image / 8.
PAPER_GMACS = [
    ("DiT-XL/2", 32, 118.64),
    ("DiT-XL/2", 64, 524.60),
    ("DiT-XL/4", 32, 29.05),
    ("DiT-S/2", 32, 6.06),
    ("DiT-B/2", 32, 23.01),
    ("DiT-L/2", 32, 80.71),
]


@pytest.mark.parametrize("name,latent,paper", PAPER_GMACS)
def test_matches_dit_paper_table(name, latent, paper):
    cost = cost_model(name, latent)
    assert cost(cost.native_patch) / 1e9 == pytest.approx(paper, rel=0.005)


def test_flops_conventions():
    cost = cost_model("DiT-XL/2", 32)
    macs = cost(2)
    assert cost.flops(2) == 2 * macs
    assert cost.training_flops(2, batch_size=256) == 3 * 256 * 2 * macs
    # A config dict and a registry name describe the same network.
    assert CostModel(registry_config("DiT-XL/2", 32), (32, 32), DIT_TERMS)(2) == macs


def test_non_square_latent_and_patch_override():
    cost = cost_model("DiT-XL/2", (32, 64))
    assert cost.shape(2).tokens == 16 * 32
    assert cost.shape(4).tokens == 8 * 16
    with pytest.raises(ValueError, match="patch size 3 does not divide"):
        cost(3)


def test_lora_and_extra_terms():
    d, h, n, r, depth = 1152, 4608, 64, 32, 28
    base = cost_model("DiT-XL/2", 32)(4)
    # qkv (d -> 3d), proj (d -> d), fc1 (d -> h), fc2 (h -> d): n*r*(d_in + d_out) each, every block.
    expected_lora = depth * n * r * ((d + 3 * d) + (d + d) + (d + h) + (h + d))
    cost = cost_model("DiT-XL/2", 32, lora_rank=r)
    assert cost(4) - base == expected_lora
    assert cost(2) == cost_model("DiT-XL/2", 32)(2)  # the native patch never carries adapters
    assert cost(4) == base + expected_lora
    extra = {"cross_attention": lambda s: s.depth * s.tokens * s.width}
    breakdown = CostModel(registry_config("DiT-XL/2"), (32, 32), {**DIT_TERMS, **extra}).breakdown(2)
    assert set(breakdown) == set(DIT_TERMS) | {"cross_attention"}
    assert breakdown["cross_attention"] == depth * 256 * d


@pytest.mark.parametrize(
    "kwargs,latent",
    [
        (dict(input_size=16, patch_size=2, hidden_size=64, depth=2, num_heads=4), (16, 16)),
        (
            dict(input_size=(8, 16), patch_size=4, hidden_size=96, depth=3, num_heads=6, mlp_ratio=2.0),
            (8, 16),
        ),
        (
            dict(input_size=16, patch_size=2, hidden_size=64, depth=2, num_heads=4, learn_sigma=False),
            (16, 32),
        ),
    ],
)
def test_matches_torch_flop_counter(kwargs, latent):
    torch.manual_seed(0)
    model = DiT(num_classes=10, **kwargs).eval()
    batch = 2
    x = torch.randn(batch, 4, *latent)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, 10, (batch,))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    measured = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    cost = cost_model(model, latent)
    analytic = cost.breakdown(model.native_patch_size)

    # FlopCounterMode counts 2 FLOPs per MAC of matmuls, convs and SDPA and nothing elementwise, which
    # is exactly DiT's convention (no bias adds, norms, GELU, softmax), so the residual is zero: the
    # label embedding is a table lookup and the sinusoidal timestep features are elementwise.
    conv = measured.pop("convolution")
    attention = sum(
        n for op, n in measured.items() if "attention" in op
    )  # the SDPA kernel differs per device
    linear = sum(n for op, n in measured.items() if "attention" not in op)  # addmm (+ mm/bmm on some builds)
    assert conv == pytest.approx(2 * batch * analytic["patchify"], rel=0.02)
    assert attention == pytest.approx(2 * batch * analytic["attention"], rel=0.02)
    other = analytic["linear"] + analytic["adaln"] + analytic["unpatchify"]
    other += analytic["final_adaln"] + analytic["timestep_mlp"]
    assert linear == pytest.approx(2 * batch * other, rel=0.02)
    assert counter.get_total_flops() == pytest.approx(batch * cost.flops(model.native_patch_size), rel=0.02)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flexdit_train.flops", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_forward_json():
    result = _cli("--model", "DiT-XL/2", "--image-size", "512", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "DiT-XL/2" and report["image_size"] == 512
    assert report["patch_size"] == 2 and report["tokens"] == 1024
    assert report["gmacs"] == pytest.approx(524.60, rel=0.005)
    assert report["gflops"] == pytest.approx(2 * report["gmacs"], rel=1e-6)


@pytest.mark.parametrize("x,y,paper", [(130, 130, 63.7), (70, 70, 45.5), (30, 0, 28.9)])
def test_cli_paper_schedules(x, y, paper):
    result = _cli(
        "--model", "DiT-XL/2", "--image-size", "256", "--steps", "250", "--weak-patch-size", "4",
        "--powerful-steps", str(x), "--powerful-steps-guidance", str(y), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert 100 * report["compute_fraction"] == pytest.approx(paper, abs=0.3)
    assert report["nfe"] == {
        "cond": {k: v for k, v in (("2", x), ("4", 250 - x)) if v},
        "guidance": {k: v for k, v in (("2", y), ("4", 250 - y)) if v},
    }
    assert report["static_gmacs_per_image"] == pytest.approx(2 * 250 * 118.62, rel=1e-3)


def test_cli_bad_model_is_one_line_exit_2():
    result = _cli("--model", "DiT-Q/2", "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "unknown model 'DiT-Q/2'" in result.stderr


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--patch-size", "3"], "patch size 3 does not divide"),
        (["--steps", "250", "--budget-fraction", "0.1"], "below the minimum 0.24"),
        (["--steps", "250", "--powerful-steps", "251"], "powerful_steps=251"),
        (["--image-size", "a,b"], "--image-size"),
    ],
)
def test_cli_bad_input(argv, message, capsys):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def _exit_code(argv: list[str]) -> int:
    """main()'s return code, or argparse's exit code for usage errors."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_cli_budget_fraction_and_no_cfg(capsys):
    assert main(["--steps", "250", "--budget-fraction", "0.45", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.45 <= report["compute_fraction"] < 0.45 + (1 - report["weak_cost_ratio"]) / 250
    assert report["powerful_steps"] == report["powerful_steps_guidance"]
    assert main(["--steps", "50", "--powerful-steps", "10", "--no-cfg", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["nfe"] == {"cond": {"2": 10, "4": 40}} and report["cfg"] is False
