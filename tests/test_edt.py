"""EDT (arXiv 2410.23788): its FLOPs against the published figures and FlopCounterMode, the network, and a
few-step training run sampled through the sampling app with the attention modulation on."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from helpers.config import compose_train
from helpers.models import perturb_trainable, perturbed_dit
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from torch.utils.flop_counter import FlopCounterMode

import flexdit_train
from flexdit_train.diffusion import create_diffusion
from flexdit_train.flops import EDT_TERMS, CostModel, cost_model, registry_arch, registry_config
from flexdit_train.flops.__main__ import main as flops_main
from flexdit_train.models import build_model, export_safetensors, flexify, from_pretrained
from flexdit_train.models.amm import modulation_matrix
from flexdit_train.models.arch import arch_of
from flexdit_train.models.edt import (
    EDT,
    EDT_AMM_BLOCKS,
    EDT_XL_RELEASE_DEPTHS,
    EDT_models,
    relative_position_index,
    token_keep_mask,
)
from flexdit_train.sample import run_sampling
from flexdit_train.sampling.cache import BlockCache
from flexdit_train.train import run
from flexdit_train.training import DiffusionModule
from flexdit_train.training.edt_masking import EDTMaskingModule


def tiny_edt(seed: int = 0, perturb: bool = True, **overrides) -> EDT:
    """16x16x4 latents, patch 2: stage grids 8 -> 4 -> 2 -> 4 -> 8, widths 32-64, 6 blocks."""
    torch.manual_seed(seed)
    kwargs = dict(input_size=16, patch_size=2, in_channels=4, widths=(32, 48, 64, 48, 32), depths=(1, 1, 2, 1, 1),
                  num_heads=(2, 2, 4, 2, 2), num_classes=10)
    model = EDT(**{**kwargs, **overrides})
    if perturb:  # adaLN-Zero and the zero output layer make a fresh model predict 0
        perturb_trainable(model, seed + 1)
    return model.eval()


def _inputs(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.arange(n) % 10


#################################################################################
#                                     FLOPs                                     #
#################################################################################


def _cli_gmacs(name: str, capsys) -> float:
    assert flops_main(["--model", name, "--image-size", "256", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == name and report["tokens"] == 256 and report["patch_size"] == 2
    return report["gmacs"]


@pytest.mark.parametrize("name,paper", [("EDT-S/2", 2.66), ("EDT-B/2", 10.20)])
def test_cli_reproduces_the_published_gmacs_of_edt_s_and_b(name, paper, capsys):
    gmacs = _cli_gmacs(name, capsys)
    assert gmacs == pytest.approx(paper, rel=0.01)
    assert gmacs == {"EDT-S/2": 2.6674, "EDT-B/2": 10.2179}[name]  # the exact count, as the CLI prints it


def test_edt_xl_count_and_the_published_figure(capsys):
    """The paper's EDT-XL (51.83 GMAC, 708.44 M parameters) is depths [5, 5, 4, 7, 7]; the authors' release
    builds [6, 4, 4, 7, 7] (one block more at 16x16, one fewer at 8x8): 53.44 GMAC, 698.52 M."""
    assert _cli_gmacs("EDT-XL/2", capsys) == pytest.approx(51.83, rel=0.01)
    config = registry_config("EDT-XL/2", 32)
    assert tuple(config["depths"]) == (5, 5, 4, 7, 7)
    release = CostModel({**config, "depths": list(EDT_XL_RELEASE_DEPTHS)}, (32, 32), EDT_TERMS)(2) / 1e9
    assert release == pytest.approx(53.4397, abs=1e-4)
    widths, heads = config["widths"], config["num_heads"]
    with torch.device("meta"):
        params = {
            depths: sum(p.numel() for p in EDT(widths=widths, depths=depths, num_heads=heads).parameters()
                        if p.requires_grad)
            for depths in ((6, 4, 4, 7, 7), (5, 5, 4, 7, 7))
        }
    assert params[(5, 5, 4, 7, 7)] / 1e6 == pytest.approx(708.44, abs=0.01)
    assert params[(6, 4, 4, 7, 7)] / 1e6 == pytest.approx(698.52, abs=0.01)


def test_cost_model_of_a_preset_name_matches_the_built_preset():
    assert registry_arch("EDT-B/2").name == "edt" and registry_arch("DiT-B/2").name == "dit"
    with torch.device("meta"):
        built = EDT_models["EDT-B/2"]()
    assert cost_model(built)(2) == cost_model("EDT-B/2")(2) == 10_217_855_232
    assert registry_config("DiT-XL/2") == {**registry_config("DiT-XL/2", 32)}  # DiT names as before


@pytest.mark.parametrize("amm", [[], [3, 4]])
def test_analytic_count_matches_flop_counter_mode(amm):
    model = tiny_edt()
    model.set_attention_modulation(amm)
    x, t, y = _inputs(1)
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    breakdown = cost_model(model).breakdown(2)
    assert breakdown["downsample"] > 0 and breakdown["upsample"] > 0 and breakdown["attention"] > 0
    # FlopCounterMode counts FLOPs = 2 x MACs; AMM's element-wise product and the bias add are not matmuls
    assert counter.get_total_flops() == pytest.approx(2 * sum(breakdown.values()), rel=0.02)


def test_full_size_edt_s_count_matches_flop_counter_mode():
    """The real EDT-S/2 at 256 px (uninitialised weights: only shapes matter to the counter), ~0.5 s on CPU."""
    with torch.device("meta"):
        model = EDT_models["EDT-S/2"]().eval()
    model = model.to_empty(device="cpu")
    x, t, y = torch.zeros(1, 4, 32, 32), torch.ones(1), torch.ones(1, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    assert counter.get_total_flops() / 2 == pytest.approx(cost_model(model)(2), rel=0.01)
    assert cost_model(model)(2) == 2_667_442_752


#################################################################################
#                                    Network                                    #
#################################################################################


def test_presets_follow_the_authors_stage_layout():
    with torch.device("meta"):
        models = {name: factory() for name, factory in EDT_models.items()}
    xl, b, s = models["EDT-XL/2"], models["EDT-B/2"], models["EDT-S/2"]
    assert xl.stage_grids == b.stage_grids == [(16, 16), (8, 8), (4, 4), (8, 8), (16, 16)]
    assert (len(xl.blocks), len(b.blocks), len(s.blocks)) == (28, 12, 12)
    assert [blk.attn.num_heads for blk in s.blocks] == [6, 6, 8, 8, 10, 10, 8, 8, 8, 6, 6, 6]
    assert [blk.attn.num_heads for blk in xl.blocks][22:] == [18] * 6
    # the authors' AMM blocks: XL 24 and 26 in the last 16x16 stage; S/B 8 (8x8) and 11 (16x16)
    factors = {name: [f for _, f in m.attention_layers()] for name, m in models.items()}
    assert [factors["EDT-XL/2"][b - 1] for b in EDT_AMM_BLOCKS["XL"]] == [1, 1]
    assert [factors["EDT-S/2"][b - 1] for b in EDT_AMM_BLOCKS["S"]] == [2, 1]
    assert sum(p.numel() for p in s.parameters() if p.requires_grad) == 38_329_146  # the release's 38.33 M


def test_forward_shapes_zero_init_and_guidance():
    fresh = tiny_edt(perturb=False)
    x, t, y = _inputs(2)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y), torch.zeros(2, 8, 16, 16))  # zero output layer
    for module in [*fresh.blocks, *fresh.down_blocks, *fresh.up_blocks, fresh.final_layer]:
        assert module.adaLN_modulation[-1].weight.abs().sum() == 0  # every conditioning layer starts at zero
    model = tiny_edt()
    with torch.no_grad():
        out = model(x, t, y)
        assert out.shape == (2, 8, 16, 16) and out.abs().mean() > 0
        xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, model.null_class)])
        guided = model.forward_with_cfg(xx, tt, yy, 3.0)
        cond, uncond = model(xx, tt, yy).chunk(2)
    assert torch.allclose(guided[:2, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.equal(guided[:2, 3:], cond[:, 3:])  # DiT's convention: the first 3 channels guided
    assert arch_of(model).name == "edt"


def test_relative_position_index_and_the_bias_reach_the_logits():
    index = relative_position_index((2, 3))  # offsets (di, dj) in [-1, 1] x [-2, 2] -> 3 x 5 table
    assert index.shape == (6, 6) and index.min() == 0 and index.max() == 14
    assert index[0, 0] == index[5, 5] == 1 * 5 + 2  # zero offset
    assert index[0, 5] == (0 - 1 + 1) * 5 + (0 - 2 + 2) and index[5, 0] == 2 * 5 + 4
    model = tiny_edt()
    x, t, y = _inputs(2)
    with torch.no_grad():
        before = model(x, t, y)
        model.blocks[0].attn.relative_position_bias_table.add_(1.0)  # a constant bias cancels in the softmax
        assert torch.allclose(model(x, t, y), before, atol=1e-5)
        model.blocks[0].attn.relative_position_bias_table.normal_()
        assert not torch.allclose(model(x, t, y), before, atol=1e-4)


def test_amm_in_an_inner_stage_uses_that_stage_grid():
    model = tiny_edt()
    x, t, y = _inputs(2)
    block = model.blocks[2]  # stage 3: 2x2 grid
    attn = block.attn
    captured = {}

    def reference(h: torch.Tensor) -> torch.Tensor:
        n, tokens, d = h.shape
        q, k, v = attn.qkv(h).reshape(n, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim) + attn.relative_position_bias()  # (N, H, T, T)
        out = (logits.softmax(-1) * modulation_matrix((2, 2))) @ v  # (N, H, T, hd)
        captured["ref"] = attn.proj(out.transpose(1, 2).reshape(n, tokens, d))
        return captured["ref"]

    with torch.no_grad():
        model.set_attention_modulation([3])
        modulated = model(x, t, y)
        model.set_attention_modulation([])
        attn.forward = reference
        assert torch.allclose(model(x, t, y), modulated, atol=1e-5)
        del attn.forward
        assert not torch.allclose(model(x, t, y), modulated, atol=1e-4)


def test_checkpoint_round_trip_and_build_model(tmp_path):
    model = tiny_edt()
    path = export_safetensors(model, tmp_path / "edt.safetensors")
    loaded = from_pretrained(path)
    assert type(loaded) is EDT and loaded.config == model.config
    x, t, y = _inputs(2)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    with torch.device("meta"):
        preset = build_model(name="EDT-S/2", arch="edt", input_size=32, num_classes=1000, in_channels=4)
    assert preset.config["widths"] == [312, 416, 520, 416, 312] and preset.config["depth"] == 12
    with torch.device("meta"):  # a name wins over explicit stage sizes, as DiT's names do
        named = build_model(name="EDT-S/2", arch="edt", input_size=32, widths=[8, 8, 8], depths=[1, 1, 1])
    assert named.config == preset.config


def _with_block_cache(model: EDT) -> EDT:
    model.block_cache = BlockCache(["C" * len(model.blocks)])  # what a sampler's cache= installs
    return model


def test_bad_configs_are_one_line_value_errors():
    cases = [
        (lambda: tiny_edt(widths=(32, 48, 64, 48, 48)), "mirror"),
        (lambda: tiny_edt(depths=(1, 1, 1, 1)), "odd number of stages"),
        (lambda: tiny_edt(input_size=12), "does not divide"),
        (lambda: tiny_edt(hidden_size=64), "hidden_size=64 disagrees"),
        (lambda: flexify(tiny_edt()), "flexifying it is not supported"),
        (lambda: tiny_edt()(torch.zeros(1, 4, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long)), "fixed stage"),
        (lambda: _with_block_cache(tiny_edt())(*_inputs(1)), "does not support block caching"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            make()
        assert "\n" not in str(err.value)


#################################################################################
#                                Masking training                               #
#################################################################################


def test_token_mask_zeroes_exactly_the_ratio_inside_each_down_sampling_module():
    keep = token_keep_mask(3, 64, 0.45, "cpu")
    assert keep.shape == (3, 64) and keep.sum(dim=1).tolist() == [64 - 29] * 3  # round(0.45 * 64) = 29 zeroed
    assert not torch.equal(keep[0], keep[1])  # a fresh draw per sample
    model = tiny_edt()
    seen = []
    hooks = [down.reduction.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for down in model.down_blocks]
    x, t, y = _inputs(2)
    with torch.no_grad():
        model(x, t, y)
        model(x, t, y, token_mask_ratios=[0.45, 0.15])
    for hook in hooks:
        hook.remove()
    # each original token is one C-wide chunk of a merged 4C vector: count the all-zero chunks per sample
    for merged, tokens, zeroed in ((seen[0], 64, 0), (seen[1], 16, 0), (seen[2], 64, 29), (seen[3], 16, 2)):
        n, quarter_tokens, width4 = merged.shape
        chunks = merged.reshape(n, quarter_tokens * 4, width4 // 4)  # (N, T, C)
        assert quarter_tokens * 4 == tokens
        assert (chunks.abs().amax(dim=-1) == 0).sum(dim=1).tolist() == [zeroed] * n


def _objectives(ratios):
    diffusion = create_diffusion("")
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    plain = DiffusionModule(tiny_edt(), diffusion, optimizer)
    masking = EDTMaskingModule(tiny_edt(), diffusion, optimizer, token_mask_ratios=ratios)
    return plain, masking


def test_masking_objective_off_is_the_plain_loss_and_on_adds_the_masked_loss():
    x, _, y = _inputs(4, seed=5)
    batch = {"x": x, "y": y}
    for ratios in (None, [[0.4, 0.5], [0.1, 0.2]]):
        plain, masking = _objectives(ratios)
        plain.train(), masking.train()  # label dropout on: both draw it from the same stream
        torch.manual_seed(7)
        t_plain, terms_plain = plain.compute_losses(batch, None)
        torch.manual_seed(7)
        t_mask, terms_mask = masking.compute_losses(batch, None)
        assert torch.equal(t_plain, t_mask)
        flops = masking.step_flops(x, None) / plain.step_flops(x, None)
        if ratios is None:
            assert torch.equal(terms_mask["loss"], terms_plain["loss"]) and "masked_loss" not in terms_mask
            assert flops == 1.0
        else:
            assert torch.allclose(terms_mask["loss"] - terms_mask["masked_loss"], terms_plain["loss"], atol=1e-6)
            assert not torch.allclose(terms_mask["masked_loss"], terms_plain["loss"], atol=1e-4)
            assert flops == 2.0  # a second forward and backward per step
    ratios = masking.draw_mask_ratios()
    assert 0.4 <= ratios[0] <= 0.5 and 0.1 <= ratios[1] <= 0.2


def test_masking_objective_refuses_what_it_cannot_mask():
    diffusion, optimizer = create_diffusion(""), functools.partial(torch.optim.AdamW, lr=1e-3)
    for model, ratios, match in (
        (perturbed_dit(), [[0.4, 0.5], [0.1, 0.2]], "has none"),
        (tiny_edt(), [[0.4, 0.5]], "one \\[lo, hi\\] range"),
        (tiny_edt(), [[0.5, 0.4], [0.1, 0.2]], "0 <= lo <= hi < 1"),
    ):
        with pytest.raises(ValueError, match=match) as err:
            EDTMaskingModule(model, diffusion, optimizer, token_mask_ratios=ratios)
        assert "\n" not in str(err.value)


def test_position_mask_replaces_exactly_the_ratio_by_the_position_embedding_before_its_block():
    """EDT-XL's extra mask: before block b of the first stage, round(r T) tokens become the position embedding."""
    model = tiny_edt(widths=(32, 48, 64, 48, 32), depths=(3, 1, 1, 1, 3), num_heads=(2, 2, 2, 2, 2))
    seen = []
    hook = model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x, t, y = _inputs(2)
    with torch.no_grad():
        plain = model(x, t, y)
        torch.manual_seed(3)
        masked = model(x, t, y, token_mask_ratios=[0.0, 0.0], position_mask=(2, 0.25))
        unmasked = model(x, t, y, position_mask=(2, 0.0))
    hook.remove()
    before, after = seen[0], seen[1]  # (N, 64, 32): the input of block 2 without and with the mask
    pos = model.pos_embed.expand_as(before)
    replaced = (after != before).any(dim=-1)  # (N, T)
    assert replaced.sum(dim=1).tolist() == [16, 16]  # round(0.25 * 64) per sample
    assert torch.equal(after[replaced], pos[replaced]) and torch.equal(after[~replaced], before[~replaced])
    assert not torch.equal(replaced[0], replaced[1])  # a fresh draw per sample
    assert not torch.allclose(masked, plain, atol=1e-4)
    assert torch.equal(unmasked, plain)  # a share of 0 replaces nothing
    for bad in ((4, 0.2), (0, 0.2), (2, 1.0)):  # the first stage has blocks 1..3
        with pytest.raises(ValueError, match="needs a block 1..3 of the first stage") as err:
            model(x, t, y, position_mask=bad)
        assert "\n" not in str(err.value)


