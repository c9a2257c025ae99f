"""FlexiDiT's claim in miniature on the bundled MNIST digits, on CPU.

    python benchmarks/mnist_flex_repro.py [--run-name NAME] [--pretrain-steps 6000] [--flex-steps 3000]
        [--num-samples 2000] [--fractions 1.0 0.8 0.7 0.6 0.55 0.5 0.4 0.3] [--json results.json]

Runs the embedded demo (``python -m flexdit_train.demo``) with longer training and more evaluation
samples: pretrain a static DiT (patch 4), flexify it (weak patch 8), evaluate the static model at 100%
and the flexible one at every fraction with the weak steps first (the paper's schedules) and, at the same
compute, with the weak steps last (the paper's Fig. 19 ablation). It then checks the two claims:

1. at 60% compute or less, the flexible model's FID (MNIST-classifier features) stays within 5% of the
   static model's FID at 100%: the cheapest weak-first budget within 5% costs at most 60%;
2. at equal compute, weak-first schedules beat weak-last ones (lower FID).

The flexible model has trained for pretrain + flexify steps, the static one for pretrain steps only, so
claim 1 favours the flexible model whenever the static one is not converged (it never is in minutes of
CPU). A control therefore continues the static run for the flexify steps (``pretrain_matched/``) and the
verdicts report every budget against it too (informational: the exit code follows the two claims).

Prints the FID-vs-compute table and the verdicts (JSON with ``--json``); exits 1 when a claim fails. The
run directory (``outputs/demo/runs/<run-name>``) keeps report.md, fid_vs_compute.png and every eval card;
rerunning with the same ``--run-name`` resumes finished training stages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from flexdit_train.demo import fid_key, run_stage
from flexdit_train.evaluation.report import read_table

ROOT = Path(__file__).resolve().parents[1]
FID_TOLERANCE = 0.05  # claim 1: within 5% of the static model's FID
CLAIM_FRACTION = 0.6  # claim 1 holds at this compute fraction or less


def evaluate_overrides(args: argparse.Namespace) -> list[str]:
    return ["eval=mnist", f"eval.num_samples={args.num_samples}", f"eval.sampling_steps={args.sampling_steps}",
            "batch_size=250"]


def demo_overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    fractions = ",".join(str(f) for f in args.fractions)
    weak_last = ",".join(str(f) for f in args.fractions if f < 1.0)
    def stage(*overrides: str) -> str:  # a Hydra list of quoted override strings
        return "[" + ",".join(f"'{o}'" for o in overrides) + "]"

    return [
        f"hydra.run.dir={run_dir}",
        f"threads={args.threads}",
        "pretrain=" + stage("+experiment=mnist_pretrain", f"trainer.max_steps={args.pretrain_steps}"),
        "flexify=" + stage("+experiment=mnist_flex", f"trainer.max_steps={args.flex_steps}"),
        "evaluate=" + stage(*evaluate_overrides(args)),
        f"budgets=[{fractions}]",
        f"weak_last_budgets=[{weak_last}]",
    ]


def train_matched_static(args: argparse.Namespace, run_dir: Path) -> Path:
    """The control: the pretrain run continued (same recipe, resumed from its checkpoints) for as many steps
    as the flexible model has trained in all, then scored at full compute into the same results table."""
    matched_dir = run_dir / "pretrain_matched"
    if not (matched_dir / "checkpoints").exists():
        shutil.copytree(run_dir / "pretrain" / "checkpoints", matched_dir / "checkpoints", symlinks=True)
    steps = args.pretrain_steps + args.flex_steps
    run_stage("pretrain (matched steps)", "flexdit_train",
              ["+experiment=mnist_pretrain", f"trainer.max_steps={steps}", f"hydra.run.dir={matched_dir}"],
              args.threads)
    ckpt = matched_dir / "checkpoints" / "final.ckpt"
    run_stage("evaluate static (matched steps)", "flexdit_train.evaluate",
              [*evaluate_overrides(args), f"results_dir={run_dir}", f"checkpoint={ckpt}", "budget=static",
               f"hydra.run.dir={run_dir / 'eval_static_matched'}"], args.threads)
    return ckpt


def check_claims(rows: list[dict], static_ckpt: Path, flex_ckpt: Path, matched_ckpt: Path) -> dict:
    """The two verdicts, with the numbers behind them, and every budget against the matched-steps control."""
    static = next(r for r in rows if Path(str(r["checkpoint"])) == static_ckpt)
    fid = fid_key(static)
    flex = [r for r in rows if Path(str(r["checkpoint"])) == flex_ckpt]
    base = float(static[fid])
    matched = float(next(r for r in rows if Path(str(r["checkpoint"])) == matched_ckpt)[fid])
    budgets = [
        {"budget": r["budget"], "compute_fraction": r["compute_fraction"], fid: r[fid],
         "vs_static": r[fid] / base - 1.0, "within_5pct": r[fid] <= (1.0 + FID_TOLERANCE) * base}
        for r in sorted(flex, key=lambda r: -r["compute_fraction"]) if r["order"] in ("weak_first", "static")
    ]
    cheapest = min((b for b in budgets if b["within_5pct"]), key=lambda b: b["compute_fraction"], default=None)
    last = {round(r["compute_fraction"], 6): r for r in flex if r["order"] == "weak_last"}
    pairs = []
    for r in sorted(flex, key=lambda r: -r["compute_fraction"]):
        other = last.get(round(r["compute_fraction"], 6)) if r["order"] == "weak_first" else None
        if other is not None:
            pairs.append({"compute_fraction": r["compute_fraction"], "weak_first": r[fid], "weak_last": other[fid],
                          "holds": r[fid] < other[fid]})
    return {
        "metric": fid,
        "static_fid": base,
        "within_5pct_at_60pct_or_less": {
            "holds": cheapest is not None and cheapest["compute_fraction"] <= CLAIM_FRACTION + 1e-9,
            "cheapest_within_5pct": cheapest, "budgets": budgets,
        },
        "weak_first_beats_weak_last": {"holds": bool(pairs) and all(p["holds"] for p in pairs), "pairs": pairs},
        "vs_static_with_matched_steps": {
            "static_fid": matched,
            "budgets": [{"budget": b["budget"], "compute_fraction": b["compute_fraction"], fid: b[fid],
                         "vs_static": b[fid] / matched - 1.0} for b in budgets],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-name", default="mnist_flex_repro")
    parser.add_argument("--pretrain-steps", type=int, default=6000)
    parser.add_argument("--flex-steps", type=int, default=3000)
    parser.add_argument("--num-samples", type=int, default=2000, help="generated digits per budget")
    parser.add_argument("--sampling-steps", default="ddim25", help="DiT respacing of every evaluation")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.8, 0.7, 0.6, 0.55, 0.5, 0.4, 0.3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the verdicts and the table here")
    args = parser.parse_args()

    run_dir = ROOT / "outputs" / "demo" / "runs" / args.run_name
    command = [sys.executable, "-m", "flexdit_train.demo", *demo_overrides(args, run_dir)]
    print("[repro]", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    matched_ckpt = train_matched_static(args, run_dir)
    rows = read_table(run_dir / "results.csv")
    verdict = check_claims(rows, run_dir / "pretrain" / "checkpoints" / "final.ckpt",
                           run_dir / "flex" / "checkpoints" / "final.ckpt", matched_ckpt)
    result = {"command": " ".join(sys.argv), "run_dir": str(run_dir), "settings": vars(args) | {"json": None},
              **verdict, "table": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2, default=str))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    holds = verdict["within_5pct_at_60pct_or_less"]["holds"] and verdict["weak_first_beats_weak_last"]["holds"]
    print(f"claims {'hold' if holds else 'DO NOT hold'}; report: {run_dir / 'report.md'}")
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
