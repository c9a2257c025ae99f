"""Preflight checks: ``python -m flexdit_train.doctor [+experiment=NAME] [overrides]``.

Composes the same config as training (``conf/train.yaml`` plus the given Hydra overrides) and checks what
otherwise fails only after a job has waited in the queue: GPUs vs ``trainer.accelerator``, the SLURM task
layout vs ``trainer.devices`` x ``trainer.num_nodes``, the global batch vs the world size, shard counts vs
ranks x loader workers, that checkpoints load, that Inception weights are on disk when FID runs, and how
W&B will log. Run it where training runs (inside the sbatch script, before ``srun``); with ``-m`` it
checks job 0 of a sweep submission. Prints one ``OK``/``WARN``/``FAIL`` line per finding, each FAIL
naming the fix; exits 1 when anything fails.
Shard patterns with braces need quotes: ``data.train_shards='/data/train-{000000..000127}.tar'``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, read_write

from flexdit_train import CONF_DIR
from flexdit_train.runtime.loggers import wandb_credentials

OK, WARN, FAIL = "OK", "WARN", "FAIL"
# Lightning ignores SLURM (and launches its own processes) in jobs with these names.
INTERACTIVE_JOB_NAMES = ("bash", "interactive")
# `-m` as given to training: check job 0 of the submission (its run directory is <sweep dir>/0).
MULTIRUN_FLAGS = ("-m", "--multirun")
# ckpt_path values Lightning resolves itself at fit time.
LIGHTNING_CKPT_KEYWORDS = ("last", "hpc", "best", "registry")


@dataclass(frozen=True)
class Finding:
    """One printed line: status, the check's name and a message (a FAIL names the fix)."""

    status: str
    check: str
    message: str

    def line(self) -> str:
        return f"{self.status:<4} {self.check}: {self.message}"


# --------------------------------------------------------------------------------------------- config
def compose_config(overrides: list[str], multirun: bool = False) -> DictConfig:
    """The training config for ``overrides``, with ``${hydra:...}`` paths resolvable as in a real run.

    ``multirun``: the run directory is that of job 0 of a ``-m`` submission (``<sweep dir>/0``).
    """
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="doctor"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # `${hydra:...}` resolves through it; it marks cfg.hydra read-only
    with read_write(cfg.hydra):
        if multirun:
            cfg.hydra.job.num = 0
            run_dir = os.path.join(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir))
        else:
            run_dir = str(cfg.hydra.run.dir)
        cfg.hydra.runtime.output_dir = os.path.abspath(run_dir)  # what resume=auto searches
    HydraConfig.instance().set_config(cfg)
    return cfg


def devices_per_node(trainer: Mapping) -> int:
    """Processes per node Lightning starts for ``trainer.devices`` (int, list, "0,1", "auto" or -1)."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, ListConfig)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text.isdigit() and int(text) > 0:
        return int(text)
    # "auto" / -1: every visible device; Lightning runs one process on CPU
    if str(trainer.get("accelerator", "auto")).lower() == "cpu":
        return 1
    return max(1, torch.cuda.device_count())


def world_size(cfg: DictConfig) -> int:
    return devices_per_node(cfg.trainer) * int(cfg.trainer.get("num_nodes", 1))


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# --------------------------------------------------------------------------------------------- checks
def check_accelerator(cfg: DictConfig) -> list[Finding]:
    """CUDA availability and GPU count vs trainer.accelerator / trainer.devices; precision support."""
    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    precision = str(trainer.get("precision", "32-true"))
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator in ("gpu", "cuda"):
        if not visible:
            return [Finding(FAIL, "accelerator", (
                f"trainer.accelerator={accelerator} but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
                "GPU: run the doctor where training runs (inside the job), or set trainer=cpu"))]
        wanted = devices_per_node(trainer)
        if wanted > visible:
            return [Finding(FAIL, "accelerator", (
                f"trainer.devices={trainer.get('devices')} needs {wanted} GPUs per node but {visible} are visible: "
                f"set trainer.devices={visible} (cluster.gpus_per_node={visible} under cluster=slurm)"))]
        if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            return [Finding(FAIL, "accelerator", (
                f"trainer.precision={precision} but {torch.cuda.get_device_name(0)} has no bf16: "
                "set trainer.precision=16-mixed"))]
        return [Finding(OK, "accelerator", (
            f"{wanted} of {visible} visible GPU(s) per node ({torch.cuda.get_device_name(0)}), precision {precision}"))]
    if accelerator == "cpu":
        if visible:
            return [Finding(WARN, "accelerator", (
                f"trainer.accelerator=cpu although {visible} GPU(s) are visible: pick a GPU trainer config"))]
        if "16" in precision:
            return [Finding(WARN, "accelerator", (
                f"trainer.precision={precision} on CPU is 30-100x slower than fp32: set trainer.precision=32-true"))]
        return [Finding(OK, "accelerator", f"CPU training, precision {precision} (no GPU visible)")]
    found = f"{visible} GPU(s)" if visible else "no GPU, so CPU"
    return [Finding(OK, "accelerator", f"trainer.accelerator={accelerator}: Lightning will use {found}")]


def slurm_tasks_per_node(env: Mapping[str, str]) -> int | None:
    """Tasks per node of this SLURM job, or None when nodes run different task counts."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    # SLURM_TASKS_PER_NODE looks like "4(x2)" (uniform) or "4,2" (uneven)
    counts = {int(m) for m in re.findall(r"(\d+)(?:\(x\d+\))?", env.get("SLURM_TASKS_PER_NODE", "1"))}
    return counts.pop() if len(counts) == 1 else None


