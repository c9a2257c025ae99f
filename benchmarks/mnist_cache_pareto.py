"""Patch schedules, block caching and both together on the bundled MNIST digits: FID and wall-clock against compute.

    python benchmarks/mnist_cache_pareto.py [--run-name NAME] [--num-samples 1000] [--seeds 0 1 2]
        [--steps ddim20] [--patch-fractions 0.6 0.45 0.35] [--caches fora_n2 fora_n3 taylorseer_o1_n3]
        [--combined 0.6:fora_n2 0.45:fora_n2 0.6:taylorseer_o1_n3] [--flex CHECKPOINT] [--json out.json]
        [--process flow]

From the shipped teacher (a DDPM-trained static DiT, ``--teacher`` for another) it LoRA-flexifies a flexible
model with ``make train``'s recipe (``+experiment=mnist_flex_lora trainer.max_steps=800
objective.ema_decay=0.99``; ``--flex`` reuses one), then scores with ``flexdit_train.evaluate`` (held-out val
digits, MNIST-classifier FID, ``--seeds``):

- the teacher (100%);
- **patch only**: the flexible model at each ``--patch-fractions`` (weak steps first, at most the fraction);
- **cache only**: the teacher with each ``--caches`` preset (conf/cache/);
- **combined**: the flexible model at ``FRACTION:CACHE`` (the patch schedule of the fraction, then the cache).

``--process flow`` does the same from the shipped flow-matching teacher (``mnist_flow_teacher.safetensors``) with its
LoRA recipe (``+experiment=mnist_flow_flex_lora``) and Euler-20 sampling.

It prints a table (compute fraction, FID mean +- std, label accuracy, seconds per image) with each setting's
Pareto status, and for every combined setting the best patch-only and cache-only FID at no more compute, and
writes ``pareto.png`` (FID vs compute, seed error bars, one line per family). Results accumulate in
``outputs/mnist_cache_pareto/<run-name>``; rerunning skips what is scored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_flex_repro import ROOT, TEACHERS, train  # noqa: E402  (the benchmarks directory is not a package)

from flexdit_train.demo import run_stage  # noqa: E402
from flexdit_train.evaluation.report import (  # noqa: E402
    metric_column,
    plot_fid_vs_compute,
    read_table,
    seed_statistics,
)
from flexdit_train.runtime.resolvers import asset_path  # noqa: E402

LORA_RECIPES = {"ddpm": ["+experiment=mnist_flex_lora", "trainer.max_steps=800", "objective.ema_decay=0.99"],
                "flow": ["+experiment=mnist_flow_flex_lora"]}
DEFAULT_STEPS = {"ddpm": "ddim20", "flow": "euler20"}


def evaluate(args: argparse.Namespace, run_dir: Path, label: str, checkpoint: Path, overrides: list[str]) -> None:
    """One evaluate sweep over the seeds, unless its label's sweep directory finished."""
    sweep = run_dir / "evals" / label
    if (sweep / "done").exists():
        return
    run_stage(f"evaluate {label}", "flexdit_train.evaluate", [
        "-m", "eval=mnist", "eval.reference=mnist:val", f"eval.num_samples={args.num_samples}",
        f"eval.sampling_steps={args.steps}", f"batch_size={args.batch_size}", f"results_dir={run_dir}",
        f"checkpoint={checkpoint}", *overrides, f"seed={','.join(str(s) for s in args.seeds)}",
        f"hydra.sweep.dir={sweep}",
    ], args.threads)
    (sweep / "done").write_text("")


