"""Analytic compute of DiT forward passes, training steps and patch-size sampling schedules.

Convention (DiT paper): its "Gflops" are multiply-accumulates (MACs) of one forward pass for one image
without CFG; hardware FLOPs are 2 x MACs. Only matmul-like work is counted (linears, the patch conv,
the two attention matmuls); norms, activations, softmax, modulation and residual adds are O(N*D) and
left out, as DiT does. For N tokens of width D, depth L, MLP width H = mlp_ratio * D, patch p:

    MAC = L * (4*N*D^2 + 2*N*D*H + 2*N^2*D + 6*D^2)      blocks: qkv+proj, MLP, attention core, adaLN
        + N*p^2*C_in*D + N*D*p^2*C_out                  patchify conv, final linear (unpatchify)
        + 2*D^2 + 256*D + D^2                           final adaLN, timestep MLP

This reproduces the DiT paper table (XL/2 at 256 px: 118.6 GMAC). Each term is an entry of
:data:`DIT_TERMS`; pass ``extra_terms`` to count more (e.g. cross-attention of a text-conditioned DiT).

CLI: ``python -m flexdit_train.flops --model DiT-XL/2 --image-size 256 --json``; add ``--steps T`` and
``--powerful-steps x [--powerful-steps-guidance y]`` or ``--budget-fraction F`` for a sampling schedule.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flexdit_train.budget import BudgetSchedule, for_target, from_powerful_steps, static
from flexdit_train.models.dit import DIT_SIZES, DiT_models, check_patch_divides, to_2tuple

# Width of the sinusoidal timestep features fed to the timestep MLP (TimestepEmbedder).
FREQUENCY_EMBEDDING_SIZE = 256
# Keys a config mapping needs (plus ``input_size`` when no latent size is given); DiT.config has them all.
_CONFIG_KEYS = ("depth", "hidden_size", "patch_size", "in_channels", "mlp_ratio", "learn_sigma")


@dataclass(frozen=True)
class ForwardShape:
    """Sizes one forward pass for one image depends on."""

    depth: int
    width: int
    mlp_hidden: int
    tokens: int
    patch_size: int
    in_channels: int
    out_channels: int
    lora_rank: int = 0


Term = Callable[[ForwardShape], int]

DIT_TERMS: Mapping[str, Term] = {
    # qkv (3ND^2) and attention output projection (ND^2) plus the two MLP linears (2NDH), every block
    "linear": lambda s: s.depth * s.tokens * (4 * s.width**2 + 2 * s.width * s.mlp_hidden),
    # QK^T and softmax(.)V: N^2 D each, independent of the head count
    "attention": lambda s: s.depth * 2 * s.tokens**2 * s.width,
    # adaLN-Zero modulation D -> 6D runs once per image, not per token
    "adaln": lambda s: s.depth * 6 * s.width**2,
    "patchify": lambda s: s.tokens * s.patch_size**2 * s.in_channels * s.width,
    "unpatchify": lambda s: s.tokens * s.width * s.patch_size**2 * s.out_channels,
    "final_adaln": lambda s: 2 * s.width**2,
    "timestep_mlp": lambda s: FREQUENCY_EMBEDDING_SIZE * s.width + s.width**2,
    # Unmerged LoRA A (d_in -> r) and B (r -> d_out) on qkv, proj, fc1 and fc2 of every block:
    # N*r*(d_in + d_out) each, i.e. (D + 3D) + (D + D) + (D + H) + (H + D).
    "lora": lambda s: s.depth * s.tokens * s.lora_rank * (8 * s.width + 2 * s.mlp_hidden),
}


def registry_config(name: str, input_size: int | Sequence[int] = 32) -> dict[str, Any]:
    """Config of a registered DiT (e.g. "DiT-XL/2"), equal to ``create_model(name).config``'s shape keys.

    Built from ``DIT_SIZES`` instead of instantiating the model, which takes ~1 s even on the meta device.
    """
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(DiT_models)}")
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden, heads = DIT_SIZES[size]
    # The registry factories' defaults: 4 latent channels, learned sigma (8 outputs), MLP ratio 4.
    return dict(
        input_size=list(to_2tuple(input_size)),
        patch_size=int(patch),
        in_channels=4,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        learn_sigma=True,
    )


def resolve_config(model: Any) -> dict[str, Any]:
    """A DiT (anything with a ``config`` dict), such a dict, or a registry name -> config dict."""
    if isinstance(model, str):
        return registry_config(model)
    config = getattr(model, "config", model)
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a DiT, its config dict or a model name, got {type(model).__name__}")
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"model config lacks {missing}; pass a DiT, DiT.config or a name from DiT_models")
    return dict(config)


def forward_shape(
    model: Any,
    latent_hw: int | Sequence[int] | None = None,
    patch_size: int | None = None,
    lora_rank: int = 0,
) -> ForwardShape:
    """Shape of one forward: ``latent_hw`` defaults to the model's input size, ``patch_size`` to its own."""
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0 = no or merged adapters), got {lora_rank}")
    config = resolve_config(model)
    p = patch_size or config["patch_size"]
    h, w = to_2tuple(config["input_size"] if latent_hw is None else latent_hw)
    check_patch_divides((h, w), p)
    width, in_channels = config["hidden_size"], config["in_channels"]
    return ForwardShape(
        depth=config["depth"],
        width=width,
        mlp_hidden=int(width * config["mlp_ratio"]),  # as Mlp is built in DiTBlock
        tokens=(h // p) * (w // p),
        patch_size=p,
        in_channels=in_channels,
        out_channels=2 * in_channels if config["learn_sigma"] else in_channels,
        lora_rank=lora_rank,
    )


def macs_breakdown(
    model: Any,
    latent_hw: int | Sequence[int] | None = None,
    patch_size: int | None = None,
    lora_rank: int = 0,
    extra_terms: Mapping[str, Term] | None = None,
) -> dict[str, int]:
    """MACs of one forward for one image, per term of :data:`DIT_TERMS` plus ``extra_terms``."""
    shape = forward_shape(model, latent_hw, patch_size, lora_rank)
    terms = {**DIT_TERMS, **(extra_terms or {})}
    return {name: term(shape) for name, term in terms.items()}


def forward_macs(
    model: Any,
    latent_hw: int | Sequence[int] | None = None,
    patch_size: int | None = None,
    lora_rank: int = 0,
    extra_terms: Mapping[str, Term] | None = None,
) -> int:
    """MACs of one forward for one image (DiT's "Gflops" x 1e9)."""
    return sum(macs_breakdown(model, latent_hw, patch_size, lora_rank, extra_terms).values())


def forward_flops(
    model: Any,
    latent_hw: int | Sequence[int] | None = None,
    patch_size: int | None = None,
    lora_rank: int = 0,
    extra_terms: Mapping[str, Term] | None = None,
) -> int:
    """Hardware FLOPs (multiplies and adds counted separately) of one forward for one image."""
    return 2 * forward_macs(model, latent_hw, patch_size, lora_rank, extra_terms)


def training_step_flops(
    model: Any,
    latent_hw: int | Sequence[int] | None = None,
    patch_size: int | None = None,
    batch_size: int = 1,
    lora_rank: int = 0,
    extra_terms: Mapping[str, Term] | None = None,
) -> int:
    """Hardware FLOPs of one training step: forward + backward ~ 3 forwards per image (DiT's convention)."""
    return 3 * batch_size * forward_flops(model, latent_hw, patch_size, lora_rank, extra_terms)


@dataclass(frozen=True, eq=False)
class CostModel:
    """``patch_size -> MACs`` of one forward for one image at a fixed latent size: the cost budget.py takes.

    ``lora_rank`` models unmerged LoRA adapters on every patch except the native one, which has none
    (FlexiDiT's LoRA flavour); leave it 0 for shared weights or merged adapters.
    """

    config: Mapping[str, Any]
    latent_hw: tuple[int, int]
    lora_rank: int = 0
    extra_terms: Mapping[str, Term] | None = None

    @property
    def native_patch(self) -> int:
        return self.config["patch_size"]

    def __call__(self, patch_size: int) -> int:
        rank = 0 if patch_size == self.native_patch else self.lora_rank
        return forward_macs(self.config, self.latent_hw, patch_size, rank, self.extra_terms)


def cost_model(
    model: Any,
    latent_hw: int | Sequence[int] | None = None,
    lora_rank: int = 0,
    extra_terms: Mapping[str, Term] | None = None,
) -> CostModel:
    """CostModel of a DiT / its config / a registry name at ``latent_hw`` (default: its input size)."""
    config = resolve_config(model)
    hw = to_2tuple(config["input_size"] if latent_hw is None else latent_hw)
    return CostModel(config, hw, lora_rank, extra_terms)


#################################################################################
#                                      CLI                                      #
#################################################################################


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as a single stderr line (exit code 2), like the validation errors below."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    parser.add_argument("--model", default="DiT-XL/2", help=f"registry name, one of {', '.join(DiT_models)}")
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
    lora_rank = 0 if p == config["patch_size"] else args.lora_rank
    macs = forward_macs(config, latent_hw, p, lora_rank)
    return {
        "model": args.model,
        "image_size": _size_json(image_hw),
        "latent_size": _size_json(latent_hw),
        "patch_size": p,
        "tokens": forward_shape(config, latent_hw, p).tokens,
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
    cost = CostModel(config, latent_hw, args.lora_rank)
    for p in (native, weak):
        check_patch_divides(latent_hw, p)
    schedule = _schedule(args, native, weak, cost)
    nfe = schedule.nfe()
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
        "powerful_steps": nfe["cond"].get(native, 0),
        "powerful_steps_guidance": nfe["guidance"].get(native, 0) if schedule.cfg else None,
        "nfe": {branch: {str(p): n for p, n in counts.items()} for branch, counts in nfe.items()},
        "weak_cost_ratio": round(cost(weak) / cost(native), 6),
        "gmacs_per_image": round(macs / 1e9, 3),
        "gflops_per_image": round(2 * macs / 1e9, 3),
        "static_gmacs_per_image": round(reference / 1e9, 3),
        "compute_fraction": round(macs / reference, 6),
        "describe": schedule.describe(),
    }


def _report_line(report: dict[str, Any]) -> str:
    size = "x".join(map(str, to_2tuple(report["image_size"])))
    latent = "x".join(map(str, to_2tuple(report["latent_size"])))
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
        report = forward_report(args) if args.steps is None else schedule_report(args)
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else _report_line(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
