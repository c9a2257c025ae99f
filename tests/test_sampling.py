"""Flexible sampling: per-step patch sizes, both guidance modes, seeds, and the sampling app's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.models import perturbed_dit
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import flexdit_train
from flexdit_train.diffusion import create_diffusion
from flexdit_train.flops import cost_model
from flexdit_train.models import DiT, export_safetensors
from flexdit_train.models.flex import flexify
from flexdit_train.sample import run_sampling
from flexdit_train.sampling import (
    ScheduledDenoiser,
    generate,
    sample_labels,
    sample_noise,
    weak_guidance_scale,
)
from flexdit_train.sampling.schedule import from_powerful_steps, static

CONF_DIR = str(Path(flexdit_train.__file__).parent / "conf")


def perturbed(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give adaLN-Zero's zero-initialised layers values so predictions are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_flex(mode: str = "shared") -> torch.nn.Module:
    torch.manual_seed(0)
    base = perturbed(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=5))
    return flexify(base, patch_sizes=(2, 4), mode=mode).eval()


def test_weak_guidance_scale_follows_the_paper_ratio():
    assert weak_guidance_scale(1.5) == pytest.approx(1.2)
    assert weak_guidance_scale(4.0) == pytest.approx(2.2)
    assert (1 - 4.0) / (1 - weak_guidance_scale(4.0)) == pytest.approx(2.5)


def test_noise_and_labels_depend_only_on_seed_and_index():
    a, _ = sample_noise(3, [0, 1, 2, 3], (1, 4, 4))
    b, _ = sample_noise(3, [2, 3], (1, 4, 4))
    assert torch.equal(a[2:], b)
    assert not torch.equal(a[0], a[1])
    assert torch.equal(sample_labels(3, [5, 6, 7], 10), sample_labels(3, range(8), 10)[5:])


def test_scheduled_denoiser_applies_each_guidance_rule_per_step():
    model = tiny_flex()
    diffusion = create_diffusion("4")
    tmap = diffusion.timestep_map.tolist()
    # steps (noisiest first): cond 4,4,2,2 ; guidance 4,4,4,2
    cond_p, guide_p = [4, 4, 2, 2], [4, 4, 4, 2]
    x = torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 3])
    null = torch.full_like(y, model.null_class)
    s1, s2 = 3.0, weak_guidance_scale(3.0)
    for guidance in ("weak_conditional", "standard"):
        den = ScheduledDenoiser(model, tmap, cond_p, guide_p, cfg_scale=s1, guidance=guidance, guide_all_channels=True)
        with torch.no_grad():
            for k in range(4):
                t = torch.full((2,), tmap[3 - k])
                out = den(x, t, y)
                cond = model(x, t, y, patch_size=cond_p[k])
                if cond_p[k] == guide_p[k]:
                    guide, scale = model(x, t, null, patch_size=guide_p[k]), s1
                elif guidance == "weak_conditional":
                    guide, scale = model(x, t, y, patch_size=guide_p[k]), s2
                else:
                    guide, scale = model(x, t, null, patch_size=guide_p[k]), s1
                expected = guide[:, :4] + scale * (cond[:, :4] - guide[:, :4])
                assert torch.allclose(out[:, :4], expected, atol=1e-5), (guidance, k)
                assert torch.allclose(out[:, 4:], cond[:, 4:], atol=1e-6)  # variance from the cond branch


def static_guidance(model: torch.nn.Module, cfg_scale: float, guide_all_channels: bool | None = None):
    """The samplers' guidance at the native patch on every step of DiT's whole 1000-step chain."""
    patches = [model.native_patch_size] * 1000
    return ScheduledDenoiser(model, list(range(1000)), patches, patches, cfg_scale,
                             guide_all_channels=guide_all_channels)


def test_guidance_at_scale_one_is_the_conditional_prediction():
    model = perturbed_dit()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 999])
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        guided = static_guidance(model, cfg_scale=1.0)(x, t, y)
        cond = model(x, t, y)
    assert guided.shape == (3, 8, 8, 8)
    torch.testing.assert_close(guided, cond, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guide_all_channels", [False, True])
def test_guidance_combines_the_conditional_and_null_branches(guide_all_channels):
    model = perturbed_dit()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    y = torch.tensor([4, 5])
    with torch.no_grad():
        guided = static_guidance(model, 4.0, guide_all_channels=guide_all_channels)(x, t, y)
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, model.null_class))
    n_guided = 4 if guide_all_channels else 3
    expected = uncond[:, :n_guided] + 4.0 * (cond[:, :n_guided] - uncond[:, :n_guided])
    torch.testing.assert_close(guided[:, :n_guided], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided[:, n_guided:], cond[:, n_guided:], rtol=1e-5, atol=1e-5)


def test_static_schedule_reproduces_dit_three_channel_cfg():
    model = tiny_flex()
    diffusion = create_diffusion("3")
    tmap = diffusion.timestep_map.tolist()
    den = ScheduledDenoiser(model, tmap, [2, 2, 2], [2, 2, 2], cfg_scale=4.0)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 4])
    t = torch.full((2,), tmap[1])
    with torch.no_grad():
        ref = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]),
                                     torch.cat([y, torch.full_like(y, model.null_class)]), 4.0)[:2]
        assert torch.allclose(den(x, t, y), ref, atol=1e-5)


def test_guided_channels_follow_the_arch_unless_set():
    from flexdit_train.models.video_dit import VideoDiT

    video = VideoDiT(input_size=(2, 8, 8), in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    tmap = create_diffusion("2").timestep_map.tolist()
    for model, default in ((tiny_flex(), 3), (video, 4)):  # DiT's 3-channel quirk; a new arch guides all
        patch = [model.native_patch_size] * 2
        assert ScheduledDenoiser(model, tmap, patch, patch, cfg_scale=4.0).guided_channels == default
        assert ScheduledDenoiser(model, tmap, patch, patch, 4.0, guide_all_channels=True).guided_channels == 4
        assert ScheduledDenoiser(model, tmap, patch, patch, 4.0, guide_all_channels=False).guided_channels == 3


def test_schedule_errors_are_one_line():
    model = tiny_flex()
    tmap = create_diffusion("3").timestep_map.tolist()
    with pytest.raises(ValueError, match="more powerful than the conditional"):
        ScheduledDenoiser(model, tmap, [4, 4, 4], [4, 2, 2], cfg_scale=2.0)
    with pytest.raises(ValueError, match="the schedule has 2 steps but the sampler runs 3"):
        ScheduledDenoiser(model, tmap, [4, 2], None)
    with pytest.raises(ValueError, match="patch size 3 is not one of this model.s patch sizes"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([1]), patch_size=3)


def test_generate_under_a_budget_is_independent_of_batching():
    model = tiny_flex()
    diffusion = create_diffusion("ddim10")
    sched = from_powerful_steps(10, 2, 4, powerful_steps=4, powerful_steps_guidance=2)
    labels = torch.tensor([0, 1, 2, 3])
    kwargs = dict(cond_patch_sizes=sched.cond_patch_sizes, guidance_patch_sizes=sched.guidance_patch_sizes,
                  cfg_scale=2.0)
    together = generate(model, diffusion, labels, 11, [0, 1, 2, 3], **kwargs)
    alone = generate(model, diffusion, labels[2:3], 11, [2], **kwargs)
    assert together.shape == (4, 4, 8, 8) and torch.isfinite(together).all()
    assert torch.allclose(together[2:3], alone, atol=1e-4)
    static_out = generate(model, diffusion, labels, 11, [0, 1, 2, 3], cfg_scale=2.0)
    assert not torch.allclose(static_out, together)  # the weak steps changed the trajectory


@pytest.fixture()
def sample_cfg(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("sample", overrides=["budget=paper_130_130"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.cwd = str(tmp_path)
    return cfg


def test_sample_app_writes_grid_adm_npz_and_card(sample_cfg, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    ckpt = export_safetensors(tiny_flex("lora"), tmp_path / "flex.safetensors")
    cfg = sample_cfg
    cfg.checkpoint = str(ckpt)
    cfg.num_samples, cfg.batch_size, cfg.sampling_steps, cfg.cfg_scale = 5, 2, "ddim25", 1.5
    cfg.progress, cfg.device = False, "cpu"
    HydraConfig.instance().set_config(cfg)
    result = run_sampling(cfg)
    out = tmp_path / "run"
    data = np.load(out / "samples.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 8, 4)
    assert data["arr_1"].dtype == np.int64 and data["arr_1"].shape == (5,)
    assert (out / "grid.png").stat().st_size > 0
    card = json.loads((out / "samples.json").read_text())
    # 13 of 25 steps powerful on both branches (0.52 * 25 rounded half-up)
    assert card["nfe"] == {"cond": {"2": 13, "4": 12}, "guidance": {"2": 13, "4": 12}}
    assert card["weak_guidance_scale"] == pytest.approx(1.2)
    # merged LoRA costs nothing extra: fraction = (13 + 12 r) / 25 with r = cost(p4) / cost(p2)
    cost = cost_model(tiny_flex())  # no LoRA term: merged adapters
    r = cost(4) / cost(2)
    assert card["compute_fraction"] == pytest.approx((13 + 12 * r) / 25)
    assert card["compute_fraction"] == pytest.approx(result["card"]["compute_fraction"])
    for key in ("seed", "cfg_scale", "guidance", "sampling_steps", "schedule", "checkpoint"):
        assert key in card
    assert card["guide_all_channels"] is False  # null in sample.yaml: DiT's convention, recorded as resolved
    # the same sample indices under another batch size give the same images
    cfg.batch_size = 5
    cfg.out_dir = str(tmp_path / "run2")
    run_sampling(cfg)
    again = np.load(tmp_path / "run2" / "samples.npz")
    assert np.abs(again["arr_0"].astype(int) - data["arr_0"].astype(int)).max() <= 1
    assert np.array_equal(again["arr_1"], data["arr_1"])


def test_static_budget_of_a_static_model_is_full_compute(sample_cfg, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    torch.manual_seed(0)
    model = perturbed(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=4,
                          num_classes=5))
    cfg = sample_cfg
    cfg.checkpoint = str(export_safetensors(model, tmp_path / "static.safetensors"))
    cfg.budget = {"mode": "static", "name": "static"}
    cfg.num_samples, cfg.sampling_steps, cfg.progress, cfg.device = 2, "ddim5", False, "cpu"
    HydraConfig.instance().set_config(cfg)
    card = run_sampling(cfg)["card"]
    assert card["compute_fraction"] == pytest.approx(1.0)
    assert card["nfe"]["cond"] == {"2": 5}
    weak = static(5, 2)
    assert weak.compute_fraction(lambda p: 1.0) == 1.0
