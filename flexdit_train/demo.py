"""The embedded demo on the bundled MNIST digits, on CPU: FlexiDiT's claim in miniature.

    python -m flexdit_train.demo                  # `make train`: flexify the shipped teacher, evaluate, report
    python -m flexdit_train.demo stage=pretrain   # `make pretrain`: train the teacher, evaluate it, ship it

``stage=flexify`` starts from the teacher shipped in the package (``flexdit_train/assets/``), as a user
starts from the official DiT-XL/2 file, and runs the commands a user would type:

1. ``python -m flexdit_train +experiment=mnist_flex_lora model.pretrained=TEACHER``: LoRA distillation of
   the weak patch (the native path stays the teacher, bit for bit);
2. ``python -m flexdit_train.evaluate -m``: the flexible model at each budget (weak steps first, and weak
   steps last at the same compute), every setting with several sampling seeds, FID against the held-out
   val digits; the teacher itself too unless the flexible model's native path is the teacher (LoRA);

then ``report.md`` (the table, the verdict in words that its own seed spread supports, the plot) and
``fid_vs_compute.png`` in the run directory. ``stage=pretrain`` trains the teacher
(``+experiment=mnist_pretrain``), scores it with the card protocol and writes its EMA weights and a
provenance card (command, commit, steps, wall-clock, FID, label accuracy) to ``teacher``. Rerunning with
the same ``run_name`` resumes: finished training stages are not repeated.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from flexdit_train import CONF_DIR
from flexdit_train.evaluation.claims import compare
from flexdit_train.evaluation.report import metric_column, plot_fid_vs_compute, read_table, seed_statistics
from flexdit_train.runtime.errors import UserError, report_errors


def run_stage(name: str, module: str, overrides: list[str], threads: int) -> float:
    """Run ``python -m module overrides``; fail with the stage name when it fails. Returns its wall-clock seconds."""
    command = [sys.executable, "-m", module, *overrides]
    print(f"[demo] {name}: {' '.join(command[1:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.time()
    result = subprocess.run(command, env=env)
    if result.returncode != 0:  # the stage printed its own error (one line for a user error) just above
        raise UserError(f"demo stage '{name}' failed (exit {result.returncode}); its error is printed above")
    return time.time() - start


def evaluate_sweep(name: str, cfg: DictConfig, run_dir: Path, checkpoint: Path, budget: str, fractions,
                   sweep_dir: str, extra: list[str] = ()) -> None:
    """One ``evaluate -m`` sweep over the budget's fractions (if any) and the sampling seeds."""
    overrides = ["-m", *cfg.evaluate, *extra, f"results_dir={run_dir}", f"checkpoint={checkpoint}", f"budget={budget}",
                 f"seed={','.join(str(s) for s in cfg.seeds)}", f"hydra.sweep.dir={run_dir / sweep_dir}"]
    if fractions:  # at most the fraction: a claim "at <= 60% compute" must not sample with 61%
        overrides += [f"budget.compute_fraction={','.join(str(f) for f in fractions)}", "budget.at_most=true"]
    run_stage(name, "flexdit_train.evaluate", overrides, cfg.threads)


def lora_mode(checkpoint: Path) -> bool:
    """Whether a flexible checkpoint is LoRA-flexified: its native path is then the pretrained model exactly."""
    from flexdit_train.models.loading import read_checkpoint, select_weights

    raw, meta = read_checkpoint(checkpoint)
    _, meta = select_weights(raw, str(checkpoint), True, meta)
    return (meta.get("flex_config") or {}).get("mode") == "lora"


def settings_of(rows: list[dict], checkpoint: Path, metric: str) -> list[dict]:
    """Seed statistics of one checkpoint's settings, strongest budget first, weak-last ones after."""
    mine = [r for r in rows if Path(str(r["checkpoint"])) == Path(checkpoint)]
    stats = seed_statistics(mine, [metric, "mnist_accuracy"])
    return sorted(stats, key=lambda e: (e.get("order") == "weak_last", -float(e["compute_fraction"])))


