"""Results shared by a sweep: a CSV + Markdown table (one row per checkpoint, budget, preset, sampling
steps, CFG scale and seed), the FID-vs-compute plot regenerated from it (seeds of one setting averaged,
their spread as error bars), and optional W&B logging that never fails an evaluation."""

from __future__ import annotations

import csv
import fcntl
import logging
import math
import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from flexdit_train.runtime.atomic import atomic_write
from flexdit_train.runtime.loggers import wandb_credentials

log = logging.getLogger(__name__)

TABLE_CSV, TABLE_MD, PLOT_PNG = "results.csv", "results.md", "fid_vs_compute.png"
# One row per evaluated setting: the same checkpoint and budget sampled with another seed, step count or
# guidance scale is another measurement, not a re-evaluation to replace.
KEY_COLUMNS = ("checkpoint", "budget", "preset", "sampling_steps", "cfg_scale", "seed")
# A setting without its seed: the rows that seed statistics average over.
SETTING_COLUMNS = tuple(k for k in KEY_COLUMNS if k != "seed")
BASE_COLUMNS = ("checkpoint", "budget", "preset", "order", "compute_fraction", "gmacs_per_image", "nfe",
                "num_samples", "sampling_steps", "cfg_scale", "seed")
FID_COLUMN = re.compile(r"^fid\d")


def table_row(card: Mapping, card_path: str | os.PathLike) -> dict:
    """The table row of one eval card: protocol columns, then the metric values, then the card path."""
    nfe = sum(n for branch in card["nfe"].values() for n in branch.values())
    budget, order = card["budget"], card.get("schedule_order", "")
    if card.get("amm_blocks"):  # attention modulation changes the samples: its own setting and plot series
        amm = "amm" + "-".join(str(b) for b in card["amm_blocks"])
        budget, order = f"{budget} + {amm}", f"{order}+{amm}"
    row = {
        "checkpoint": card["checkpoint"], "budget": budget, "preset": card["preset"],
        "order": order, "compute_fraction": card["compute_fraction"], "gmacs_per_image": card["gmacs_per_image"], "nfe": nfe,
        "num_samples": card["num_samples"], "sampling_steps": card["sampling_steps"],
        "cfg_scale": card["cfg_scale"], "seed": card["seed"],
    }
    return {**row, **card["metrics"], "card": str(card_path)}