def check_slurm_layout(cfg: DictConfig, env: Mapping[str, str]) -> list[Finding]:
    """Under SLURM: tasks per node and node count must equal trainer.devices and trainer.num_nodes."""
    devices, num_nodes = devices_per_node(cfg.trainer), int(cfg.trainer.get("num_nodes", 1))
    if "SLURM_JOB_ID" not in env:
        return [Finding(OK, "slurm", f"not in a SLURM job: Lightning starts {devices * num_nodes} process(es) itself")]
    if env.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        return [Finding(WARN, "slurm", (
            f"SLURM job name '{env['SLURM_JOB_NAME']}': Lightning then ignores SLURM and launches its own "
            "processes; submit a named batch job (cluster=slurm names it after task_name)"))]
    if int(env.get("SLURM_NTASKS", "1")) > 1 and not env.get("SLURM_NTASKS_PER_NODE"):
        return [Finding(FAIL, "slurm", (
            f"the job sets --ntasks={env['SLURM_NTASKS']} without --ntasks-per-node, which Lightning rejects: "
            f"request --ntasks-per-node={devices}"))]
    per_node = slurm_tasks_per_node(env)
    nodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    findings = []
    if per_node != devices:
        have = "uneven task counts" if per_node is None else f"{per_node} task(s)"
        fix = f" or cluster.gpus_per_node={per_node}" if per_node else ""
        findings.append(Finding(FAIL, "slurm", (
            f"SLURM starts {have} per node but trainer.devices={cfg.trainer.get('devices')}; they must match or DDP "
            f"init hangs: request --ntasks-per-node={devices}{fix}")))
    if nodes != num_nodes:
        findings.append(Finding(FAIL, "slurm", (
            f"SLURM allocated {nodes} node(s) but trainer.num_nodes={num_nodes}: request --nodes={num_nodes} "
            f"or set cluster.nodes={nodes}")))
    workers = int(cfg.data.get("num_workers", 0))
    cpus = env.get("SLURM_CPUS_PER_TASK")
    if cpus and workers >= int(cpus):
        findings.append(Finding(WARN, "slurm", (
            f"data.num_workers={workers} loader processes share {cpus} CPU(s) per task with the training process: "
            f"request --cpus-per-task={workers + 1} (cluster.cpus_per_task) or lower data.num_workers")))
    if not findings:
        findings.append(Finding(OK, "slurm", (
            f"job {env['SLURM_JOB_ID']}: {nodes} node(s) x {per_node} task(s) matches trainer.num_nodes x devices")))
    return findings