def write_report(run_dir: Path, flex_ckpt: Path, teacher_ckpt: Path | None, tolerance: float = 0.05,
                 claim_fraction: float = 0.6) -> Path:
    """report.md: one row per setting (mean +- std over seeds), each against the teacher, and the verdicts.

    ``teacher_ckpt`` None means the flexible model's native path is the teacher (LoRA): its own 100% row is
    the reference. The words state only what the seed spread supports (:mod:`flexdit_train.evaluation.claims`).
    """
    rows = read_table(run_dir / "results.csv")
    metric = metric_column(rows)
    flex = settings_of(rows, flex_ckpt, metric) if metric else []
    teacher = settings_of(rows, teacher_ckpt, metric) if teacher_ckpt is not None and metric else []
    if teacher_ckpt is None:
        teacher = [e for e in flex if e.get("order") == "static"][:1]
    if not flex or not teacher:
        raise RuntimeError(f"results in {run_dir / 'results.csv'} lack the teacher or the flexible model")
    reference = teacher[0]
    first = flex[0]
    seeds = ", ".join(str(s) for s in reference["seeds"])
    lines = [
        "# FlexiDiT on MNIST: quality against compute",
        "",
        "A static DiT teacher, flexified with a weak patch that costs ~1/4 of a native step (compute = FLOPs of "
        "the whole sampling run relative to running every step at the native patch). "
        f"{metric.upper()} in the feature space of an MNIST classifier against the held-out val digits (lower is "
        f"better), mean +- std over sampling seeds {seeds} ({first['num_samples']} samples each), "
        f"{first['sampling_steps']} steps, CFG {first['cfg_scale']}; label accuracy = share of generated digits the "
        "classifier assigns to their conditioning class.",
        "",
        f"| model | budget | weak steps | compute | {metric} | vs teacher | what the seed spread supports | label accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    entries = ([("teacher", reference)] if teacher_ckpt is not None else []) + [("flexible", e) for e in flex]
    for kind, entry in entries:
        order = str(entry.get("order") or "").replace("_", " ").replace("static", "none")
        is_reference = entry is reference
        c = compare(entry, reference, metric, tolerance)
        verdicts.append((entry, c))
        shown = "reference" if is_reference else f"{c.verdict} ({c.relative:+.1%})"
        name = "flexible (native path = teacher)" if is_reference and kind == "flexible" else kind
        lines.append(
            f"| {name} | {entry['budget']} | {order} | {float(entry['compute_fraction']):.1%} | "
            f"{entry[metric]:.2f} +- {entry[f'{metric}_std']:.2f} | {c.relative:+.1%} | {shown} | "
            f"{entry.get('mnist_accuracy', float('nan')):.3f} |"
        )
    lines += ["", "## Verdict", ""]
    cheap = [(e, c) for e, c in verdicts if e.get("order") == "weak_first"
             and float(e["compute_fraction"]) <= claim_fraction + 1e-9]
    if cheap:
        e, c = min(cheap, key=lambda ec: float(ec[0]["compute_fraction"]))
        held = ", ".join(f"{float(x['compute_fraction']):.1%}" for x, xc in cheap if xc.within)
        lines.append(
            f"- **Same quality at <= {claim_fraction:.0%} compute** (the mean within {tolerance:.0%} of the teacher's): "
            + (f"holds at {held}." if held else "does not hold.")
            + f" At the cheapest budget, {float(e['compute_fraction']):.1%}: {c.describe()}."
        )
    last = {round(float(e["compute_fraction"]), 3): e for e, _ in verdicts if e.get("order") == "weak_last"}
    for e, _ in verdicts:
        other = last.get(round(float(e["compute_fraction"]), 3)) if e.get("order") == "weak_first" else None
        if other is not None:
            gap = compare(other, e, metric, 0.0)
            sure = "beyond" if gap.verdict == "worse" else "within"
            lines.append(
                f"- **Weak steps first vs last** at {float(e['compute_fraction']):.1%}: {e[metric]:.2f} vs "
                f"{other[metric]:.2f}; weak-first is {'better' if e[metric] < other[metric] else 'not better'}, "
                f"a gap {sure} the seed spread."
            )
    lines += [
        f"- This demo samples {first['num_samples']} digits per seed with {len(reference['seeds'])} seeds; a gap "
        "smaller than the spread shown is noise. The full protocol (2,000 digits x 3 seeds, DDIM-50 and "
        "DDPM-250, a matched-steps control, LoRA and shared fine-tunes) is `benchmarks/mnist_flex_repro.py`, "
        "its numbers in docs/performance.md.",
        "",
        "![FID vs compute](fid_vs_compute.png)",
        "",
        f"Checkpoints: flexible `{flex_ckpt}`" + (f", teacher `{teacher_ckpt}`." if teacher_ckpt is not None else "."),
    ]
    plot_fid_vs_compute(rows, run_dir / "fid_vs_compute.png", reference=("teacher", float(reference[metric])),
                        tolerance=tolerance, title=f"{metric}, mean +- std over {len(reference['seeds'])} seeds")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def flexify_stage(cfg: DictConfig, run_dir: Path) -> Path:
    """`make train`: flexify the shipped teacher, evaluate at every budget and seed, write the report."""
    teacher = Path(str(cfg.teacher))
    if not teacher.is_file():
        raise UserError(f"teacher checkpoint {teacher} not found; run `make pretrain` to train it, or pass teacher=PATH")
    flex_dir = run_dir / "flex"
    flex_ckpt = flex_dir / "checkpoints" / "final.ckpt"
    run_stage("flexify", "flexdit_train", [*cfg.flexify, f"model.pretrained={teacher}", f"hydra.run.dir={flex_dir}"],
              cfg.threads)
    teacher_ref = None if lora_mode(flex_ckpt) else teacher
    if teacher_ref is not None:
        evaluate_sweep("evaluate teacher", cfg, run_dir, teacher, "static", None, "eval_teacher")
    evaluate_sweep("evaluate weak first", cfg, run_dir, flex_ckpt, "target", cfg.budgets, "eval_flex")
    if cfg.weak_last_budgets:
        evaluate_sweep("evaluate weak last", cfg, run_dir, flex_ckpt, "target_weak_last", cfg.weak_last_budgets,
                       "eval_flex_weak_last")
    return write_report(run_dir, flex_ckpt, teacher_ref, float(cfg.tolerance), float(cfg.claim_fraction))


def effective_overrides(overrides: list[str]) -> list[str]:
    """Hydra overrides with the later of two values for one key kept (as Hydra applies them)."""
    last = {o.split("=", 1)[0]: o for o in overrides}
    return list(last.values())


def git_commit() -> str:
    """The commit of the source tree (with ``-dirty`` when it has uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def pretrain_stage(cfg: DictConfig, run_dir: Path) -> Path:
    """`make pretrain`: train the teacher, then :func:`ship_teacher`."""
    pretrain_dir = run_dir / "pretrain"
    seconds = run_stage("pretrain", "flexdit_train", [*cfg.pretrain, f"hydra.run.dir={pretrain_dir}"], cfg.threads)
    command = "make pretrain  (python -m flexdit_train.demo stage=pretrain, i.e. " + " ".join(
        ["python -m flexdit_train", *cfg.pretrain]) + ")"
    return ship_teacher(cfg, run_dir, pretrain_dir / "checkpoints" / "final.ckpt", command, seconds)


def same_weights(model, weights: Path) -> bool:
    """Whether ``weights`` (safetensors) holds exactly ``model``'s tensors, bit for bit."""
    import torch
    from safetensors.torch import load_file

    from flexdit_train.models.loading import plain_state_dict

    if not weights.exists():
        return False
    shipped, trained = load_file(str(weights)), plain_state_dict(model)
    return shipped.keys() == trained.keys() and all(torch.equal(shipped[k], trained[k]) for k in trained)


def ship_teacher(cfg: DictConfig, run_dir: Path, ckpt: Path, command: str, stage_seconds: float,
                 commit: str | None = None) -> Path:
    """Export a trained teacher's EMA weights to ``cfg.teacher``, score the exported file with the card protocol
    (every seed) and write the provenance card next to it (same name, ``.json``). The training wall-clock is the
    one the checkpoint accumulated over all its sessions (resumes included), else the stage's own time."""
    import torch

    from flexdit_train.models.loading import export_safetensors, from_pretrained

    teacher = Path(str(cfg.teacher))
    model = from_pretrained(ckpt)  # the EMA weights
    card_path = teacher.with_suffix(".json")
    if not cfg.rescore and card_path.exists() and same_weights(model, teacher):
        # Identical tensors sample identical digits: the card's scores stand, and its provenance (the run that
        # first made these weights) stays; the reproduction is recorded in the run directory.
        record = {"reproduces": str(teacher), "bit_identical": True, "command": command, "commit": commit or git_commit(),
                  "train_wall_clock_s": round(stage_seconds, 1),
                  "train_threads": int(os.environ.get("OMP_NUM_THREADS", cfg.threads)),
                  "card_evaluation": json.loads(card_path.read_text())["evaluation"]}
        (run_dir / "reproduction.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"the trained teacher is bit-identical to the shipped {teacher.name}: its card stands "
              f"(pass rescore=true to score it again); record: {run_dir / 'reproduction.json'}")
        return card_path
    export_safetensors(model, teacher)
    evaluate_sweep("evaluate teacher", cfg, run_dir, teacher, "static", None, "eval_teacher", list(cfg.teacher_evaluate))
    rows = [r for r in read_table(run_dir / "results.csv") if Path(str(r["checkpoint"])) == teacher]
    metric = metric_column(rows)
    stats = seed_statistics(rows, [metric, "mnist_accuracy"])
    if len(stats) != 1:
        raise RuntimeError(f"expected one teacher setting in {run_dir / 'results.csv'}, found {len(stats)}")
    stats = stats[0]
    trained = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = trained["flexdit"]
    card = {
        "weights": teacher.name,
        "sha256": hashlib.sha256(teacher.read_bytes()).hexdigest(),
        "what": "EMA weights of a static class-conditional DiT trained on the bundled MNIST train digits",
        "command": command,
        "commit": commit or git_commit(),
        "steps": int(trained["global_step"]),
        "global_batch_size": int(meta["config"]["data"]["global_batch_size"]),
        "train_wall_clock_s": round(float(meta.get("train_seconds") or stage_seconds), 1),
        "train_threads": int(os.environ.get("OMP_NUM_THREADS", cfg.threads)),
        "model_config": dict(model.config),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "diffusion": model.diffusion_process,
        "evaluation": {
            "metric": metric,
            "protocol": effective_overrides([*cfg.evaluate, *cfg.teacher_evaluate, "budget=static"]),
            "seeds": stats["seeds"],
            "fid_mean": stats[metric], "fid_std": stats[f"{metric}_std"],
            "label_accuracy_mean": stats["mnist_accuracy"], "label_accuracy_std": stats["mnist_accuracy_std"],
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card["evaluation"], indent=2))
    return card_path


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="demo")
@report_errors
def main(cfg: DictConfig) -> None:
    run_dir = Path(cfg.paths.output_dir)
    if cfg.stage == "pretrain":
        card = pretrain_stage(cfg, run_dir)
        print(f"teacher: {cfg.teacher}\ncard: {card}\nrun directory: {run_dir}")
        return
    if cfg.stage != "flexify":
        raise UserError(f"stage={cfg.stage!r}: use stage=flexify (make train) or stage=pretrain (make pretrain)")
    report = flexify_stage(cfg, run_dir)
    print(report.read_text())
    print(f"report: {report}\nplot: {run_dir / 'fid_vs_compute.png'}\nrun directory: {run_dir}")


if __name__ == "__main__":
    # Call the importable function: submitit (hydra -m on SLURM) cannot pickle a __main__ function by value.
    from flexdit_train.demo import main as demo_main

    demo_main()
