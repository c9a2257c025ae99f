"""EDT's attention modulation matrix (AMM): closed-form values, the cut-off, and AMM as a sampling option."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.models import perturbed_dit
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import flexdit_train
from flexdit_train.models import export_safetensors
from flexdit_train.models.amm import (
    amm_period,
    amm_radius,
    attention_modulation,
    grid_distances,
    modulation_matrix,
)
from flexdit_train.models.flex import flexify
from flexdit_train.models.video_dit import VideoDiT
from flexdit_train.sample import run_sampling


def test_closed_form_value_at_zero_distance_and_cut_off_radius():
    m = modulation_matrix((16, 16))  # (256, 256)
    assert m.shape == (256, 256)
    assert m[0, 0].item() == pytest.approx(0.5 * math.e, abs=1e-6)
    assert m.diagonal().min().item() == pytest.approx(1.3591409, abs=1e-6)
    # T = 4 * 15 * sqrt(2), R = sqrt(2^2 + 15^2): token 0 -> token 47 (row 2, column 15) sits exactly at R
    period, radius = amm_period((16, 16)), amm_radius((16, 16))
    assert period == pytest.approx(4 * 15 * math.sqrt(2)) and radius == pytest.approx(math.sqrt(229))
    at_radius = 0.5 * math.exp(math.cos(2 * math.pi * radius / period))
    assert at_radius == pytest.approx(0.7727, abs=1e-4)
    assert m[0, 47].item() == pytest.approx(at_radius, abs=1e-6)  # kept
    assert m[0, 63].item() == 0.0  # row 3, column 15: d = 15.30 > R, zeroed
    assert m[0, 255].item() == 0.0  # the far corner
    assert m[0, 46].item() == pytest.approx(0.5 * math.exp(math.cos(2 * math.pi * math.sqrt(200) / period)), abs=1e-6)
    # the cut keeps exactly the pairs within R, and every kept entry is >= the value at R
    d = grid_distances((16, 16))
    assert torch.equal(m > 0, d <= radius)
    assert m[m > 0].min().item() == pytest.approx(at_radius, abs=1e-6)


@pytest.mark.parametrize("grid", [(16, 16), (8, 8), (4, 6), (3, 1)])
def test_matrix_is_symmetric_and_cut_by_distance(grid):
    m = modulation_matrix(grid)
    tokens = grid[0] * grid[1]
    assert m.shape == (tokens, tokens) and m.dtype == torch.float32
    assert torch.equal(m, m.T)
    assert torch.equal(m > 0, grid_distances(grid) <= amm_radius(grid))
    assert torch.allclose(m.diagonal(), torch.full((tokens,), 0.5 * math.e))
    # the non-square generalisation: T = 4 x the grid diagonal, R from the longer side
    assert amm_period(grid) == pytest.approx(4 * math.hypot(grid[0] - 1, grid[1] - 1))
    assert amm_radius(grid) == pytest.approx(math.hypot(2, max(grid) - 1))


def test_one_token_grid_and_bad_grid():
    assert modulation_matrix((1, 1)).tolist() == [[pytest.approx(0.5 * math.e)]]
    with pytest.raises(ValueError, match="positive sides"):
        modulation_matrix((0, 4))


def _inputs(seed: int = 0, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, size, size, generator=g), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 7])


def test_off_is_bit_identical_to_the_sdpa_path():
    model = perturbed_dit()
    x, t, y = _inputs()
    with torch.no_grad():
        before = model(x, t, y)
        model.set_attention_modulation([1, 2])
        on = model(x, t, y)
        model.set_attention_modulation([])
        off = model(x, t, y)
        with attention_modulation(model, [2]):
            assert model.amm_blocks == (2,)
        after_context = model(x, t, y)
    assert torch.equal(before, off) and torch.equal(before, after_context)
    assert model.amm_blocks == () and all(b.attn.modulation is None for b in model.blocks)
    assert not torch.allclose(before, on, atol=1e-4)  # AMM changes the prediction


def _reference_attention(attn: torch.nn.Module, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Hand-written AMM attention: softmax(q k^T / sqrt(hd)) * M, times v, per head, then the projection."""
    n, t, d = x.shape
    q, k, v = attn.qkv(x).split(d, dim=-1)  # (N, T, D) each
    heads = []
    for h in range(attn.num_heads):
        cols = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(attn.head_dim)  # (N, T, T)
        heads.append((torch.softmax(scores, dim=-1) * matrix) @ v[..., cols])  # (N, T, hd)
    return attn.proj(torch.cat(heads, dim=-1))  # (N, T, D)