def check_batch(cfg: DictConfig) -> list[Finding]:
    """The global batch must split evenly over the ranks."""
    world, batch = world_size(cfg), int(cfg.data.global_batch_size)
    if batch % world:
        fix = max(world, batch // world * world)
        return [Finding(FAIL, "batch", (
            f"data.global_batch_size={batch} does not split over {world} ranks: set it to a multiple of {world} "
            f"(e.g. {fix})"))]
    return [Finding(OK, "batch", f"global batch {batch} = {world} rank(s) x {batch // world}")]


def check_shards(cfg: DictConfig) -> list[Finding]:
    """Shard counts of the configured train/val sets vs ranks and ranks x loader workers."""
    from flexdit_train.data.base import WRITE_HINT
    from flexdit_train.data.index import resolve_shards

    specs = {key: cfg.data.get(key) for key in ("train_shards", "val_shards") if cfg.data.get(key) is not None}
    if not specs:
        return [Finding(OK, "shards", f"{cfg.data._target_.rsplit('.', 1)[-1]} reads no configured shard set")]
    world, workers = world_size(cfg), max(1, int(cfg.data.get("num_workers", 0)))
    readers = world * workers
    findings = []
    for key, spec in specs.items():
        try:
            n = len(resolve_shards(OmegaConf.to_object(spec) if OmegaConf.is_config(spec) else spec).urls)
        except (OSError, ValueError) as err:
            findings.append(Finding(FAIL, "shards", f"data.{key}: {one_line(err)}"))
            continue
        layout = f"data.{key} has {n} shard(s) for {world} rank(s) x {workers} worker(s) = {readers} readers"
        fewer_workers = f", or set data.num_workers={n // world}" if n >= world else ""
        if key == "train_shards" and n < world:
            findings.append(Finding(FAIL, "shards", f"{layout}; every rank needs a shard: {WRITE_HINT}"))
        elif key == "train_shards" and n < readers:
            # training resamples each rank's shards per worker: no hang, but workers then read the same shards
            findings.append(Finding(WARN, "shards", (
                f"{layout}; workers of a rank will read the same shards (correlated batches): {WRITE_HINT}"
                f"{fewer_workers}")))
        elif n < readers:
            # the fixed evaluation set is split over every reader: one without a shard stalls the others
            findings.append(Finding(FAIL, "shards", f"{layout}; every reader needs a shard: {WRITE_HINT}{fewer_workers}"))
        else:
            findings.append(Finding(OK, "shards", layout))
    return findings


def check_process(cfg: DictConfig, trained: dict | None, source: str) -> list[Finding]:
    """The objective's diffusion against the one the pretrained weights were trained with (train.py refuses
    a difference unless allow_process_change)."""
    from flexdit_train.diffusion import process_mismatch

    node = cfg.get("objective", {}).get("diffusion")
    if node is None or cfg.get("allow_process_change", False):
        return []
    mismatch = process_mismatch(trained, instantiate(node).process, source)
    return [Finding(FAIL, "checkpoint", mismatch)] if mismatch else []


def check_resumed_process(cfg: DictConfig, path: Path) -> list[Finding]:
    """The process a resumed checkpoint was trained with (training refuses another one, as for pretrained)."""
    from flexdit_train.runtime.runs import checkpoint_meta

    trained = checkpoint_meta(path).get("diffusion")
    return check_process(cfg, trained, f"resume checkpoint {path}") if trained else []


def check_checkpoints(cfg: DictConfig) -> list[Finding]:
    """model.pretrained, ckpt_path (or what resume=auto would pick) and a distillation teacher file."""
    from flexdit_train.models.loading import from_pretrained
    from flexdit_train.runtime.runs import checkpoint_step, find_resume_checkpoint

    findings = []
    pretrained = cfg.model.get("pretrained")
    if pretrained:
        try:
            # the training path itself: load, then check the shapes against the data config
            model = instantiate(cfg.model)
        except Exception as err:  # every loading failure is reported as the doctor's FAIL line
            cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
            findings.append(Finding(FAIL, "checkpoint", f"model.pretrained: {one_line(cause)}"))
        else:
            params = sum(p.numel() for p in model.parameters()) / 1e6
            findings.append(Finding(OK, "checkpoint", f"model.pretrained={pretrained} loads ({params:.1f}M parameters)"))
            findings += check_process(cfg, model.diffusion_process, pretrained)

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and str(ckpt_path) in LIGHTNING_CKPT_KEYWORDS:
        findings.append(Finding(OK, "checkpoint", f"ckpt_path={ckpt_path} is resolved by Lightning at fit time"))
    elif ckpt_path and not Path(ckpt_path).is_file():
        findings.append(Finding(FAIL, "checkpoint", f"ckpt_path={ckpt_path} is not a file: fix the path or drop ckpt_path"))
    elif ckpt_path:
        step = checkpoint_step(Path(ckpt_path))
        if step is None:
            findings.append(Finding(FAIL, "checkpoint", (
                f"ckpt_path={ckpt_path} is not a readable Lightning checkpoint (truncated or foreign): "
                "pick another checkpoint of the run, or drop ckpt_path")))
        else:
            findings.append(Finding(OK, "checkpoint", f"ckpt_path resumes at step {step}"))
            findings += check_resumed_process(cfg, Path(ckpt_path))
    elif cfg.get("resume", "auto") in ("auto", True):
        directory = Path(cfg.paths.output_dir) / "checkpoints"
        found = find_resume_checkpoint(directory)
        state = f"continues from {found}" if found else f"starts fresh (no checkpoint in {directory})"
        findings.append(Finding(OK, "checkpoint", f"resume=auto {state}"))
        if found:
            findings += check_resumed_process(cfg, found)

    teacher = cfg.get("objective", {}).get("teacher")
    if teacher not in (None, "self", "snapshot"):
        try:
            from_pretrained(teacher)
        except Exception as err:  # reported, not raised: the other checks still run
            findings.append(Finding(FAIL, "checkpoint", f"objective.teacher: {one_line(err)}"))
        else:
            findings.append(Finding(OK, "checkpoint", f"objective.teacher={teacher} loads"))
    return findings


def inception_consumers(cfg: DictConfig) -> list[tuple[str, str | None]]:
    """(config key, configured weights path) of everything that scores with Inception features: an ``eval``
    node (the evaluate app's schema: ``metrics``, ``feature_extractor``, ``inception_weights``) and callbacks
    whose ``_target_`` names FID."""
    from flexdit_train.evaluation.features import INCEPTION

    nodes = {"eval": cfg.get("eval")}
    nodes.update({f"callbacks.{name}": node for name, node in (cfg.get("callbacks") or {}).items()
                  if node is not None and "fid" in str(node.get("_target_", "")).lower()})
    return [
        (f"{key}.inception_weights", node.get("inception_weights"))
        for key, node in nodes.items()
        if node is not None and node.get("metrics", ["fid"]) and node.get("feature_extractor", INCEPTION) == INCEPTION
    ]


def check_inception(cfg: DictConfig) -> list[Finding]:
    """Inception weights must be on disk when FID runs: compute nodes usually cannot download them."""
    from flexdit_train.evaluation.features import resolve_inception_weights

    findings = []
    for key, configured in inception_consumers(cfg):
        try:
            path = resolve_inception_weights(configured)  # the evaluate app's own lookup
        except FileNotFoundError as err:
            findings.append(Finding(FAIL, "inception", f"{key}: {one_line(err)}"))
        else:
            findings.append(Finding(OK, "inception", f"{key}: {path} present"))
    return findings or [Finding(OK, "inception", "no FID evaluation configured")]


def check_wandb(cfg: DictConfig, env: Mapping[str, str]) -> list[Finding]:
    """Report how each W&B logger will run; never a FAIL (a W&B problem must not block training)."""
    findings = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None or "wandb" not in str(node.get("_target_", "")).lower():
            continue
        mode = "offline" if node.get("offline") else node.get("mode") or env.get("WANDB_MODE") or "online"
        save_dir = node.get("save_dir") or cfg.paths.output_dir
        if mode == "disabled":
            findings.append(Finding(OK, "wandb", f"logger.{name} is disabled: nothing is logged to W&B"))
            continue
        if mode in ("offline", "dryrun"):
            findings.append(Finding(OK, "wandb", (
                f"logger.{name} is offline: runs are written under {save_dir}/wandb; upload them later with "
                "`wandb sync <run dir>/wandb/offline-run-*`")))
            continue
        source = wandb_credentials(env)
        if source:
            findings.append(Finding(OK, "wandb", (
                f"logger.{name} logs online with credentials from {source}; nodes without internet need "
                "WANDB_MODE=offline")))
        else:
            findings.append(Finding(WARN, "wandb", (
                f"logger.{name} logs online but no API key was found (WANDB_API_KEY or ~/.netrc): run `wandb login`, "
                "or set WANDB_MODE=offline and `wandb sync` afterwards")))
    return findings or [Finding(OK, "wandb", "no W&B logger configured")]


def run_checks(cfg: DictConfig, env: Mapping[str, str]) -> Iterator[Finding]:
    """Every check in turn; a check that crashes (e.g. a config key it needs is missing) reports a FAIL."""
    checks: dict[str, Callable[[], list[Finding]]] = {
        "accelerator": lambda: check_accelerator(cfg),
        "slurm": lambda: check_slurm_layout(cfg, env),
        "batch": lambda: check_batch(cfg),
        "shards": lambda: check_shards(cfg),
        "checkpoint": lambda: check_checkpoints(cfg),
        "inception": lambda: check_inception(cfg),
        "wandb": lambda: check_wandb(cfg, env),
    }
    for name, check in checks.items():
        try:
            yield from check()
        except Exception as err:  # one broken check must not hide the others' findings
            yield Finding(FAIL, name, f"could not check: {one_line(err)}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__)
        return 0
    overrides = [arg for arg in args if arg not in MULTIRUN_FLAGS]
    try:
        cfg = compose_config(overrides, multirun=len(overrides) < len(args))
    except Exception as err:  # a bad override is the first finding, and the last
        print(Finding(FAIL, "config", f"{one_line(err)} (check the overrides)").line())
        return 1
    findings = []
    for finding in run_checks(cfg, os.environ):
        print(finding.line(), flush=True)
        findings.append(finding)
    failed = sum(f.status == FAIL for f in findings)
    warned = sum(f.status == WARN for f in findings)
    print(f"doctor: {failed} failed, {warned} warning(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
