"""FlexiDiT's claim on the bundled MNIST digits, with a protocol that cannot flatter the flexible models.

    python benchmarks/mnist_flex_repro.py [--run-name NAME] [--modes lora shared] [--num-samples 2000]
        [--seeds 0 1 2] [--fractions 1.0 0.8 0.7 0.6 0.5 0.4 0.3] [--weak-last-fractions F ...]
        [--ddpm-fractions 1.0 0.6]
        [--convergence] [--json results.json] [--lora ARGS...] [--shared ARGS...]
        [--process flow --teacher FLOW_TEACHER]

Starting from the shipped teacher (``flexdit_train/assets/mnist_dit_teacher.safetensors``, a converged
static DiT; ``--teacher PATH`` for another), it trains with the commands a user types:

- **control**: ``+experiment=mnist_control``, the teacher fine-tuned statically with exactly the shared
  recipe (same data, steps, LR schedule, EMA): what extra training alone gives;
- **lora**: ``+experiment=mnist_flex_lora`` (LoRA distillation; the native path stays the teacher);
- **shared**: ``+experiment=mnist_flex`` (shared fine-tune);
- with ``--convergence``: the teacher's recipe for 1.5x its steps, to check it was converged (training
  50% more must improve the FID by less than 3%).

Every setting is sampled with ``--num-samples`` digits for each of ``--seeds`` and scored against the
held-out val digits (MNIST-classifier FID, label accuracy): the teacher and the control at 100%; each
flexible model at every fraction with the weak steps first (the paper's schedules, ``at_most``: never
above the fraction) and, below 100%, with the same steps weak last; all with DDIM-50, and with DDPM-250
(the paper's sampler) at ``--ddpm-fractions``. The real train digits scored the same way give the floor
a perfect generator would reach.

``--process flow`` measures the same claim on a flow-matching teacher (``+experiment=mnist_flow_pretrain``,
shipped as ``assets/mnist_flow_teacher.safetensors``, the default teacher then): the LoRA mode trains
``+experiment=mnist_flow_flex_lora``, the convergence check ``mnist_flow_pretrain``, every setting samples with
Euler-50 (``--steps``), and there are no DDPM-250 rows. The shared mode and the control have no flow experiment.

Verdicts (printed, in the JSON, and the exit code: 0 when claims 1 and 2 hold):

1. at <= 60% compute, at least one flexible mode's mean FID is within 5% of the better of the teacher and
   the control (DDIM-50; a difference beyond the seed spread is reported as such);
2. weak-first beats weak-last at every fraction, in every mode;
3. (reported) the shared mode's native path at 100% is within 5% of the control.

Results (``results.csv``, eval cards, the plot with seed error bars and the reference's +-5% band) stay in
``outputs/mnist_flex_repro/<run-name>``; rerunning with the same name skips finished trainings and
evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flexdit_train.demo import run_stage
from flexdit_train.evaluation.claims import better, compare
from flexdit_train.evaluation.report import metric_column, plot_fid_vs_compute, read_table, seed_statistics
from flexdit_train.runtime.resolvers import asset_path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.05  # claims 1 and 3: within 5%
CLAIM_FRACTION = 0.6  # claim 1 holds at this compute fraction or less
CONVERGED = 0.03  # 50% more training improves the teacher's FID by less than this
# The experiment of each training per process (conf/experiment/); "teacher_x1.5" is the convergence check.
EXPERIMENTS = {
    "ddpm": {"control": "mnist_control", "lora": "mnist_flex_lora", "shared": "mnist_flex",
             "teacher_x1.5": "mnist_pretrain"},
    "flow": {"lora": "mnist_flow_flex_lora", "teacher_x1.5": "mnist_flow_pretrain"},
}
TEACHERS = {"ddpm": "mnist_dit_teacher.safetensors", "flow": "mnist_flow_teacher.safetensors"}
DEFAULT_STEPS = {"ddpm": "ddim50", "flow": "euler50"}


FLEX_ONLY = ("flex.", "objective.patch_size_weights", "objective.patch_size_loss_weights", "objective.timestep_ranges",
             "objective.mmd")


def control_overrides(shared: list[str]) -> list[str]:
    """The shared run's overrides that a static model has: the recipe (LR, steps, EMA, data), not the flexible knobs."""
    return [o for o in shared if not o.lstrip("+~").startswith(FLEX_ONLY)]


