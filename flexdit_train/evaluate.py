"""Evaluation app: ``python -m flexdit_train.evaluate checkpoint=PATH eval=fid10k budget=paper_70_70``.

Samples ``eval.num_samples`` images under a compute budget (noise and label of sample i derive from
``(seed, i)``, so any number of ranks gives the same set), decodes latents through the VAE, and scores
them against a reference: FID (float64, our Fréchet distance), IS, KID, precision/recall and, on MNIST,
the digit accuracy. Writes ``eval.json`` (the eval card) and ``grid.png`` into the run directory and
upserts a row into ``results.csv`` / ``results.md`` / ``fid_vs_compute.png`` in the results directory,
which a ``-m`` sweep over budgets and checkpoints shares. Under torchrun each rank samples the indices
``i % world == rank``; rank 0 gathers them and computes the metrics.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from flexdit_train import CONF_DIR
from flexdit_train.evaluation.card import write_card
from flexdit_train.evaluation.features import Extractor, extract_features, resolve_extractor
from flexdit_train.evaluation.metrics import check_metrics, compute_metrics
from flexdit_train.evaluation.reference import load_reference, reference_kind
from flexdit_train.evaluation.report import log_to_wandb, read_table, record_result, table_row
from flexdit_train.models.arch import arch_of
from flexdit_train.runtime.errors import check_range, report_errors
from flexdit_train.sampling.outputs import sampling_card, save_uint8_grid, write_outputs
from flexdit_train.sampling.pipeline import Sampler, resolve_device
from flexdit_train.sampling.seeds import sample_labels, seed_protocol

log = logging.getLogger(__name__)


def init_distributed(timeout_minutes: float) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun with more than one process."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_indices(num_samples: int, rank: int, world: int) -> list[int]:
    """The global sample indices this rank generates: i % world == rank."""
    return list(range(rank, num_samples, world))


def gather_samples(local: torch.Tensor, num_samples: int, rank: int, world: int) -> torch.Tensor | None:
    """All images (N, ...) in index order on rank 0 (None elsewhere) from each rank's ``rank_indices`` share."""
    if world == 1:
        return local
    parts = [None] * world if rank == 0 else None
    dist.gather_object(local.cpu(), parts, dst=0)
    if rank != 0:
        return None
    images = torch.empty((num_samples, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        images[r::world] = part  # rank r holds indices r, r + world, ...
    return images


def results_dir(cfg: DictConfig) -> Path:
    """``cfg.results_dir``, else the sweep directory under ``-m`` (shared by its jobs), else the run directory."""
    if cfg.results_dir:
        return Path(cfg.results_dir)
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else hydra_cfg.runtime.output_dir)


def sample_step(cfg: DictConfig, device: torch.device, rank: int, world: int) -> tuple[Sampler, torch.Tensor | None, dict]:
    """Sample this rank's share of ``eval.num_samples`` under the budget; rank 0 gets every image in index
    order (uint8 (N, H, W, C)) and the sampling card, the other ranks None and the card."""
    ev = cfg.eval
    num_samples = int(ev.num_samples)
    sampler = Sampler.from_config(cfg, ev, device)
    model = sampler.model
    if arch_of(model).conditioning != "class" or len(model.input_size) != 2:
        # FID/IS need class-conditional images; video and text metrics are not built
        raise ValueError(
            f"evaluate scores class-conditional image DiTs, {cfg.checkpoint} is a {arch_of(model).name}: "
            "sample it with python -m flexdit_train.sample"
        )
    indices = rank_indices(num_samples, rank, world)
    start = time.time()
    local = sampler.sample_images(sample_labels(cfg.seed, indices, model.num_classes, ev.labels), cfg.seed, indices,
                                  int(cfg.batch_size), cfg.progress)  # uint8 (n_rank, H, W, C)
    images = gather_samples(local, num_samples, rank, world)
    card = sampling_card(
        sampler, checkpoint=cfg.checkpoint, use_ema=cfg.use_ema, seed=cfg.seed, num_samples=num_samples,
        sampling_steps=ev.sampling_steps, vae=ev.vae, latent_scale_factor=ev.latent_scale_factor,
        seconds=time.time() - start, device=device,
    )
    card.update({
        "preset": ev.name,
        "seeds": seed_protocol(num_samples, ev.labels),
        "precision": {"dtype": "bfloat16 autocast" if sampler.precision == "bf16" else "float32",
                      "compiled": sampler.network is not sampler.model,
                      "tf32": bool(cfg.allow_tf32) and device.type == "cuda",
                      "quantization": "clamp(127.5 x + 128, 0, 255) -> uint8"},
        "world_size": world,
    })
    return sampler, images, card


def score_step(cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, extractor: Extractor,
               metrics: list[str], device: torch.device) -> dict:
    """Features of the samples against the reference: the card entries of the metric backend, the
    reference, the metric values and the metrics skipped (with why)."""
    reference = load_reference(
        cfg.eval.reference, extractor, cache_dir=cfg.cache_dir, image_size=images.shape[1], channels=images.shape[3],
        device=device, batch_size=int(cfg.fidelity.batch_size), max_features=int(cfg.reference_subset),
        seed=int(cfg.fidelity.rng_seed),
    )
    features = extract_features(extractor, images, device, int(cfg.fidelity.batch_size))
    fidelity = OmegaConf.to_container(cfg.fidelity, resolve=True)
    values, skipped, used = compute_metrics(
        features, reference, metrics, extractor, labels=labels, fidelity=fidelity, device=device
    )
    import torch_fidelity

    return {
        "metric_backend": {"name": "torch-fidelity", "version": torch_fidelity.__version__,
                           "frechet": "flexdit_train.evaluation.frechet_distance (float64, eigh with clamping)",
                           "extractor": extractor.card(), "fidelity": {**fidelity, **used}, "torch": torch.__version__},
        "reference": reference.card(),
        "metrics": values,
        "skipped": skipped,
    }


def record_step(cfg: DictConfig, card: dict, grid: Path) -> dict[str, Path]:
    """eval.json, the row in the results table (and its plot) and the W&B mirror; returns their paths."""
    card_path = write_card(Path(cfg.out_dir) / "eval.json", card)
    table_dir = results_dir(cfg)
    table = record_result(table_dir, table_row(card, card_path))
    run_name = f"{Path(str(cfg.checkpoint)).stem} {card['budget']} {card['preset']}"
    log_to_wandb(cfg.wandb, card, run_name, table_dir.name, {"samples": grid, "fid_vs_compute": table["plot"]},
                 read_table(table["csv"]))
    return {"card": card_path, **table}


def run_evaluation(cfg: DictConfig) -> dict[str, Any] | None:
    """Sample, score and record one (checkpoint, budget, preset); returns the card and paths on rank 0."""
    ev = cfg.eval
    num_samples = check_range("eval.num_samples", ev.num_samples, 2, integer=True)  # statistics need 2 at least
    check_range("batch_size", cfg.batch_size, 1, integer=True)
    check_range("seed", cfg.seed, 0, integer=True)
    check_range("grid_size", cfg.grid_size, 0, integer=True)
    check_range("eval.cfg_scale", ev.cfg_scale, 1.0)
    check_range("reference_subset", cfg.reference_subset, 2, integer=True)
    rank, world = init_distributed(cfg.dist_timeout_minutes)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)  # NCCL's gather_object stages objects on the current device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.allow_tf32)

    # Everything that can fail without sampling fails first: metric names, extractor weights, reference.
    metrics = check_metrics(ev.metrics, ev.feature_extractor)
    if rank == 0:
        extractor = resolve_extractor(ev.feature_extractor, ev.inception_weights, cfg.cache_dir)
        reference_kind(ev.reference)

    sampler, images, card = sample_step(cfg, device, rank, world)
    if rank != 0:
        return None
    labels = sample_labels(cfg.seed, range(num_samples), sampler.model.num_classes, ev.labels)
    out_dir = Path(cfg.out_dir)
    if ev.save_npz:
        grid = write_outputs(out_dir, images, labels, card, int(cfg.grid_size))["grid"]  # ADM npz + sampling card
    else:
        grid = save_uint8_grid(images[: int(cfg.grid_size)], out_dir / "grid.png")
    card.update(score_step(cfg, images, labels, extractor, metrics, device))
    paths = record_step(cfg, card, grid)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in card["metrics"].items())
    print(f"{ev.name} / {card['budget']} ({card['compute_fraction']:.1%} compute): {summary}; "
          f"table {paths['markdown']}")
    return {"card": card, "paths": {"grid": str(grid), **{k: str(v) for k, v in paths.items()}}}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@report_errors
def main(cfg: DictConfig) -> None:
    try:
        run_evaluation(cfg)
    finally:
        if dist.is_initialized():  # only ever joined by init_distributed
            dist.destroy_process_group()


if __name__ == "__main__":
    # Call the importable function: submitit (hydra -m on SLURM) cannot pickle a __main__ function by value.
    from flexdit_train.evaluate import main as evaluate_main

    evaluate_main()
