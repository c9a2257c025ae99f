"""The shipped MNIST teacher converted to the miniature SparseDiT: its diffusion loss on the validation digits
before and after a short fine-tune with the timestep-aware sparse grids, against the teacher's.

    OMP_NUM_THREADS=1 python benchmarks/mnist_sparse_dit_loss.py --steps 300 --json out.json

The loss is the training objective's per-sample ``mse`` term (v prediction) averaged over the 500 validation digits
at 10 fixed timesteps (the same noise for every model), per fixed sparse grid and with the density schedule's grid
at each timestep. The fine-tune is a plain loop (AdamW, the mnist_sparse_dit learning rate, no EMA), so it shows
how far the converted network starts from the teacher and how fast it recovers, not a converged result.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

import flexdit_train
from flexdit_train.data.mnist import load_mnist_digits, split_train_val
from flexdit_train.diffusion import sampling_diffusion
from flexdit_train.models import from_pretrained
from flexdit_train.models.sparse_dit import convert_pretrained
from flexdit_train.training.sparse_density import SparseDensityModule

TEACHER = Path(flexdit_train.__file__).parent / "assets" / "mnist_dit_teacher.safetensors"
LAYOUT = dict(num_pooling=1, num_sdtm=1, sdtm_layers=[1, 1, 1, 0], num_top=0)  # conf/model/sparse_dit_mnist.yaml
TIMESTEPS = [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]


def digits(indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images[indices]).float().div(127.5).sub(1.0).unsqueeze(1)  # (N, 1, 32, 32) in [-1, 1]
    return x, torch.from_numpy(labels[indices])


@torch.no_grad()
def val_mse(model, diffusion, x, y, grid_of_t) -> float:
    """Mean ``mse`` over the digits at every timestep of TIMESTEPS, fixed noise; ``grid_of_t(t)``: the sparse grid."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for step in TIMESTEPS:
        noise = torch.randn(x.shape, generator=g)
        t = torch.full((len(x),), step, dtype=torch.long)
        cond = {"y": y} if grid_of_t is None else {"y": y, "sparse_grid": grid_of_t(step)}
        total += float(diffusion.training_losses(model, x, t, cond=cond, noise=noise)["mse"].mean())
    return total / len(TIMESTEPS)


def scores(model, teacher, diffusion, x, y, density) -> dict:
    out = {"teacher": val_mse(teacher, diffusion, x, y, None)}
    for s in range(density.min_grid, density.max_grid + 1):
        out[f"sparse_{s}"] = val_mse(model, diffusion, x, y, lambda t, s=s: s)
    out["density"] = val_mse(model, diffusion, x, y, lambda t: density.grid_at_noise(t / 999))
    return {k: round(v, 5) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="fine-tune steps (0: conversion only)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = from_pretrained(TEACHER).eval()
    diffusion = sampling_diffusion(teacher.diffusion_process, "", teacher.learn_sigma)
    model = convert_pretrained(teacher, **LAYOUT)
    images, labels = load_mnist_digits()
    train_idx, val_idx = split_train_val(labels)
    x_val, y_val = digits(val_idx, images, labels)
    module = SparseDensityModule(model, diffusion, functools.partial(torch.optim.AdamW, lr=args.lr))
    result = {"layout": model.layout, "sparse_grid_range": model.config["sparse_grid_range"],
              "converted": scores(model, teacher, diffusion, x_val, y_val, module.density)}
    print(json.dumps(result["converted"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(0)
    start = time.monotonic()
    model.train()
    for step in range(args.steps):
        x, y = digits(rng.choice(train_idx, size=args.batch, replace=False), images, labels)
        _, terms = module.compute_losses({"x": x, "y": y}, None)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].mean().backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {float(terms['loss'].detach().mean()):.4f}", flush=True)
    if args.steps:
        result["fine_tuned"] = {"steps": args.steps, "batch": args.batch, "lr": args.lr,
                                "seconds": round(time.monotonic() - start, 1),
                                **scores(model, teacher, diffusion, x_val, y_val, module.density)}
        print(json.dumps(result["fine_tuned"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