def test_masking_objective_draws_the_position_mask_into_its_masked_forward_only():
    diffusion, optimizer = create_diffusion(""), functools.partial(torch.optim.AdamW, lr=1e-3)
    model = tiny_edt(widths=(32, 48, 64, 48, 32), depths=(5, 1, 1, 1, 5), num_heads=(2, 2, 2, 2, 2))
    masking = EDTMaskingModule(model, diffusion, optimizer, token_mask_ratios=[[0.4, 0.5], [0.1, 0.2]],
                               position_mask={"block": 5, "ratio": [0.15, 0.25]})
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs.get("position_mask")),
                                    with_kwargs=True)
    x, _, y = _inputs(4, seed=5)
    masking.train()
    _, terms = masking.compute_losses({"x": x, "y": y}, None)
    assert calls[0] is None and calls[1][0] == 5 and 0.15 <= calls[1][1] <= 0.25  # plain, then masked forward
    assert torch.isfinite(terms["masked_loss"]).all()
    for kwargs, match in (
        ({"token_mask_ratios": None, "position_mask": {"block": 5, "ratio": [0.15, 0.25]}}, "masked forward, which is off"),
        ({"position_mask": {"block": 6, "ratio": [0.15, 0.25]}}, "needs a block 1..5"),
        ({"position_mask": {"block": 5, "ratio": [0.25, 0.15]}}, "needs lo <= hi"),
        ({"position_mask": {"block": 5}}, "needs the keys block and ratio"),
        ({"position_mask": {"block": 5, "ratio": 0.2}}, "needs the keys block and ratio"),
        ({"position_mask": {"block": 4.5, "ratio": [0.15, 0.25]}}, "needs a block 1..5"),
    ):
        with pytest.raises(ValueError, match=match) as err:
            EDTMaskingModule(model, diffusion, optimizer, **{"token_mask_ratios": [[0.4, 0.5], [0.1, 0.2]], **kwargs})
        assert "\n" not in str(err.value)


