"""Wall-clock of flexible sampling under a compute budget vs the static schedule.

    python benchmarks/flex_sampling.py [--budget 0.5] [--steps 20] [--batch 8] [--threads 2] [--device cpu]

A DiT-S/2-sized flexible model (12 blocks, width 384, 6 heads; 32x32x4 latents: 256 tokens at patch 2,
64 at patch 4) samples the same batch with the same DDIM steps and CFG twice: every step native, and
with the schedule the FLOPs model solves for ``--budget``. Reports seconds, the measured speed-up, the
FLOPs bound (1 / compute fraction) and their ratio, as JSON. Weights are random (speed does not depend
on them); adaLN-Zero layers get values so the computation is not trivially zero.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flexdit_train.diffusion import create_diffusion
from flexdit_train.flops import cost_model
from flexdit_train.models import DiT_models, flexify
from flexdit_train.sampling import generate
from flexdit_train.sampling.schedule import for_target, static


def build_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=32, num_classes=1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.02)
    return flexify(model, patch_sizes=(2, 4), mode="shared").to(device).eval()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.5, help="target compute fraction")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--batch", type=int, default=8, help="images per batch (CFG doubles the forward batch)")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per schedule (best is kept)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(device)
    diffusion = create_diffusion(f"ddim{args.steps}")
    cost = cost_model(model)
    schedules = {
        "static": static(args.steps, 2),
        "budget": for_target(args.budget, args.steps, 2, 4, cost),
    }
    labels = torch.arange(args.batch) % 1000

    def sample(schedule) -> None:
        generate(model, diffusion, labels, 0, range(args.batch), cond_patch_sizes=schedule.cond_patch_sizes,
                 guidance_patch_sizes=schedule.guidance_patch_sizes, cfg_scale=args.cfg_scale)

    sample(schedules["budget"])  # warm-up: allocator, projection caches
    seconds = {name: min(timed(lambda s=s: sample(s), device) for _ in range(args.repeats))
               for name, s in schedules.items()}
    fraction = schedules["budget"].compute_fraction(cost)
    speedup = seconds["static"] / seconds["budget"]
    bound = 1.0 / fraction
    print(json.dumps({
        "model": "DiT-S/2 (flexified, patches 2/4)", "device": str(device), "threads": args.threads,
        "steps": args.steps, "batch": args.batch, "cfg_scale": args.cfg_scale,
        "schedule": schedules["budget"].describe(), "compute_fraction": round(fraction, 4),
        "seconds_static": round(seconds["static"], 3), "seconds_budget": round(seconds["budget"], 3),
        "speedup": round(speedup, 3), "flops_bound": round(bound, 3), "fraction_of_bound": round(speedup / bound, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