def family(order: str) -> str:
    """patch / cache / combined / static from a results row's schedule order ("weak_first+fora", ...)."""
    patches, _, cache = str(order).partition("+")
    if cache:
        return "cache" if patches == "static" else "combined"
    return "static" if patches == "static" else "patch"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-name", default="default")
    parser.add_argument("--process", choices=sorted(LORA_RECIPES), default="ddpm",
                        help="the teacher's process: picks the default teacher, LoRA recipe and sampler")
    parser.add_argument("--teacher", type=Path, default=None, help="default: the shipped teacher of --process")
    parser.add_argument("--flex", type=Path, default=None, help="a flexible checkpoint instead of training one")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", default=None, help="default: ddim20, flow: euler20")
    parser.add_argument("--patch-fractions", type=float, nargs="*", default=[0.6, 0.45, 0.35])
    parser.add_argument("--caches", nargs="*", default=["fora_n2", "fora_n3", "taylorseer_o1_n3"])
    parser.add_argument("--combined", nargs="*", default=["0.6:fora_n2", "0.45:fora_n2", "0.6:taylorseer_o1_n3"],
                        help="FRACTION:CACHE settings of the flexible model")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.steps = args.steps or DEFAULT_STEPS[args.process]
    args.teacher = args.teacher or Path(asset_path(TEACHERS[args.process]))

    run_dir = ROOT / "outputs" / "mnist_cache_pareto" / args.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    teacher = args.teacher.resolve()
    flex = args.flex.resolve() if args.flex else train("lora", [*LORA_RECIPES[args.process], f"model.pretrained={teacher}"],
                                                       run_dir, args.threads)

    def target(fraction: float) -> list[str]:
        return ["budget=target", f"budget.compute_fraction={fraction}", "budget.at_most=true"]

    evaluate(args, run_dir, "teacher", teacher, ["budget=static"])
    for f in args.patch_fractions:
        evaluate(args, run_dir, f"patch_{f}", flex, target(f))
    for cache in args.caches:
        evaluate(args, run_dir, f"cache_{cache}", teacher, ["budget=static", f"cache={cache}"])
    for setting in args.combined:
        fraction, _, cache = setting.partition(":")
        evaluate(args, run_dir, f"combined_{fraction}_{cache}", flex, [*target(float(fraction)), f"cache={cache}"])

    rows = read_table(run_dir / "results.csv")
    metric = metric_column(rows)
    for row in rows:  # seconds per image from the throughput its eval card measured
        card = json.loads(Path(str(row["card"])).read_text())
        ips = float(card.get("images_per_second") or card.get("sampling", {}).get("images_per_second") or 0)
        row["seconds_per_image"] = 1.0 / ips if ips > 0 else float("nan")
    stats = seed_statistics(rows, [metric, "mnist_accuracy", "seconds_per_image"])
    settings = []
    for e in stats:
        settings.append({"family": family(e.get("order", "")), "budget": e["budget"],
                         "compute_fraction": float(e["compute_fraction"]), "fid": e[metric], "fid_std": e[f"{metric}_std"],
                         "label_accuracy": e["mnist_accuracy"], "seconds_per_image": e["seconds_per_image"]})
    settings.sort(key=lambda s: s["compute_fraction"])
    for s in settings:  # Pareto: no other setting is at most as costly and better, one of them strictly
        s["pareto"] = not any(o is not s and o["compute_fraction"] <= s["compute_fraction"] and o["fid"] <= s["fid"]
                              and (o["compute_fraction"] < s["compute_fraction"] or o["fid"] < s["fid"])
                              for o in settings)
    comparisons = []
    for c in (s for s in settings if s["family"] == "combined"):
        entry = {"combined": c["budget"], "compute_fraction": c["compute_fraction"], "fid": c["fid"], "fid_std": c["fid_std"]}
        for fam in ("patch", "cache"):
            rivals = [s for s in settings if s["family"] == fam and s["compute_fraction"] <= c["compute_fraction"] + 1e-9]
            best = min(rivals, key=lambda s: s["fid"]) if rivals else None
            if best is None:  # better than nothing: the combination reaches a compute this family does not
                status = "none at <= this compute"
            elif best["fid"] <= c["fid"]:
                status = "not beaten"
            else:  # a gap larger than both seed spreads together counts as a win
                status = ("beaten beyond the spread" if best["fid"] - c["fid"] > best["fid_std"] + c["fid_std"]
                          else "beaten within the spread")
            entry[f"best_{fam}"] = None if best is None else {"budget": best["budget"], "fid": best["fid"],
                                                              "fid_std": best["fid_std"],
                                                              "compute_fraction": best["compute_fraction"]}
            entry[f"vs_{fam}"] = status
        statuses = [entry["vs_patch"], entry["vs_cache"]]
        entry["dominates_both"] = all(st != "not beaten" for st in statuses)  # at its compute, the Pareto sense
        entry["beats_both_where_both_reach"] = all(st == "beaten beyond the spread" for st in statuses)
        comparisons.append(entry)

    print(f"| family | setting | compute | {metric} (mean +- std, seeds {args.seeds}) | label acc. | s / image | Pareto |")
    print("|---|---|---|---|---|---|---|")
    for s in settings:
        print(f"| {s['family']} | {s['budget']} | {s['compute_fraction']:.1%} | {s['fid']:.2f} +- {s['fid_std']:.2f} | "
              f"{s['label_accuracy']:.3f} | {s['seconds_per_image']:.4f} | {'yes' if s['pareto'] else ''} |")
    for c in comparisons:
        rivals = "; ".join(f"{fam}: " + ("none at <= its compute" if c[f"best_{fam}"] is None else
                                         f"{c[f'best_{fam}']['fid']:.2f} +- {c[f'best_{fam}']['fid_std']:.2f} "
                                         f"({c[f'best_{fam}']['budget']}, {c[f'best_{fam}']['compute_fraction']:.1%}), "
                                         f"{c[f'vs_{fam}']}") for fam in ("patch", "cache"))
        verdict = ("beats both beyond the spread" if c["beats_both_where_both_reach"] else
                   "dominates both at its compute" if c["dominates_both"] else "does not dominate both")
        print(f"- {c['combined']} ({c['compute_fraction']:.1%}): {c['fid']:.2f} +- {c['fid_std']:.2f}; best at <= its "
              f"compute, {rivals}: {verdict}")
    plot_fid_vs_compute(rows, run_dir / "pareto.png", title=f"{metric} vs val digits, {args.steps}, "
                        f"mean +- std over seeds {args.seeds}: patch schedules, caching, both")
    result = {"command": " ".join(sys.argv), "run_dir": str(run_dir), "flex_checkpoint": str(flex),
              "settings": settings, "combined_vs_rivals": comparisons,
              "some_combined_dominates_both": any(c["dominates_both"] for c in comparisons),
              "some_combined_beats_both_where_both_reach": any(c["beats_both_where_both_reach"] for c in comparisons)}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"plot: {run_dir / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