def _with_reference_block(model: torch.nn.Module, block: int, grid: tuple[int, int]):
    """A copy of ``model`` whose ``block`` (1-indexed) runs the hand-written AMM attention on ``grid``."""
    import copy

    ref = copy.deepcopy(model)
    attn = ref.blocks[block - 1].attn
    attn.forward = lambda x: _reference_attention(attn, x, modulation_matrix(grid))
    return ref


def test_on_equals_a_hand_written_reference_attention():
    model = perturbed_dit()
    x, t, y = _inputs(1)
    reference = _with_reference_block(model, 2, (4, 4))
    model.set_attention_modulation([2])
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), reference(x, t, y), atol=1e-5, rtol=1e-5)
        # forward_with_cfg goes through the same forward (and its grid hook)
        xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])
        assert torch.allclose(
            model.forward_with_cfg(xx, tt, yy, 4.0), reference.forward_with_cfg(xx, tt, yy, 4.0), atol=1e-5
        )


def test_flexible_model_builds_the_matrix_of_each_patch_size_grid():
    flex = flexify(perturbed_dit(), patch_sizes=(2, 4), mode="shared").eval()
    x, t, y = _inputs(2)
    flex.set_attention_modulation([1])
    with torch.no_grad():
        for patch, grid in ((2, (4, 4)), (4, (2, 2)), (2, (4, 4))):
            reference = _with_reference_block(flex, 1, grid)
            reference.set_attention_modulation([])
            assert torch.allclose(flex(x, t, y, patch_size=patch), reference(x, t, y, patch_size=patch), atol=1e-5)
        # another latent size: the grid follows the input, 16x16 latents at patch 4 -> 4x4 tokens
        big = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        reference = _with_reference_block(flex, 1, (4, 4))
        reference.set_attention_modulation([])
        assert torch.allclose(flex(big, t, y, patch_size=4), reference(big, t, y, patch_size=4), atol=1e-5)


def test_a_deep_copy_tracks_its_own_grid():
    import copy

    flex = flexify(perturbed_dit(), patch_sizes=(2, 4), mode="shared").eval()
    flex.set_attention_modulation([2])
    twin = copy.deepcopy(flex)
    x, t, y = _inputs(4)
    with torch.no_grad():
        expected = flex(x, t, y, patch_size=4)
        flex(x, t, y, patch_size=2)  # the original's grid moves to 4x4; the copy's must not follow
        assert torch.equal(twin(x, t, y, patch_size=4), expected)
        twin.set_attention_modulation([])
        assert flex.amm_blocks == (2,) and flex.blocks[1].attn.modulation is not None


def test_bad_blocks_are_one_line_value_errors():
    model = perturbed_dit()
    for blocks, match in (([0], r"not blocks of this 2-block model"), ([3], r"1\.\.2"), (8, "must be a list")):
        with pytest.raises(ValueError, match=match) as err:
            model.set_attention_modulation(blocks)
        assert "\n" not in str(err.value)
    video = VideoDiT(input_size=(2, 8, 8), patch_size=(1, 2, 2), in_channels=4, hidden_size=32, depth=2,
                     num_heads=4, num_classes=5)
    with pytest.raises(ValueError, match="2-D token grids"):
        video.set_attention_modulation([1])
    video.set_attention_modulation([])  # off is fine for every arch


def test_the_sampling_knob_reaches_the_model(tmp_path):
    ckpt = export_safetensors(perturbed_dit(), tmp_path / "dit.safetensors")
    conf_dir = str(Path(flexdit_train.__file__).parent / "conf")
    with initialize_config_dir(version_base="1.3", config_dir=conf_dir):
        assert list(compose("sample").amm_blocks) == [] and list(compose("evaluate").amm_blocks) == []  # off
    samples = {}
    for blocks in ([], [2]):
        with initialize_config_dir(version_base="1.3", config_dir=conf_dir):
            cfg = compose("sample", return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = cfg.out_dir = str(tmp_path / f"run{len(blocks)}")
            cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.checkpoint, cfg.amm_blocks = str(ckpt), blocks
        cfg.num_samples, cfg.sampling_steps, cfg.cfg_scale, cfg.progress, cfg.device = 2, "ddim3", 1.5, False, "cpu"
        HydraConfig.instance().set_config(cfg)
        card = run_sampling(cfg)["card"]
        assert card["amm_blocks"] == blocks
        assert json.loads((tmp_path / f"run{len(blocks)}" / "samples.json").read_text())["amm_blocks"] == blocks
        samples[len(blocks)] = np.load(tmp_path / f"run{len(blocks)}" / "samples.npz")["arr_0"].astype(int)
    assert np.abs(samples[0] - samples[1]).max() > 0  # the modulated blocks changed the samples
