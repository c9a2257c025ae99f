"""The GPU path in one script, a few minutes on one GPU: training MFU, ours vs diffusers, weak vs native
throughput, sampling speed-up under a budget, peak memory.

    python benchmarks/gpu.py [--json gpu.json] [--batch 64] [--peak-tflops 989]
    python benchmarks/gpu.py --smoke        # the same code on CPU with a tiny model (run by the test suite)

Measured, each with its peak memory:

1. **training step** of DiT-XL/2 (256 px, 32x32x4 latents, AdamW, bf16 autocast), eager and
   ``torch.compile``: samples/s and MFU = achieved FLOPs / the GPU's dense bf16 peak, the FLOPs being the
   analytic 3x-forward count of ``flexdit_train.flops`` (DiT's convention);
2. the same step of diffusers' ``DiTTransformer2DModel`` holding the same weights (our key mapping below)
   and batch, compiled: the ratio ours / diffusers;
3. **forward TFLOP/s** of the flexified model at the native patch 2 and the weak patch 4 (bf16, compiled,
   batch >= 64): the weak patch should stay compute bound (>= 80% of the native TFLOP/s);
4. **sampling** of a batch with DDIM-50 and CFG at 100% compute and at the 50% target budget (bf16, compiled):
   the wall-clock speed-up against the FLOPs bound 1 / compute fraction.

Timings synchronise the device and take the median of ``--iters`` after ``--warmup`` runs; compile warm-up
(one graph per patch size) is excluded and reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from flexdit_train.flops import cost_model
from flexdit_train.models import DiT, DiT_models, flexify
from flexdit_train.sampling.pipeline import Sampler

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by the name torch reports.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0,
               "RTX 4090": 165.2}


def device_peak(device: torch.device, override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", override
    name = torch.cuda.get_device_name(device)
    peak = override or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return name, peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """(median seconds per call, seconds of the first call, which includes any compilation)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def to_diffusers(model: DiT):
    """diffusers' ``DiTTransformer2DModel`` with ``model``'s weights (official DiT layout -> diffusers keys).

    diffusers gives every block its own copy of the timestep and label embedders (``norm1.emb``); its
    timestep sinusoid uses a frequency shift of 1 where DiT uses 0, so outputs agree closely, not exactly
    (what matters here is that both run the same shapes and amount of work)."""
    from diffusers import DiTTransformer2DModel

    c = model.config
    heads = c["num_heads"]
    out = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=c["hidden_size"] // heads, in_channels=c["in_channels"],
        out_channels=model.out_channels, num_layers=c["depth"], sample_size=c["input_size"][0],
        patch_size=c["patch_size"], num_embeds_ada_norm=c["num_classes"],
    )
    src = model.state_dict()
    state = {"pos_embed.proj.weight": src["x_embedder.proj.weight"], "pos_embed.proj.bias": src["x_embedder.proj.bias"],
             "proj_out_1.weight": src["final_layer.adaLN_modulation.1.weight"],
             "proj_out_1.bias": src["final_layer.adaLN_modulation.1.bias"],
             "proj_out_2.weight": src["final_layer.linear.weight"], "proj_out_2.bias": src["final_layer.linear.bias"]}
    for i in range(c["depth"]):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = d + "norm1.emb."
        for j, k in ((0, "linear_1"), (2, "linear_2")):
            for p in ("weight", "bias"):
                state[f"{emb}timestep_embedder.{k}.{p}"] = src[f"t_embedder.mlp.{j}.{p}"]
        state[emb + "class_embedder.embedding_table.weight"] = src["y_embedder.embedding_table.weight"]
        for p in ("weight", "bias"):
            state[f"{d}norm1.linear.{p}"] = src[f"{b}adaLN_modulation.1.{p}"]
            q, k, v = src[f"{b}attn.qkv.{p}"].chunk(3)
            state[f"{d}attn1.to_q.{p}"], state[f"{d}attn1.to_k.{p}"], state[f"{d}attn1.to_v.{p}"] = q, k, v
            state[f"{d}attn1.to_out.0.{p}"] = src[f"{b}attn.proj.{p}"]
            state[f"{d}ff.net.0.proj.{p}"] = src[f"{b}mlp.fc1.{p}"]
            state[f"{d}ff.net.2.{p}"] = src[f"{b}mlp.fc2.{p}"]
    missing, unexpected = out.load_state_dict(state, strict=False)
    learned = [k for k in missing if not k.endswith("pos_embed")]  # diffusers' fixed sin-cos table is a buffer
    if learned or unexpected:
        raise RuntimeError(f"DiT -> diffusers mapping incomplete: missing {learned[:5]}, unexpected {unexpected[:5]}")
    return out


