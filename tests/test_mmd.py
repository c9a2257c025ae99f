"""The shared objective's options: bootstrapped MMD chains, per-size timestep ranges and loss weights."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from helpers.models import pretrained_like

from flexdit_train.diffusion import create_diffusion
from flexdit_train.models.flex import flexify
from flexdit_train.training.flex_objectives import FlexSharedModule, TimestepRanges
from flexdit_train.training.mmd import BootstrappedMMD, mmd2


def test_mmd_is_near_zero_for_one_distribution_and_large_for_two():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    same = float(mmd2(a, b))
    shifted = float(mmd2(a, b + 0.5))
    assert abs(same) < 0.01  # unbiased: fluctuates around 0
    assert shifted > 20 * max(abs(same), 1e-3)
    assert float(mmd2(a, b + 1.0)) > shifted  # grows with the gap
    with pytest.raises(ValueError, match="at least 2 samples"):
        mmd2(a[:1], b)


def test_chain_draws_stay_on_the_grid_and_favour_low_noise():
    mmd = BootstrappedMMD(weight=1.0, grid_steps=50, chain_steps=3, low_noise_bias=2.0)
    rng = np.random.default_rng(0)
    draws = [mmd.draw(rng) for _ in range(4000)]
    assert all(k1 - k2 == 3 and 0 <= k2 and k1 <= 49 and 0 <= w <= 3 for k1, k2, w in draws)
    ends = np.array([k2 for _, k2, _ in draws])
    assert (ends < 23).mean() > 0.65  # u² puts ~70% of the chain ends in the low-noise half
    assert {w for _, _, w in draws} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="grid_steps > chain_steps"):
        BootstrappedMMD(weight=1.0, grid_steps=3, chain_steps=3)


def test_mmd_chain_runs_weak_steps_first_and_trains_both_paths():
    model = flexify(pretrained_like(), patch_sizes=(2, 4), mode="shared").train()
    calls = []

    def traced(x, t, y, patch_size):
        calls.append(patch_size)
        return model(x, t, y, patch_size=patch_size)

    mmd = BootstrappedMMD(weight=2.0, grid_steps=10, chain_steps=3)
    process = create_diffusion("").process
    x0 = torch.randn(8, 4, 8, 8)
    rng = np.random.default_rng(5)
    _, _, weak_steps = BootstrappedMMD(weight=2.0, grid_steps=10, chain_steps=3).draw(np.random.default_rng(5))
    loss, drawn = mmd.loss(traced, x0, {"y": torch.arange(8) % 5}, process, True, 2, 4, rng)
    assert calls == [4] * weak_steps + [2] * (3 - weak_steps)
    assert drawn["mmd_weak_steps"] == weak_steps and loss.item() == pytest.approx(2.0 * drawn["mmd"], rel=1e-5)
    loss.backward()
    assert model.flex_embed.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_timestep_ranges_restrict_each_size_to_its_noise_levels():
    ranges = TimestepRanges({4: [0.3, 1.0], 8: (0.0, 0.25)})
    diffusion = create_diffusion("")
    t4 = ranges.sample(diffusion, 5000, "cpu", 4)
    t8 = ranges.sample(diffusion, 5000, "cpu", 8)
    t2 = ranges.sample(diffusion, 5000, "cpu", 2)
    assert int(t4.min()) >= 300 and int(t4.max()) == 999
    assert int(t8.min()) == 0 and int(t8.max()) <= 249
    assert int(t2.min()) < 50 and int(t2.max()) > 950  # unlisted: the whole chain
    for bad in ([0.5, 0.5], [-0.1, 1.0], [0.2, 1.2]):
        with pytest.raises(ValueError, match="must satisfy 0 <= lo < hi <= 1"):
            TimestepRanges({4: bad})


def test_shared_objective_scales_the_loss_of_a_size_and_rejects_unknown_sizes():
    torch.manual_seed(0)
    model = flexify(pretrained_like(), patch_sizes=(2, 4), mode="shared")
    adamw = partial(torch.optim.AdamW, lr=1e-3)
    plain = FlexSharedModule(model, create_diffusion(""), adamw)
    scaled = FlexSharedModule(model, create_diffusion(""), adamw, patch_size_loss_weights={4: 0.25})
    batch = {"x": torch.randn(4, 4, 8, 8), "y": torch.arange(4)}
    for patch, factor in ((4, 0.25), (2, 1.0)):
        torch.manual_seed(1)
        _, a = plain.compute_losses(batch, patch)
        torch.manual_seed(1)
        _, b = scaled.compute_losses(batch, patch)
        assert torch.allclose(b["loss"], factor * a["loss"]) and torch.equal(b["mse"], a["mse"])
    with pytest.raises(ValueError, match=r"patch_size_loss_weights uses patch sizes \[8\]"):
        FlexSharedModule(model, create_diffusion(""), adamw, patch_size_loss_weights={8: 1.0})
    with pytest.raises(ValueError, match=r"timestep_ranges uses patch sizes \[8\]"):
        FlexSharedModule(model, create_diffusion(""), adamw, timestep_ranges={8: [0.5, 1.0]})