def train(name: str, overrides: list[str], run_dir: Path, threads: int) -> Path:
    """Run a training stage unless its final checkpoint exists; returns the checkpoint."""
    ckpt = run_dir / name / "checkpoints" / "final.ckpt"
    if not ckpt.exists():
        run_stage(f"train {name}", "flexdit_train", [*overrides, f"hydra.run.dir={run_dir / name}"], threads)
    return ckpt


class Evaluator:
    """Runs ``flexdit_train.evaluate`` sweeps into one results table, skipping settings already scored."""

    def __init__(self, args: argparse.Namespace, run_dir: Path):
        self.args, self.run_dir = args, run_dir

    def done(self, checkpoint: Path, budget: str, steps: str) -> set[int]:
        rows = read_table(self.run_dir / "results.csv")
        return {int(r["seed"]) for r in rows if Path(str(r["checkpoint"])) == checkpoint and r["budget"] == budget
                and str(r["sampling_steps"]) == steps and int(r["num_samples"]) == self.args.num_samples}

    def __call__(self, model: str, checkpoint: Path, steps: str, fraction: float | None = None,
                 weak_last: bool = False) -> None:
        if fraction is None:
            budget, name = ["budget=static"], "static"
        else:
            preset = "target_weak_last" if weak_last else "target"
            budget = [f"budget={preset}", f"budget.compute_fraction={fraction}", "budget.at_most=true"]
            name = f"{preset}_{fraction}"
        seeds = [s for s in self.args.seeds if s not in self.done(checkpoint, name, steps)]
        if not seeds:
            return
        label = f"{model}_{name}_{steps}_seeds{'-'.join(str(s) for s in seeds)}"
        run_stage(f"evaluate {label}", "flexdit_train.evaluate", [
            "-m", "eval=mnist", "eval.reference=mnist:val", f"eval.num_samples={self.args.num_samples}",
            f"eval.sampling_steps={steps}", f"batch_size={self.args.batch_size}", f"results_dir={self.run_dir}",
            f"checkpoint={checkpoint}", *budget, f"seed={','.join(str(s) for s in seeds)}",
            f"hydra.sweep.dir={self.run_dir / 'evals' / label}",
        ], self.args.threads)