#################################################################################
#                               Train and sample                                #
#################################################################################


TINY_EDT = ["model.widths=[32,48,64,48,32]", "model.num_heads=[2,2,2,2,2]"]


@pytest.mark.slow
def test_mnist_edt_trains_two_steps_and_samples_with_amm(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXDIT_DATA_CACHE", str(tmp_path / "data_cache"))
    cfg = compose_train(
        ["+experiment=mnist_edt", "trainer=cpu", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
         "logger=csv", *TINY_EDT,
         "data.global_batch_size=4", "data.num_workers=0", "callbacks.sample_grid.num_images=2",
         "callbacks.sample_grid.sampling_steps=ddim2"],
        tmp_path / "train",
    )
    assert cfg.model.arch == "edt" and cfg.task_name == "mnist_edt"
    assert cfg.objective.token_mask_ratios == [[0.4, 0.5], [0.1, 0.2]]  # EDT's recipe: the masking loss on
    run(cfg)
    metrics = (tmp_path / "train" / "csv").rglob("metrics.csv")
    assert any("train/masked_loss" in path.read_text().splitlines()[0] for path in metrics)
    ckpt = tmp_path / "train" / "checkpoints" / "final.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
    model = from_pretrained(ckpt)
    assert type(model) is EDT and model.config["widths"] == [32, 48, 64, 48, 32] and model.input_size == (32, 32)

    with initialize_config_dir(version_base="1.3", config_dir=flexdit_train.CONF_DIR):
        sample_cfg = compose("sample", return_hydra_config=True)
    with open_dict(sample_cfg):
        sample_cfg.hydra.runtime.output_dir = sample_cfg.out_dir = str(tmp_path / "samples")
        sample_cfg.hydra.runtime.cwd = str(tmp_path)
    sample_cfg.checkpoint, sample_cfg.amm_blocks = str(ckpt), [8, 11]
    sample_cfg.num_samples, sample_cfg.sampling_steps, sample_cfg.cfg_scale = 3, "ddim3", 1.5
    sample_cfg.progress, sample_cfg.device, sample_cfg.clip_denoised = False, "cpu", True
    HydraConfig.instance().set_config(sample_cfg)
    card = run_sampling(sample_cfg)["card"]
    assert card["arch"] == "edt" and card["amm_blocks"] == [8, 11]
    assert card["cost_gmacs"]["2"] == pytest.approx(cost_model(model)(2) / 1e9)
    images = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert images.shape == (3, 32, 32, 1) and images.dtype == np.uint8


@pytest.mark.slow
def test_edt_xl_experiment_has_the_authors_recipe_and_trains_two_steps(tmp_path):
    """+experiment=edt_xl: the masking loss with EDT-XL's position mask (before block 5, the last of the paper's
    first stage), lr 5e-4 linear to 5e-5; two steps of it on a tiny EDT of the same first-stage depth."""
    with initialize_config_dir(version_base="1.3", config_dir=flexdit_train.CONF_DIR):
        xl = compose("train", overrides=["+experiment=edt_xl"])
    assert xl.model.arch == "edt" and xl.model.name == "EDT-XL/2" and xl.objective.token_mask_ratios
    assert dict(xl.objective.position_mask) == {"block": 5, "ratio": [0.15, 0.25]}
    assert EDT_models["EDT-XL/2"].preset_config["depths"][0] == 5
    assert xl.objective.optimizer.lr == 5e-4 and xl.objective.lr_scheduler.decay == "linear"
    assert xl.objective.optimizer.lr * xl.objective.lr_scheduler.final_factor == pytest.approx(5e-5)
    assert xl.objective.ema_decay == 0.9999 and xl.data.global_batch_size == 256
    cfg = compose_train([
        "+experiment=edt_xl", "trainer=cpu", "trainer.max_steps=2", "trainer.log_every_n_steps=1", "logger=csv",
        "data=synthetic", "data.input_size=16", "data.in_channels=4", "data.num_classes=10",
        "data.global_batch_size=4", "model.name=null", "+model.widths=[32,48,64,48,32]",
        "+model.depths=[5,1,1,1,5]", "+model.num_heads=[2,2,2,2,2]", "callbacks.sample_grid.vae=null",
        "callbacks.sample_grid.num_images=2", "callbacks.sample_grid.sampling_steps=ddim2",
    ], tmp_path)
    run(cfg)
    metrics = (tmp_path / "csv").rglob("metrics.csv")
    assert any("train/masked_loss" in path.read_text().splitlines()[0] for path in metrics)
    assert torch.load(tmp_path / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
