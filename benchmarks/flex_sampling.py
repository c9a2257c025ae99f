"""Wall-clock of flexible sampling under a compute budget (and block caching) vs the static schedule.

    python benchmarks/flex_sampling.py [--budget 0.5] [--cache fora_n3] [--steps 20] [--batch 8] [--threads 2]
        [--device cpu]

A DiT-S/2-sized flexible model (12 blocks, width 384, 6 heads; 32x32x4 latents: 256 tokens at patch 2,
64 at patch 4) samples the same batch with the same DDIM steps and CFG: every step native, with the
schedule the FLOPs model solves for ``--budget`` and, with ``--cache PRESET`` (conf/cache/), the static and
the budget schedule with that block caching. Reports per schedule the seconds, the measured speed-up, the
FLOPs bound (1 / compute fraction) and their ratio, as JSON. Runs are interleaved (each repeat times every
schedule once) and the best of ``--repeats`` is kept, so a busy machine slows every schedule alike. Weights
are random (speed does not depend on them); adaLN-Zero layers get values so the computation is not
trivially zero.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from flexdit_train import CONF_DIR
from flexdit_train.diffusion import create_diffusion
from flexdit_train.flops import cost_model
from flexdit_train.models import DiT_models, flexify
from flexdit_train.sampling import generate
from flexdit_train.sampling.cache import CachePolicy
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
    parser.add_argument("--cache", default=None, help="a conf/cache preset (fora_n3, taylorseer_o2_n5, ...)")
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
    if args.cache:
        policy = CachePolicy.from_config(OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "cache" / f"{args.cache}.yaml")))
        schedules["cache"] = schedules["static"].with_cache(policy, len(model.blocks))
        schedules["budget+cache"] = schedules["budget"].with_cache(policy, len(model.blocks))
    labels = torch.arange(args.batch) % 1000

    def sample(schedule) -> None:
        generate(model, diffusion, labels, 0, range(args.batch), cond_patch_sizes=schedule.cond_patch_sizes,
                 guidance_patch_sizes=schedule.guidance_patch_sizes, cfg_scale=args.cfg_scale,
                 block_plan=schedule.block_plan)

    sample(schedules["budget"])  # warm-up: allocator, projection caches
    times: dict[str, list[float]] = {name: [] for name in schedules}
    for _ in range(args.repeats):
        for name, schedule in schedules.items():
            times[name].append(timed(lambda s=schedule: sample(s), device))
    seconds = {name: min(t) for name, t in times.items()}
    rows = {}
    for name, schedule in schedules.items():
        fraction = schedule.compute_fraction(cost)
        speedup, bound = seconds["static"] / seconds[name], 1.0 / fraction
        rows[name] = {"schedule": schedule.describe(), "compute_fraction": round(fraction, 4),
                      "seconds": round(seconds[name], 3), "speedup": round(speedup, 3), "flops_bound": round(bound, 3),
                      "fraction_of_bound": round(speedup / bound, 3)}
    print(json.dumps({
        "model": "DiT-S/2 (flexified, patches 2/4)", "device": str(device), "threads": args.threads,
        "steps": args.steps, "batch": args.batch, "cfg_scale": args.cfg_scale, "repeats": args.repeats,
        "schedules": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