@contextmanager
def _locked(results_dir: Path):
    """Exclusive lock on the results directory: parallel sweep jobs (submitit) append to one table."""
    results_dir.mkdir(parents=True, exist_ok=True)
    with open(results_dir / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_table(path: str | os.PathLike) -> list[dict]:
    """Rows of a results CSV, numbers parsed back (empty cells stay empty strings)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def record_result(results_dir: str | os.PathLike, row: Mapping) -> dict[str, Path]:
    """Insert ``row`` into the table (replacing the row with the same key: checkpoint, budget, preset,
    sampling steps, CFG scale and seed), then rewrite the CSV, the Markdown table and the plot; returns their paths."""
    results_dir = Path(results_dir)
    paths = {"csv": results_dir / TABLE_CSV, "markdown": results_dir / TABLE_MD, "plot": results_dir / PLOT_PNG}
    with _locked(results_dir):
        key = tuple(str(row[k]) for k in KEY_COLUMNS)
        rows = [r for r in read_table(paths["csv"]) if tuple(str(r[k]) for k in KEY_COLUMNS) != key]
        rows.append(dict(row))
        columns = list(BASE_COLUMNS)
        for r in rows:
            columns += [c for c in r if c not in columns and c != "card"]
        columns.append("card")

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns, restval="")
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(paths["csv"], write_csv)
        paths["markdown"].write_text(markdown_table(rows, columns))
        plot_fid_vs_compute(rows, paths["plot"])
    return paths


def short_names(paths) -> dict[str, str]:
    """Each path's shortest trailing part that no other path shares: ``final.ckpt`` when the file names
    differ, ``pretrain/checkpoints/final.ckpt`` vs ``flex/checkpoints/final.ckpt`` when they do not."""
    paths = sorted({str(p) for p in paths})
    parts = {p: Path(p).parts for p in paths}
    names = {}
    for p in paths:
        for k in range(1, len(parts[p]) + 1):
            tail = parts[p][-k:]
            if not any(q != p and parts[q][-k:] == tail for q in paths):
                break
        names[p] = str(Path(*tail))
    return names


def markdown_table(rows: list[Mapping], columns: list[str]) -> str:
    """A Markdown table; checkpoints are shown by their shortest distinct path, floats with 4 significant digits."""
    checkpoint_names = short_names(r["checkpoint"] for r in rows if "checkpoint" in r)

    def cell(column: str, value) -> str:
        if column == "checkpoint":
            return checkpoint_names.get(str(value), str(value))
        if column == "compute_fraction" and isinstance(value, float):
            return f"{value:.1%}"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    shown = [c for c in columns if c != "card"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(c, r.get(c, "")) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def metric_column(rows: list[Mapping], pattern: re.Pattern = FID_COLUMN) -> str | None:
    """The first column of ``rows`` that matches ``pattern`` (the FID column, e.g. ``fid2000``)."""
    for r in rows:
        for column in r:
            if pattern.match(column):
                return column
    return None


def seed_statistics(rows: list[Mapping], metrics: list[str]) -> list[dict]:
    """One entry per setting (checkpoint, budget, preset, sampling steps, CFG scale): the setting's
    columns, ``seeds`` (sorted), ``n_seeds`` and, for each metric, ``<metric>`` (the mean over seeds) and
    ``<metric>_std`` (sample standard deviation, 0 for one seed) and ``<metric>_by_seed`` ({seed: value}, for
    paired comparisons). Rows lacking a metric are skipped for it."""
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r.get(k, "")) for k in SETTING_COLUMNS), []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        entry = {k: first.get(k, "") for k in (*SETTING_COLUMNS, "order", "compute_fraction", "gmacs_per_image",
                                                "num_samples", "series")}
        entry["seeds"] = sorted(int(r["seed"]) for r in members if isinstance(r.get("seed"), int))
        entry["n_seeds"] = len(members)
        for metric in metrics:
            by_seed = {int(r["seed"]): float(r[metric]) for r in members if isinstance(r.get(metric), int | float)}
            if by_seed:
                values = list(by_seed.values())
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
                entry[metric], entry[f"{metric}_std"] = mean, math.sqrt(var)
                entry[f"{metric}_by_seed"] = by_seed
        out.append(entry)
    return out


def plot_fid_vs_compute(rows: list[Mapping], path: str | os.PathLike, reference: tuple[str, float] | None = None,
                        tolerance: float = 0.05, title: str | None = None) -> Path | None:
    """FID against compute (% of static FLOPs), one line per (checkpoint, preset, sampling steps, schedule
    order, FID-n), or per ``series`` where rows name one (a comparison of methods); seeds of one setting are
    averaged, their standard deviation drawn as error bars. A checkpoint's static (100%) point starts each of
    its lines. ``reference`` (label, FID) draws that FID with a +-``tolerance`` band. None without FIDs."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    fid_columns = sorted({c for r in rows for c in r if FID_COLUMN.match(c)})
    series: dict[tuple, list[tuple[float, float, float, str]]] = {}
    static_points: dict[tuple, list[tuple[float, float, float, str]]] = {}
    checkpoint_names = short_names(r["checkpoint"] for r in rows)
    for entry in seed_statistics(rows, fid_columns):
        for column in fid_columns:
            if column not in entry:
                continue
            series_name = str(entry.get("series") or "")
            base = (series_name or checkpoint_names[str(entry["checkpoint"])], "" if series_name else str(entry["preset"]),
                    str(entry["sampling_steps"]), column)
            point = (100 * float(entry["compute_fraction"]), entry[column], entry[f"{column}_std"],
                     str(entry["budget"]))
            order = str(entry.get("order") or "")
            if order == "static":
                static_points.setdefault(base, []).append(point)
            else:
                series.setdefault((*base, order), []).append(point)
    for base, points in static_points.items():
        lines = [key for key in series if key[:4] == base] or [(*base, "static")]
        for key in lines:
            series.setdefault(key, []).extend(points)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    if reference is not None:
        label, value = reference
        ax.axhspan(value * (1 - tolerance), value * (1 + tolerance), color="0.85", zorder=0,
                   label=f"{label} {value:.3g} +-{tolerance:.0%}")
        ax.axhline(value, color="0.5", lw=0.8, zorder=0)
    steps_differ = len({key[2] for key in series}) > 1
    for (checkpoint, preset, steps, fid_name, order), points in sorted(series.items()):
        points.sort()
        xs, ys, errs, names = zip(*points)
        label = checkpoint + (f" / {preset}" if preset else "") + (f" / {steps}" if steps_differ else "")
        if preset:  # a named series (preset "") says its schedule in its name
            label += f" / {order.replace('_', '-')}" if order else ""
        label += f" ({fid_name})"
        ax.errorbar(xs, ys, yerr=errs, marker="o", ms=4, capsize=3, label=label)
        for x, y, _, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("compute (% of static-sampling FLOPs)")
    fids = [y for points in series.values() for _, y, _, _ in points if y > 0]
    wide = bool(fids) and max(fids) > 10 * min(fids)  # a failed schedule would flatten the band of the claim
    if wide:
        ax.set_yscale("log")
    ax.set_ylabel("FID (mean over seeds, error bar: std" + (", log scale)" if wide else ")"))
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_wandb(settings: Mapping, card: Mapping, run_name: str, group: str, images: Mapping[str, Path],
                 rows: list[Mapping]) -> bool:
    """Log one evaluation to W&B when ``settings.project`` is set; any failure is a warning. Returns success."""
    if not settings.get("project"):
        return False
    try:
        import wandb

        mode = settings.get("mode") or os.environ.get("WANDB_MODE") or (
            "online" if wandb_credentials() else "offline"
        )
        config = {k: v for k, v in card.items() if k not in ("metrics", "skipped")}
        run = wandb.init(project=settings["project"], entity=settings.get("entity"), group=settings.get("group") or group,
                         name=run_name, mode=mode, dir=settings.get("dir"), config=config, job_type="eval")
        try:
            payload = {f"eval/{k}": v for k, v in card["metrics"].items()}
            payload["eval/compute_fraction"] = card["compute_fraction"]
            payload.update({f"eval/{name}": wandb.Image(str(p)) for name, p in images.items() if p and Path(p).exists()})
            columns = sorted({c for r in rows for c in r})
            data = [[None if r.get(c, "") == "" else r[c] for c in columns] for r in rows]  # typed W&B columns
            payload["eval/results"] = wandb.Table(columns=columns, data=data)
            run.log(payload)
        finally:
            run.finish()
        return True
    except Exception as err:  # W&B is a mirror of files already written: never lose an evaluation to it
        log.warning("W&B logging skipped (%s: %s); the results are in the table", type(err).__name__, err)
        return False