def data_floor(args: argparse.Namespace, cache_dir: Path) -> dict:
    """FID of ``num_samples`` real train digits (one draw per seed) against the val reference: what a
    generator that reproduces the training digits exactly would score."""
    import numpy as np
    import torch

    from flexdit_train.evaluation.features import extract_features, resolve_extractor
    from flexdit_train.evaluation.frechet import feature_statistics, frechet_distance
    from flexdit_train.evaluation.mnist_classifier import split_images
    from flexdit_train.evaluation.reference import load_reference

    extractor = resolve_extractor("mnist-cnn", None, cache_dir)
    images = torch.from_numpy(split_images("train")[0])  # uint8 (N, 32, 32, 1)
    reference = load_reference("mnist:val", extractor, cache_dir=cache_dir, image_size=32, channels=1,
                               device=torch.device("cpu"))
    values = []
    for seed in args.seeds:
        pick = np.random.default_rng(seed).choice(len(images), size=min(args.num_samples, len(images)), replace=False)
        feats = extract_features(extractor, images[pick], torch.device("cpu"), 256)
        mu, sigma = feature_statistics(feats[extractor.layer("fid")])
        values.append(frechet_distance(mu, sigma, reference.mu, reference.sigma))
    mean = float(np.mean(values))
    return {"fid": mean, "fid_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "values": values}


def stats_by(rows: list[dict], metric: str) -> dict[tuple, dict]:
    """Seed statistics keyed by (checkpoint, budget, sampling steps)."""
    return {(str(e["checkpoint"]), str(e["budget"]), str(e["sampling_steps"])): e
            for e in seed_statistics(rows, [metric, "mnist_accuracy"])}


def verdicts(stats: dict, metric: str, ckpts: dict[str, Path], args: argparse.Namespace) -> dict:
    """Claims 1-3 (``--steps``, DDIM-50 by default) and the DDPM-250 comparisons, with every number behind them."""
    def get(name: str, budget: str, steps: str = args.steps):
        if name == "lora" and budget == "target_1.0":  # not sampled: LoRA's native path is the teacher itself
            name, budget = "teacher", "static"
        return stats.get((str(ckpts[name]), budget, steps)) if name in ckpts else None

    teacher, control = get("teacher", "static"), get("control", "static")
    reference = better(teacher, control, metric) if control is not None else teacher
    ref_name = "control" if reference is control else "teacher"
    out: dict = {"metric": metric, "reference": ref_name, "reference_fid": reference[metric],
                 "reference_fid_std": reference[f"{metric}_std"], "modes": {}}
    claim, order = [], []
    for mode in args.modes:
        budgets, pairs = [], []
        for f in args.fractions:
            first = get(mode, f"target_{f}")
            if first is None:
                continue
            c = compare(first, reference, metric, TOLERANCE)
            budgets.append({"fraction": f, "compute_fraction": first["compute_fraction"], **c.as_dict(),
                            "label_accuracy": first.get("mnist_accuracy")})
            last = get(mode, f"target_weak_last_{f}") if f < 1.0 else None
            if last is not None:
                gap = compare(last, first, metric, 0.0)
                pairs.append({"fraction": f, "compute_fraction": first["compute_fraction"], "weak_first": first[metric],
                              "weak_last": last[metric], "holds": first[metric] < last[metric],
                              "beyond_spread": gap.verdict == "worse"})
        cheap = [b for b in budgets if b["compute_fraction"] <= CLAIM_FRACTION + 1e-9 and b["within"]]
        mode_out = {"budgets": budgets, "weak_first_vs_last": pairs,
                    "claim_holds": bool(cheap),
                    "cheapest_within": min(cheap, key=lambda b: b["compute_fraction"]) if cheap else None,
                    "weak_first_beats_weak_last": bool(pairs) and all(p["holds"] for p in pairs)}
        native = get(mode, "target_1.0")
        if mode == "shared" and native is not None and control is not None:
            mode_out["native_vs_control"] = compare(native, control, metric, TOLERANCE).as_dict()
        ddpm = {}
        for f in args.ddpm_fractions:
            entry = get(mode, f"target_{f}", "250")
            ddpm_ref = get("teacher", "static", "250")
            if entry is not None and ddpm_ref is not None:
                ddpm[str(f)] = compare(entry, ddpm_ref, metric, TOLERANCE).as_dict()
        mode_out["ddpm250_vs_teacher"] = ddpm
        out["modes"][mode] = mode_out
        claim.append(mode_out["claim_holds"])
        order.append(mode_out["weak_first_beats_weak_last"])
    out["claim_1_same_quality_at_60pct"] = any(claim)
    out["claim_2_weak_first_beats_weak_last"] = bool(order) and all(order)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-name", default="default")
    parser.add_argument("--process", choices=sorted(EXPERIMENTS), default="ddpm",
                        help="the teacher's process: picks the experiments, the default teacher and sampler")
    parser.add_argument("--teacher", type=Path, default=None, help="default: the shipped teacher of --process")
    parser.add_argument("--steps", default=None, help="sampling steps of every row (default: ddim50, flow: euler50)")
    parser.add_argument("--modes", nargs="*", default=["lora", "shared"], choices=["lora", "shared"],
                        help="flexible modes to train and score (none: only the teacher, control and convergence rows)")
    parser.add_argument("--num-samples", type=int, default=2000, help="generated digits per setting and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    parser.add_argument("--weak-last-fractions", type=float, nargs="*", default=None,
                        help="fractions also sampled with the weak steps last (default: every fraction below 1.0)")
    parser.add_argument("--ddpm-fractions", type=float, nargs="*", default=None,
                        help="fractions also sampled with DDPM-250 (the teacher at 100%% always; default 1.0 0.6, "
                             "none for a flow teacher)")
    parser.add_argument("--convergence", action="store_true", help="also train the teacher recipe for 1.5x steps")
    parser.add_argument("--convergence-checkpoint", type=Path, default=None,
                        help="an already trained 1.5x-steps teacher run's final.ckpt, instead of training it here")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the matched control (e.g. while the shared recipe is still being chosen)")
    parser.add_argument("--lora", nargs="*", default=[], help="extra overrides of the LoRA flexify run")
    parser.add_argument("--shared", nargs="*", default=[],
                        help="extra overrides of the shared flexify run; the control takes those that apply to a static "
                             "model (not flex.* nor the flexible objective's own options)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the verdicts and the table here")
    args = parser.parse_args()
    experiments = EXPERIMENTS[args.process]
    missing = sorted({*args.modes, *(["control"] if args.control else [])} - set(experiments))
    if missing:
        parser.error(f"--process {args.process} has no experiment for {missing}; pass --modes "
                     f"{' '.join(m for m in args.modes if m in experiments) or 'lora'} and --no-control")
    if args.process == "flow" and args.ddpm_fractions:
        parser.error("a flow teacher has no DDPM-250 rows: drop --ddpm-fractions")
    if args.ddpm_fractions is None:
        args.ddpm_fractions = [1.0, 0.6] if args.process == "ddpm" else []
    args.steps = args.steps or DEFAULT_STEPS[args.process]
    args.teacher = args.teacher or Path(asset_path(TEACHERS[args.process]))

    run_dir = ROOT / "outputs" / "mnist_flex_repro" / args.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    teacher = args.teacher.resolve()
    card = json.loads(teacher.with_suffix(".json").read_text()) if teacher.with_suffix(".json").exists() else {}
    ckpts: dict[str, Path] = {"teacher": teacher}
    pretrained = f"model.pretrained={teacher}"
    evaluate = Evaluator(args, run_dir)
    evaluate("teacher", teacher, args.steps)
    for mode in args.modes:  # cheapest first: every flexible setting with --steps
        extra = args.lora if mode == "lora" else args.shared
        ckpts[mode] = train(mode, [f"+experiment={experiments[mode]}", pretrained, *extra], run_dir, args.threads)
        for f in args.fractions:
            if not (mode == "lora" and f == 1.0):  # LoRA's native path is the teacher, bit for bit: its row
                evaluate(mode, ckpts[mode], args.steps, f)
            if f < 1.0 and (args.weak_last_fractions is None or f in args.weak_last_fractions):
                evaluate(mode, ckpts[mode], args.steps, f, weak_last=True)
    if args.control:
        ckpts["control"] = train("control", [f"+experiment={experiments['control']}", pretrained,
                                             *control_overrides(args.shared)], run_dir, args.threads)
        evaluate("control", ckpts["control"], args.steps)
    if args.convergence or args.convergence_checkpoint:
        steps = int(card.get("steps", 12000) * 1.5)
        ckpts["teacher_x1.5"] = args.convergence_checkpoint.resolve() if args.convergence_checkpoint else train(
            "teacher_x1.5", [f"+experiment={experiments['teacher_x1.5']}", f"trainer.max_steps={steps}"], run_dir,
            args.threads)
        evaluate("teacher_x1.5", ckpts["teacher_x1.5"], args.steps)
    if args.ddpm_fractions:  # the paper's sampler, last: 5x the cost of DDIM-50
        evaluate("teacher", teacher, "250")
    for mode in args.modes:
        for f in args.ddpm_fractions:
            if not (mode == "lora" and f == 1.0):
                evaluate(mode, ckpts[mode], "250", f)

    rows = read_table(run_dir / "results.csv")
    metric = metric_column(rows)
    stats = stats_by(rows, metric)
    result = {"command": " ".join(sys.argv), "run_dir": str(run_dir), "teacher_card": card,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "checkpoints": {k: str(v) for k, v in ckpts.items()},
              "data_floor": data_floor(args, Path.home() / ".cache" / "flexdit_train" / "eval"),
              **verdicts(stats, metric, ckpts, args)}
    if "teacher_x1.5" in ckpts:
        long = stats[(str(ckpts["teacher_x1.5"]), "static", args.steps)]
        base = stats[(str(teacher), "static", args.steps)]
        improvement = (base[metric] - long[metric]) / base[metric]
        result["convergence"] = {"teacher": base[metric], "teacher_std": base[f"{metric}_std"],
                                 "x1.5_steps": long[metric], "x1.5_steps_std": long[f"{metric}_std"],
                                 "improvement": improvement, "converged": improvement < CONVERGED}
    result["stats"] = [dict(e) for e in stats.values()]
    main_rows = [r for r in rows if str(r["sampling_steps"]) == args.steps]
    plot_fid_vs_compute(main_rows, run_dir / "fid_vs_compute.png", reference=(result["reference"], result["reference_fid"]),
                        tolerance=TOLERANCE, title=f"{metric} vs val digits, {args.steps}, mean +- std over seeds {args.seeds}")
    summary = {k: v for k, v in result.items() if k not in ("stats", "teacher_card")}
    print(json.dumps(summary, indent=2, default=str))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    holds = result["claim_1_same_quality_at_60pct"] and result["claim_2_weak_first_beats_weak_last"]
    print(f"claims {'hold' if holds else 'DO NOT hold'}; results: {run_dir}")
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
