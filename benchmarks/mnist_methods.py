"""FlexiDiT, SparseDiT and EDT's attention modulation on the bundled MNIST digits: FID against measured compute.

    python benchmarks/mnist_methods.py [--run-name NAME] [--num-samples 1000] [--seeds 0 1 2] [--steps ddim20]
        [--flex-fractions 0.6 0.5] [--amm 3 2,4] [--flex CHECKPOINT] [--sparse CHECKPOINT] [--json out.json]

Every method starts from the same converged teacher (the shipped one, ``--teacher`` for another) and is scored
with ``flexdit_train.evaluate`` (held-out val digits, MNIST-classifier FID and label accuracy, ``--seeds``):

- **teacher**: static, the reference;
- **amm**: the teacher with EDT's training-free attention modulation in the blocks of each ``--amm`` placement
  (1-indexed, comma-separated); it changes no FLOPs worth counting, only quality;
- **flexidit**: the teacher LoRA-flexified (``+experiment=mnist_flex_lora``; ``--flex`` reuses a checkpoint),
  weak steps first at each ``--flex-fractions`` (at most that fraction);
- **flexidit+amm**: the flexible model at each fraction with the first AMM placement: the combination no
  paper tried;
- **sparse_dit**: the teacher converted to the miniature SparseDiT and fine-tuned (``+experiment=mnist_sparse_dit``;
  ``--sparse`` reuses a checkpoint), sampled with its temporal token density (``budget=sparse_density``: 3x3 ->
  5x5 sparse grids of the 8x8 tokens) and with its fixed 4x4 grid. FlexiDiT's weak patch early with SparseDiT's
  sparse middle late is not offered: a SparseDiT refuses to be flexified (docs/sparse_dit.md).

Compute is the GMACs per image of each setting's schedule over the teacher's static GMACs (so methods with
other networks stand on one axis); wall-clock is seconds per image as each evaluation measured it (run on a
quiet machine to compare them). Each setting gets a verdict against the teacher: ``matches`` (within 5% beyond
the seed spread), ``worse`` or ``inconclusive``, and the plot (``methods.png``) draws FID vs compute with
seed error bars and the teacher's +-5% band. Results accumulate in ``outputs/mnist_methods/<run-name>``;
rerunning skips what is scored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_cache_pareto import evaluate  # noqa: E402  (the benchmarks directory is not a package)
from mnist_flex_repro import ROOT, TOLERANCE, train  # noqa: E402

from flexdit_train.evaluation.claims import compare  # noqa: E402
from flexdit_train.evaluation.report import (  # noqa: E402
    metric_column,
    plot_fid_vs_compute,
    read_table,
    seed_statistics,
)
from flexdit_train.runtime.resolvers import asset_path  # noqa: E402


def settings(args: argparse.Namespace, teacher: Path, flex: Path,
             sparse: Path) -> list[tuple[str, str, str, Path, list[str]]]:
    """(family, label, plot series, checkpoint, evaluate overrides) of every setting, the teacher first."""
    def target(fraction: float) -> list[str]:
        return ["budget=target", f"budget.compute_fraction={fraction}", "budget.at_most=true"]

    def amm(placement: str) -> list[str]:
        return [f"amm_blocks=[{placement}]"]

    out = [("teacher", "teacher", "teacher", teacher, ["budget=static"])]
    name = {p: "amm" + p.replace(",", "-") for p in args.amm}  # a comma in a sweep directory would sweep
    out += [("amm", name[p], f"teacher + AMM [{p}]", teacher, ["budget=static", *amm(p)]) for p in args.amm]
    out += [("flexidit", f"flexidit_{f}", "FlexiDiT (LoRA), weak first", flex, target(f)) for f in args.flex_fractions]
    if args.amm:
        out += [("flexidit+amm", f"flexidit_{f}_{name[args.amm[0]]}", f"FlexiDiT + AMM [{args.amm[0]}]", flex,
                 [*target(f), *amm(args.amm[0])]) for f in args.flex_fractions]
    out += [("sparse_dit", "sparse_density", "SparseDiT (density schedule / fixed grid)", sparse,
             ["budget=sparse_density"]),
            ("sparse_dit", "sparse_fixed", "SparseDiT (density schedule / fixed grid)", sparse, ["budget=static"])]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-name", default="default")
    parser.add_argument("--teacher", type=Path, default=Path(asset_path("mnist_dit_teacher.safetensors")))
    parser.add_argument("--flex", type=Path, default=None, help="a LoRA-flexified checkpoint instead of training one")
    parser.add_argument("--sparse", type=Path, default=None, help="a fine-tuned SparseDiT instead of training one")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", default="ddim20")
    parser.add_argument("--flex-fractions", type=float, nargs="*", default=[0.6, 0.5])
    parser.add_argument("--amm", nargs="*", default=["3", "2,4"],
                        help="AMM placements, 1-indexed blocks comma-separated (the teacher has 4 blocks)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    run_dir = ROOT / "outputs" / "mnist_methods" / args.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    teacher = args.teacher.resolve()
    flex = args.flex.resolve() if args.flex else train(
        "flexidit", ["+experiment=mnist_flex_lora", f"model.pretrained={teacher}"], run_dir, args.threads)
    sparse = args.sparse.resolve() if args.sparse else train(
        "sparse_dit", ["+experiment=mnist_sparse_dit", f"model.pretrained={teacher}"], run_dir, args.threads)
    plan = settings(args, teacher, flex, sparse)
    for _, label, _, checkpoint, overrides in plan:
        evaluate(args, run_dir, label, checkpoint, overrides)

    rows = read_table(run_dir / "results.csv")
    metric = metric_column(rows)
    for row in rows:  # wall-clock as each evaluation measured it
        card = json.loads(Path(str(row["card"])).read_text())
        ips = float(card.get("images_per_second") or 0)
        row["seconds_per_image"] = 1.0 / ips if ips > 0 else float("nan")
    def label_of(row: dict) -> str:  # each setting's evaluations ran in its own sweep directory
        return Path(str(row["card"])).resolve().relative_to((run_dir / "evals").resolve()).parts[0]

    series = {label: name for _, label, name, _, _ in plan}
    for row in rows:
        row["setting"] = label_of(row)
        row["series"] = series.get(row["setting"], "")
        if row["setting"] == "sparse_fixed":  # its budget is "static": say which grid
            row["budget"] = "fixed grid"
    stats = {}
    for _, label, _, _, _ in plan:
        (stats[label],) = seed_statistics([r for r in rows if r["setting"] == label],
                                          [metric, "mnist_accuracy", "seconds_per_image"])
    base = stats["teacher"]
    teacher_gmacs = float(base["gmacs_per_image"])
    by_label = {}
    for family, label, _, _, _ in plan:
        entry = stats[label]
        verdict = None if family == "teacher" else compare(entry, base, metric, TOLERANCE)
        by_label[label] = {
            "family": family, "budget": entry["budget"], "compute": float(entry["gmacs_per_image"]) / teacher_gmacs,
            "fid": entry[metric], "fid_std": entry[f"{metric}_std"], "label_accuracy": entry["mnist_accuracy"],
            "seconds_per_image": entry["seconds_per_image"], "seeds": entry["seeds"],
            "vs_teacher": None if verdict is None else verdict.as_dict(),
            "verdict": "reference" if verdict is None else verdict.describe(),
        }

    print(f"| method | setting | compute (teacher = 100%) | {metric}, mean +- std (seeds {args.seeds}) | label acc. | "
          "s / image | vs teacher |")
    print("|---|---|---|---|---|---|---|")
    for s in by_label.values():
        print(f"| {s['family']} | {s['budget']} | {s['compute']:.1%} | {s['fid']:.2f} +- {s['fid_std']:.2f} | "
              f"{s['label_accuracy']:.3f} | {s['seconds_per_image']:.4f} | {s['verdict']} |")
    for row in rows:  # one compute axis for every network: GMACs over the teacher's
        row["compute_fraction"] = float(row["gmacs_per_image"]) / teacher_gmacs
    plot_fid_vs_compute(rows, run_dir / "methods.png", reference=("teacher", base[metric]), tolerance=TOLERANCE,
                        title=f"{metric} vs val digits, {args.steps}, mean +- std over seeds {args.seeds}")
    result = {"command": " ".join(sys.argv), "run_dir": str(run_dir), "teacher": str(teacher),
              "flex_checkpoint": str(flex), "sparse_checkpoint": str(sparse), "settings": by_label}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"plot: {run_dir / 'methods.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