def training_step(net, forward: Callable, batch: int, latent: tuple[int, ...], classes: int, device, precision: str):
    """A closure running one AdamW step of ``forward(x, t, y)`` on random data (bf16 autocast on request)."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(batch, *latent, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    target = torch.randn_like(x)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = forward(x, t, y)
        loss = F.mse_loss(out[:, : latent[0]].float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def diffusers_step(model: DiT, args, latent, classes: int, device, precision: str, compile_) -> dict:
    """Section 2: diffusers' DiT on ``model``'s weights, the same compiled training step (its own function so the
    second model is freed on return, before the flexible one is built)."""
    theirs = to_diffusers(model.cpu()).to(device)
    model.to(device)
    with torch.no_grad():
        x = torch.randn(2, *latent, device=device)
        t = torch.tensor([10, 500], device=device)
        y = torch.tensor([1, 2], device=device)
        ours_out, theirs_out = model(x, t, y), theirs(x, t, y).sample
    compiled = compile_(theirs)
    seconds, first = timed(training_step(theirs, lambda x, t, y: compiled(x, t, y).sample, args.batch, latent,
                                         classes, device, precision), device, args.warmup, args.iters)
    return {"diffusers_max_rel_diff": float((ours_out - theirs_out).norm() / ours_out.norm()),
            "train_diffusers_compiled": {"samples_per_s": args.batch / seconds, "step_s": seconds,
                                         "first_step_s": first, "peak_memory_gib": peak_memory(device)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny model, few iterations: checks the code")
    parser.add_argument("--batch", type=int, default=64, help="training and forward batch (>= 64 for TFLOP/s)")
    parser.add_argument("--sample-batch", type=int, default=32)
    parser.add_argument("--sampling-steps", default="ddim50")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, if the GPU is not known")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; aot_eager with --smoke: no C++ builds on CPU)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    if args.smoke:
        device, precision = torch.device("cpu"), "fp32"  # bf16 matmuls crawl on CPUs
        model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
        with torch.no_grad():  # a fresh DiT outputs zeros (adaLN-Zero): give the comparison something to compare
            for param_name, param in model.named_parameters():
                if "adaLN_modulation" in param_name or "final_layer.linear" in param_name:
                    param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        args.batch, args.sample_batch, args.warmup, args.iters, args.sampling_steps = 4, 2, 1, 2, "ddim4"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device; run on a GPU, or pass --smoke to check the code on CPU")
        device, precision = torch.device("cuda"), "bf16"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        model = DiT_models["DiT-XL/2"](input_size=32)
    torch.manual_seed(0)
    model = model.to(device)
    name, peak = device_peak(device, args.peak_tflops)
    backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    compile_ = lambda m: torch.compile(m, backend=backend)
    cost = cost_model(model)
    latent = (model.in_channels, *model.input_size)
    classes = model.num_classes
    result: dict = {"device": name, "precision": precision, "compile_backend": backend, "torch": torch.__version__,
                    "peak_tflops": peak,
                    "model": "tiny" if args.smoke else "DiT-XL/2", "batch": args.batch}

    # 1. training step, eager and compiled
    step_flops = cost.training_flops(model.native_patch_size, args.batch)
    for compiled in (False, True):
        reset_memory(device)
        net = compile_(model) if compiled else model
        seconds, first = timed(training_step(model, net, args.batch, latent, classes, device, precision), device,
                               args.warmup, args.iters)
        tflops = step_flops / seconds / 1e12
        result[f"train_{'compiled' if compiled else 'eager'}"] = {
            "samples_per_s": args.batch / seconds, "step_s": seconds, "first_step_s": first, "tflops": tflops,
            "mfu": tflops / peak if peak else None, "peak_memory_gib": peak_memory(device)}

    # 2. diffusers on the same weights and batch, compiled
    reset_memory(device)
    result.update(diffusers_step(model, args, latent, classes, device, precision, compile_))
    result["ours_vs_diffusers"] = result["train_compiled"]["samples_per_s"] / result["train_diffusers_compiled"]["samples_per_s"]

    # 3. forward throughput at the native and the weak patch
    native = model.native_patch_size
    flex = flexify(model, patch_sizes=(native, 2 * native), mode="shared").eval()
    flex_cost = cost_model(flex)
    compiled_flex = compile_(flex)
    x = torch.randn(args.batch, *latent, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    y = torch.randint(0, classes, (args.batch,), device=device)
    for patch in (native, 2 * native):
        reset_memory(device)

        def forward(p: int = patch) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                compiled_flex(x, t, y, patch_size=p)

        seconds, first = timed(forward, device, args.warmup, args.iters)
        result[f"forward_p{patch}"] = {"tflops": args.batch * flex_cost.flops(patch) / seconds / 1e12,
                                       "seconds": seconds, "first_s": first, "peak_memory_gib": peak_memory(device)}
    result["weak_vs_native_tflops"] = result[f"forward_p{2 * native}"]["tflops"] / result[f"forward_p{native}"]["tflops"]

    # 4. sampling: 100% vs the 50% target budget
    labels = torch.arange(args.sample_batch) % classes
    for budget in ({"mode": "static"}, {"mode": "target", "compute_fraction": 0.5}):
        reset_memory(device)
        sampler = Sampler.for_model(flex, budget, args.sampling_steps, args.cfg_scale)
        sampler.network, sampler.precision = compiled_flex, precision
        seconds, first = timed(lambda s=sampler: s.generate(labels.to(device), 0, list(range(args.sample_batch))),
                               device, 1, max(1, args.iters // 3))
        fraction = sampler.schedule.compute_fraction(sampler.cost)
        result[f"sample_{budget['mode']}"] = {"compute_fraction": fraction, "seconds": seconds, "first_s": first,
                                              "peak_memory_gib": peak_memory(device)}
    static, target = result["sample_static"], result["sample_target"]
    speedup, bound = static["seconds"] / target["seconds"], 1.0 / target["compute_fraction"]
    result["sampling_speedup"] = {"speedup": speedup, "flops_bound": bound, "share_of_bound": speedup / bound}

    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
