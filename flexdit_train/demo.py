"""The embedded demo (``make train``): FlexiDiT's claim in miniature on the bundled MNIST digits, on CPU.

    python -m flexdit_train.demo [run_name=NAME] [pretrain=[...]] [budgets=[1.0,0.6]]

Stages, each the command a user would type, run in one run directory:
1. ``python -m flexdit_train +experiment=mnist_pretrain``: a tiny static class-conditional DiT (patch 4);
2. ``python -m flexdit_train +experiment=mnist_flex``: flexify it (weak patch 8, ~1/4 of the compute);
3. ``python -m flexdit_train.evaluate``: the static model at 100% and the flexible one at each budget
   (weak steps first; with ``weak_last_budgets`` also weak steps last at the same compute), scored
   with the MNIST-classifier FID and label accuracy;
then ``report.md`` and ``fid_vs_compute.png`` in the run directory. Rerunning with the same ``run_name``
resumes: finished training stages are not repeated.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from flexdit_train import CONF_DIR
from flexdit_train.evaluation.report import read_table

log = logging.getLogger(__name__)


def run_stage(name: str, module: str, overrides: list[str], threads: int) -> None:
    """Run ``python -m module overrides`` and fail with the stage name when it fails."""
    command = [sys.executable, "-m", module, *overrides]
    print(f"[demo] {name}: {' '.join(command[1:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"demo stage '{name}' failed (exit {result.returncode}); its log is above")


def fid_key(row: dict) -> str:
    keys = [k for k in row if k.startswith("fid") and not k.startswith("fid_")]
    return keys[0] if keys else ""


def write_report(run_dir: Path, static_ckpt: Path, flex_ckpt: Path) -> Path:
    """report.md: one row per (model, budget), FID relative to the static model at full compute."""
    rows = read_table(run_dir / "results.csv")
    static = [r for r in rows if Path(str(r["checkpoint"])) == static_ckpt]
    flex = sorted((r for r in rows if Path(str(r["checkpoint"])) == flex_ckpt),
                  key=lambda r: (r.get("order") == "weak_last", -r["compute_fraction"]))
    if not static or not flex:
        raise RuntimeError(f"results in {run_dir / 'results.csv'} lack the static or the flexible model")
    fid = fid_key(static[0])
    base = static[0][fid]
    lines = [
        "# FlexiDiT on MNIST: quality against compute",
        "",
        f"Static DiT (patch 4) vs the same model flexified (patch 4 + weak patch 8). {fid.upper()} in the feature "
        "space of an MNIST classifier (lower is better) and the accuracy of generated digits against their labels, "
        f"{static[0]['sampling_steps']} steps, CFG {static[0]['cfg_scale']}.",
        "",
        f"| model | budget | weak steps | compute | GMAC/image | {fid} | vs static 100% | label accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, row in [("static", static[0]), *(("flexible", r) for r in flex)]:
        order = str(row.get("order") or "").replace("_", " ").replace("static", "none")
        lines.append(
            f"| {kind} | {row['budget']} | {order} | {row['compute_fraction']:.1%} | {row['gmacs_per_image']:.2f} | "
            f"{row[fid]:.3f} | {row[fid] / base - 1:+.1%} | {row.get('mnist_accuracy', float('nan')):.3f} |"
        )
    lines += ["", "![FID vs compute](fid_vs_compute.png)", "", f"Checkpoints: `{static_ckpt}`, `{flex_ckpt}`."]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="demo")
def main(cfg: DictConfig) -> None:
    run_dir = Path(cfg.paths.output_dir)
    pretrain_dir, flex_dir = run_dir / "pretrain", run_dir / "flex"
    static_ckpt = pretrain_dir / "checkpoints" / "final.ckpt"
    flex_ckpt = flex_dir / "checkpoints" / "final.ckpt"
    run_stage("pretrain", "flexdit_train", [*cfg.pretrain, f"hydra.run.dir={pretrain_dir}"], cfg.threads)
    run_stage("flexify", "flexdit_train",
              [*cfg.flexify, f"model.pretrained={static_ckpt}", f"hydra.run.dir={flex_dir}"], cfg.threads)
    evaluate = [*cfg.evaluate, f"results_dir={run_dir}"]
    run_stage("evaluate static", "flexdit_train.evaluate",
              [*evaluate, f"checkpoint={static_ckpt}", "budget=static", f"hydra.run.dir={run_dir / 'eval_static'}"],
              cfg.threads)
    for budget, fractions, sweep_dir in [("target", cfg.budgets, "eval_flex"),
                                         ("target_weak_last", cfg.weak_last_budgets, "eval_flex_weak_last")]:
        if fractions:
            run_stage(f"evaluate {budget}", "flexdit_train.evaluate",
                      ["-m", *evaluate, f"checkpoint={flex_ckpt}", f"budget={budget}",
                       f"budget.compute_fraction={','.join(str(f) for f in fractions)}",
                       f"hydra.sweep.dir={run_dir / sweep_dir}"], cfg.threads)
    report = write_report(run_dir, static_ckpt, flex_ckpt)
    print(report.read_text())
    print(f"report: {report}\nplot: {run_dir / 'fid_vs_compute.png'}\nrun directory: {run_dir}")


if __name__ == "__main__":
    # Call the importable function: submitit (hydra -m on SLURM) cannot pickle a __main__ function by value.
    from flexdit_train.demo import main as demo_main

    demo_main()
