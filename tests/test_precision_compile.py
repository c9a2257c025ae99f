"""The GPU path, checked on CPU: bf16 autocast agrees with fp32 at every patch size with the PI-resized
projections kept in fp32, and torch.compile makes one graph per patch size that alternating schedules reuse."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from helpers.models import randomize_zero_inits
from torch._dynamo.utils import counters

from flexdit_train.models import DiT, flexify

BF16_TOLERANCE = 0.05  # relative L2 error of a bf16-autocast forward (8 mantissa bits) of this tiny model


def tiny(mode: str):
    torch.manual_seed(0)
    model = randomize_zero_inits(DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                                     num_heads=4, num_classes=10), scale=0.1)
    return flexify(model, patch_sizes=(2, 4, 8), mode=mode, lora_rank=4).eval()


def inputs(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.arange(n) % 10


@pytest.mark.parametrize("mode", ["shared", "lora"])
def test_bf16_autocast_agrees_with_fp32_at_every_patch_size(mode):
    model = tiny(mode)
    if mode == "lora":  # adapters start at zero: give the weak paths their own weights
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora." in name:
                    p.normal_(0, 0.05)
    x, t, y = inputs()
    with torch.no_grad():
        for p in model.patch_sizes:
            reference = model(x, t, y, patch_size=p)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(x, t, y, patch_size=p)
            error = float((low.float() - reference).norm() / reference.norm())
            assert error < BF16_TOLERANCE, (p, error)
            assert 0 < error  # bf16 did run


def test_pi_resized_projections_stay_fp32_under_autocast():
    model = tiny("shared")
    for p in (2, 4, 8):
        exact_w, exact_b = model.flex_embed.resize(p)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            weight, bias = model.flex_embed.resize(p)
            head_w, head_b = model.flex_final.resize(p)
        assert weight.dtype == head_w.dtype == head_b.dtype == torch.float32
        assert torch.equal(weight, exact_w) and torch.equal(bias, exact_b)


@pytest.mark.parametrize("mode", ["shared", "lora"])
def test_compile_makes_one_graph_per_patch_size_and_alternating_sizes_reuse_them(mode):
    dynamo.reset()
    counters.clear()
    model = tiny(mode).train()
    compiled = torch.compile(model, backend="aot_eager")  # dynamo's graphs and counters are the backend's input
    x, t, y = inputs()
    for p in (2, 4, 8, 2, 8, 4, 2, 4):  # a schedule that alternates sizes
        out = compiled(x, t, y, patch_size=p)
        if out.requires_grad:  # LoRA: the native path is frozen
            out.square().mean().backward()
    assert counters["frames"]["ok"] == len(model.patch_sizes)  # one compiled graph per size, no recompiles
    assert sum(counters["graph_break"].values()) == 0
    dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_sampling_matches_eager_at_every_patch_size():
    dynamo.reset()
    model = tiny("shared")
    compiled = torch.compile(model)  # inductor: C++ kernels on CPU
    x, t, y = inputs()
    with torch.no_grad():
        for p in (2, 4, 8, 4, 2):
            assert torch.allclose(compiled(x, t, y, patch_size=p), model(x, t, y, patch_size=p), atol=1e-4, rtol=1e-4)
    dynamo.reset()


def test_the_sample_app_switches_compile_and_bf16_and_records_them(tmp_path):
    from flexdit_train.models import export_safetensors
    from flexdit_train.sampling.pipeline import Sampler

    path = export_safetensors(tiny("shared"), tmp_path / "flex.safetensors")
    budget = {"mode": "target", "compute_fraction": 0.6}
    plain = Sampler.from_checkpoint(str(path), budget=budget, steps="ddim4", cfg=1.5, device=torch.device("cpu"))
    assert plain.network is plain.model and plain.precision == "fp32"
    fast = Sampler.from_checkpoint(str(path), budget=budget, steps="ddim4", cfg=1.5, device=torch.device("cpu"),
                                   compile=True, precision="bf16")
    assert fast.network is not fast.model and fast.precision == "bf16"
    labels = torch.arange(2)
    reference = plain.generate(labels, 0, [0, 1])
    dynamo.reset()
    fast.network = torch.compile(fast.model, backend="aot_eager")  # the same wrapper, a backend CPUs build fast
    low = fast.generate(labels, 0, [0, 1])
    assert low.dtype == torch.float32 and low.shape == reference.shape
    assert float((low - reference).norm() / reference.norm()) < 0.1
    dynamo.reset()
    with pytest.raises(ValueError, match="precision='fp16' is not one of"):
        Sampler.from_checkpoint(str(path), budget=budget, steps="ddim4", cfg=1.5, device=torch.device("cpu"),
                                precision="fp16")


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_code_on_cpu_with_a_tiny_model(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(script), "--smoke", "--json", str(out)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("train_eager", "train_compiled", "train_diffusers_compiled", "forward_p2", "forward_p4"):
        assert report[key]["samples_per_s" if key.startswith("train") else "tflops"] > 0, key
    assert report["diffusers_max_rel_diff"] < 0.05  # the same weights: outputs agree up to the timestep sinusoid
    assert report["sample_target"]["compute_fraction"] < 1.0 == report["sample_static"]["compute_fraction"]
    assert report["sampling_speedup"]["flops_bound"] == pytest.approx(1 / report["sample_target"]["compute_fraction"])


def test_bf16_mixed_training_keeps_weights_and_ema_in_fp32():
    from functools import partial

    import lightning as L

    from flexdit_train.data.synthetic import SyntheticDataModule
    from flexdit_train.diffusion import create_diffusion
    from flexdit_train.training.flex_objectives import FlexSharedModule

    module = FlexSharedModule(tiny("shared").train(), create_diffusion(""), partial(torch.optim.AdamW, lr=1e-3),
                              ema_decay=0.5)
    data = SyntheticDataModule(global_batch_size=2, num_workers=0, seed=0, input_size=16, in_channels=4,
                               num_classes=10, val_batches=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    before = {k: v.clone() for k, v in module.ema.state_dict().items()}
    trainer.fit(module, datamodule=data)
    assert all(p.dtype == torch.float32 for p in module.model.parameters())
    assert all(v.dtype == torch.float32 for v in module.ema.state_dict().values())
    assert any(not torch.equal(v, before[k]) for k, v in module.ema.state_dict().items())  # the EMA followed
