"""FLOPs app: ``python -m flexdit_train.flops --model DiT-XL/2 --image-size 256 --json``.

Prints the analytic MACs of one forward of a registered preset of any arch (DiT-XL/2, EDT-XL/2, ...: DiT's
"Gflops") or, with ``--steps T`` and
``--powerful-steps x [--powerful-steps-guidance y]`` or ``--budget-fraction F``, the compute of a sampling
schedule per image and as a share of static sampling (:mod:`flexdit_train.flops.cost`).

A SparseDiT (SparseDiT-XL/2) costs by its sparse grid: ``gmacs`` is one forward averaged over the steps of its
temporal density schedule (``--steps``, default 250; ``--min-grid``/``--max-grid``/``--hold-fraction``, default
the model's range and 0.25), with the figures per grid and per step, or one grid's with ``--sparse-grid S``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from flexdit_train.flops.cost import CostModel, registry_arch, registry_config
from flexdit_train.models.arch import ARCHS
from flexdit_train.models.dit import check_patch_divides, to_2tuple
from flexdit_train.sampling.schedule import (
    BudgetSchedule,
    SparseDensity,
    for_target,
    from_powerful_steps,
    static,
)

# Sampling steps the density schedule of a SparseDiT is averaged over by default: DiT's 250-step DDPM (the FID
# protocol of DiT and SparseDiT), where the 6x6 -> 10x10 schedule of SparseDiT-XL/2 averages 68.05 GMAC.
DENSITY_STEPS = 250

#################################################################################
#                                      CLI                                      #
#################################################################################


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as a single stderr line (exit code 2), like the validation errors below."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _size(text: str) -> tuple[int, int]:
    try:
        values = [_positive_int(v) for v in text.split(",")]
        return to_2tuple(values[0] if len(values) == 1 else values)
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected N or H,W with positive ints, got {text!r}") from None


def _build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m flexdit_train.flops",
        description="Analytic DiT compute: MACs per forward (DiT's 'Gflops') or per image of a schedule.",
    )
    names = [name for arch in ARCHS.values() for name in arch.presets]
    parser.add_argument("--model", default="DiT-XL/2", help=f"registry name, one of {', '.join(names)}")
    parser.add_argument("--image-size", type=_size, default=(256, 256), help="pixels, N or H,W (default 256)")
    parser.add_argument("--latent-size", type=_size, help="latent cells, N or H,W; overrides --image-size")
    parser.add_argument(
        "--vae-factor", type=_positive_int, default=8, help="pixels per latent cell (SD VAE: 8)"
    )
    parser.add_argument(
        "--patch-size",
        type=_positive_int,
        help="patch to count (schedule mode: the native patch); default the model's",
    )
    parser.add_argument(
        "--lora-rank", type=int, default=0, help="rank of unmerged LoRA adapters on non-native patches"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    schedule = parser.add_argument_group("sampling schedule (enabled by --steps)")
    schedule.add_argument("--steps", type=_positive_int, help="sampling steps T")
    schedule.add_argument("--weak-patch-size", type=_positive_int, help="weak patch (default 2x native)")
    schedule.add_argument(
        "--powerful-steps", type=int, help="x: native patch for the last x conditional steps"
    )
    schedule.add_argument(
        "--powerful-steps-guidance", type=int, help="y: same for the guidance branch (default x)"
    )
    schedule.add_argument(
        "--budget-fraction", type=float, help="solve x = y for this share of the static FLOPs"
    )
    schedule.add_argument("--no-cfg", action="store_true", help="no guidance branch")
    sparse = parser.add_argument_group("SparseDiT token density (--steps T: steps averaged, default 250)")
    sparse.add_argument("--sparse-grid", type=_positive_int, help="price this one sparse grid side instead")
    sparse.add_argument("--min-grid", type=_positive_int, help="smallest sparse grid side (default the model's)")
    sparse.add_argument("--max-grid", type=_positive_int, help="largest sparse grid side (default the model's)")
    sparse.add_argument("--hold-fraction", type=float, help="share of steps at the smallest grid (default 0.25)")
    return parser


def _size_json(hw: tuple[int, int]) -> int | list[int]:
    return hw[0] if hw[0] == hw[1] else list(hw)


def _sizes(args: argparse.Namespace) -> tuple[tuple[int, int], tuple[int, int]]:
    """(image size, latent size) from --image-size / --latent-size / --vae-factor."""
    f = args.vae_factor
    if args.latent_size is not None:
        return (args.latent_size[0] * f, args.latent_size[1] * f), args.latent_size
    if args.image_size[0] % f or args.image_size[1] % f:
        size = "x".join(map(str, args.image_size))
        raise ValueError(f"image size {size} is not a multiple of --vae-factor {f}; pass --latent-size")
    return args.image_size, (args.image_size[0] // f, args.image_size[1] // f)


def forward_report(args: argparse.Namespace) -> dict[str, Any]:
    schedule_flags = (
        args.weak_patch_size,
        args.powerful_steps,
        args.powerful_steps_guidance,
        args.budget_fraction,
    )
    if args.no_cfg or any(v is not None for v in schedule_flags):
        raise ValueError("the sampling-schedule options need --steps T")
    image_hw, latent_hw = _sizes(args)
    config = registry_config(args.model, latent_hw)
    p = args.patch_size or config["patch_size"]
    # LoRA adapters exist for every patch but the model's own, so the cost model keys on the model's patch.
    cost = CostModel(config, latent_hw, registry_arch(args.model).cost_terms, args.lora_rank)
    macs = cost(p)
    return {
        "model": args.model,
        "image_size": _size_json(image_hw),
        "latent_size": _size_json(latent_hw),
        "patch_size": p,
        "tokens": cost.shape(p).tokens,
        "gmacs": round(macs / 1e9, 4),
        "gflops": round(2 * macs / 1e9, 4),
    }


def _schedule(args: argparse.Namespace, native: int, weak: int, cost: CostModel) -> BudgetSchedule:
    cfg = not args.no_cfg
    if args.budget_fraction is not None:
        if args.powerful_steps is not None or args.powerful_steps_guidance is not None:
            raise ValueError("--budget-fraction solves for the powerful steps; drop --powerful-steps*")
        return for_target(args.budget_fraction, args.steps, native, weak, cost, cfg)
    if args.powerful_steps is None:
        if args.powerful_steps_guidance is not None:
            raise ValueError("--powerful-steps-guidance needs --powerful-steps")
        return static(args.steps, native, cfg)
    if args.no_cfg and args.powerful_steps_guidance is not None:
        raise ValueError("--powerful-steps-guidance has no effect with --no-cfg; drop one of them")
    return from_powerful_steps(
        args.steps, native, weak, args.powerful_steps, args.powerful_steps_guidance, cfg
    )


def schedule_report(args: argparse.Namespace) -> dict[str, Any]:
    image_hw, latent_hw = _sizes(args)
    config = registry_config(args.model, latent_hw)
    native = args.patch_size or config["patch_size"]
    weak = args.weak_patch_size or 2 * native
    # LoRA adapters exist for every patch but the model's own, so the cost model keys on the model's patch.
    cost = CostModel(config, latent_hw, registry_arch(args.model).cost_terms, args.lora_rank)
    for p in (native, weak):
        check_patch_divides(latent_hw, p)
    schedule = _schedule(args, native, weak, cost)
    nfe, powerful = schedule.nfe(), schedule.powerful_steps()
    macs, reference = schedule.macs(cost), schedule.reference_macs(cost)
    return {
        "model": args.model,
        "image_size": _size_json(image_hw),
        "latent_size": _size_json(latent_hw),
        "native_patch": native,
        "weak_patch": weak,
        "steps": schedule.num_steps,
        "cfg": schedule.cfg,
        "schedule": schedule.name,
        "powerful_steps": powerful["cond"],
        "powerful_steps_guidance": powerful.get("guidance"),
        "nfe": {branch: {str(p): n for p, n in counts.items()} for branch, counts in nfe.items()},
        "weak_cost_ratio": round(cost(weak) / cost(native), 6),
        "gmacs_per_image": round(macs / 1e9, 3),
        "gflops_per_image": round(2 * macs / 1e9, 3),
        "static_gmacs_per_image": round(reference / 1e9, 3),
        "compute_fraction": round(macs / reference, 6),
        "describe": schedule.describe(),
    }


def sparse_report(args: argparse.Namespace) -> dict[str, Any]:
    """A SparseDiT's forward: averaged over its density schedule's steps, or at one ``--sparse-grid``."""
    schedule_flags = (args.weak_patch_size, args.powerful_steps, args.powerful_steps_guidance, args.budget_fraction)
    if args.no_cfg or any(v is not None for v in schedule_flags):
        raise ValueError(f"{args.model} has one patch size; its compute varies with the sparse grid "
                         "(--sparse-grid, --min-grid, --max-grid, --hold-fraction, --steps)")
    image_hw, latent_hw = _sizes(args)
    config = registry_config(args.model, latent_hw)
    p = args.patch_size or config["patch_size"]
    cost = CostModel(config, latent_hw, registry_arch(args.model).cost_terms)
    dense = cost.reference(p)
    report = {
        "model": args.model,
        "image_size": _size_json(image_hw),
        "latent_size": _size_json(latent_hw),
        "patch_size": p,
        "tokens": cost.shape(p).tokens,
        "dense_gmacs": round(dense / 1e9, 4),  # the DiT of the same width and depth it is converted from
        "fixed_grid": config["sparse_grid"],
        "fixed_grid_gmacs": round(cost(p) / 1e9, 4),
    }
    if args.sparse_grid is not None:
        macs = cost(p, sparse_grid=args.sparse_grid)
        report.update(sparse_grid=args.sparse_grid)
    else:
        density = SparseDensity.of_model(config, args.min_grid, args.max_grid, args.hold_fraction)
        grids = density.grids(args.steps or DENSITY_STEPS)
        per_grid = {g: cost(p, sparse_grid=g) for g in sorted(set(grids))}
        macs = sum(per_grid[g] for g in grids) / len(grids)
        report.update(
            density={"min_grid": density.min_grid, "max_grid": density.max_grid,
                     "hold_fraction": density.hold_fraction, "steps": len(grids)},
            gmacs_per_grid={str(g): round(m / 1e9, 4) for g, m in per_grid.items()},
            grid_per_step=list(grids),
            gmacs_per_step=[round(per_grid[g] / 1e9, 4) for g in grids],
        )
    report.update(gmacs=round(macs / 1e9, 4), gflops=round(2 * macs / 1e9, 4), dense_fraction=round(macs / dense, 6))
    return report


def _report_line(report: dict[str, Any]) -> str:
    size = "x".join(map(str, to_2tuple(report["image_size"])))
    latent = "x".join(map(str, to_2tuple(report["latent_size"])))
    if "dense_gmacs" in report:
        how = (f"sparse grid {report['sparse_grid']}" if "sparse_grid" in report else
               "density {min_grid} -> {max_grid} over {steps} steps".format(**report["density"]))
        return (
            f"{report['model']} at {size} px (latent {latent}, {report['tokens']} tokens), {how}: "
            f"{report['gmacs']:.2f} GMACs per forward, {report['dense_fraction']:.1%} of the dense DiT's "
            f"{report['dense_gmacs']:.2f}"
        )
    if "compute_fraction" not in report:
        return (
            f"{report['model']} at {size} px (latent {latent}, patch {report['patch_size']}): "
            f"{report['tokens']} tokens, {report['gmacs']:.2f} GMACs (DiT 'Gflops'), "
            f"{report['gflops']:.2f} GFLOPs per forward"
        )
    return (
        f"{report['model']} at {size} px, {report['describe']}: {report['compute_fraction']:.1%} of static "
        f"({report['gmacs_per_image']:.1f} of {report['static_gmacs_per_image']:.1f} GMACs per image, "
        f"weak/native cost {report['weak_cost_ratio']:.3f})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        sparse_flags = (args.sparse_grid, args.min_grid, args.max_grid, args.hold_fraction)
        if registry_arch(args.model).name == "sparse_dit":
            report = sparse_report(args)
        elif any(v is not None for v in sparse_flags):
            raise ValueError(f"--sparse-grid, --min-grid, --max-grid and --hold-fraction price a SparseDiT, not {args.model}")
        else:
            report = forward_report(args) if args.steps is None else schedule_report(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else _report_line(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
