"""SparseDiT (arXiv 2412.06028): the conversion from a DiT, the network, its FLOPs against the paper and
FlopCounterMode, the temporal density schedule, the timestep-aware training draw, checkpoints, and a short
training run through the normal trainer sampled with the density budget."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.config import compose_train
from helpers.models import perturb_trainable
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import flexdit_train
from flexdit_train.diffusion import create_diffusion
from flexdit_train.flops import cost_model
from flexdit_train.flops.__main__ import main as flops_main
from flexdit_train.models import DiT, DiT_models, build_model, export_safetensors, flexify, from_pretrained
from flexdit_train.models.arch import arch_of
from flexdit_train.models.sparse_dit import (
    RecoveryBlock,
    SparseDiT,
    SparseDiT_models,
    pool_tokens,
    upsample_tokens,
)
from flexdit_train.sample import run_sampling
from flexdit_train.sampling.cache import BlockCache
from flexdit_train.sampling.pipeline import Sampler
from flexdit_train.sampling.schedule import (
    BudgetSchedule,
    SparseDensity,
    build_schedule,
    sparse_density,
    static,
)
from flexdit_train.train import run
from flexdit_train.training.sparse_density import SparseDensityModule, noise_level

# 6 layers of a tiny DiT: Poolingformer, sparse-gen, 2 sparse DiT blocks, recovery, dense DiT block
LAYOUT = dict(num_pooling=1, num_sdtm=1, sdtm_layers=[1, 2, 1, 1], num_top=0)


def tiny_dit(seed: int = 0) -> DiT:
    """A 6-block, width-64 DiT on 4x16x16 latents (8x8 tokens), every weight perturbed (a 'pretrained' one)."""
    torch.manual_seed(seed)
    model = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=6, num_heads=4, num_classes=10)
    return perturb_trainable(model, seed + 1).eval()


def tiny_sparse(seed: int = 0) -> SparseDiT:
    return SparseDiT.from_dit(tiny_dit(seed), **LAYOUT).eval()


def _inputs(n: int = 2, seed: int = 0, size: tuple[int, int] = (16, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, *size, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.arange(n) % 10


#################################################################################
#                                   Conversion                                  #
#################################################################################


def test_conversion_loads_every_layer_from_its_source_block():
    dit = tiny_dit()
    model = SparseDiT.from_dit(dit, **LAYOUT)
    assert model.layout == ["pooling", "sparse_gen", "sparse", "sparse", "recovery", "dense"]
    src, dst = dit.state_dict(), model.state_dict()
    d = 64
    for i, kind in enumerate(model.layout):
        qkv_w, qkv_b = src[f"blocks.{i}.attn.qkv.weight"], src[f"blocks.{i}.attn.qkv.bias"]
        if kind == "pooling":
            assert torch.equal(dst[f"blocks.{i}.attn.v.weight"], qkv_w[2 * d :])  # the v third
            assert torch.equal(dst[f"blocks.{i}.attn.v.bias"], qkv_b[2 * d :])
        elif kind in ("sparse_gen", "recovery"):
            assert torch.equal(dst[f"blocks.{i}.attn.q_linear.weight"], qkv_w[:d])  # the q third
            assert torch.equal(dst[f"blocks.{i}.attn.q_linear.bias"], qkv_b[:d])
            assert torch.equal(dst[f"blocks.{i}.attn.kv_linear.weight"], qkv_w[d:])  # the k and v thirds
            assert torch.equal(dst[f"blocks.{i}.attn.kv_linear.bias"], qkv_b[d:])
        else:
            assert torch.equal(dst[f"blocks.{i}.attn.qkv.weight"], qkv_w)
        for part in ("attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc2.bias",
                     "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"):
            assert torch.equal(dst[f"blocks.{i}.{part}"], src[f"blocks.{i}.{part}"]), (i, part)
    for key in ("x_embedder.proj.weight", "t_embedder.mlp.2.weight", "y_embedder.embedding_table.weight",
                "pos_embed", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"):
        assert torch.equal(dst[key], src[key])
    # the merges have no source layer: W1 = 0, W2 = I, zero biases
    assert torch.equal(dst["blocks.4.merge_sparse.weight"], torch.zeros(d, d))
    assert torch.equal(dst["blocks.4.merge_dense.weight"], torch.eye(d))
    assert dst["blocks.4.merge_sparse.bias"].abs().sum() == dst["blocks.4.merge_dense.bias"].abs().sum() == 0
    # copies, not views of the source: training one leaves the other alone
    with torch.no_grad():
        model.blocks[1].attn.q_linear.weight.add_(1.0)
    assert torch.equal(dit.blocks[1].attn.qkv.weight[:d], src["blocks.1.attn.qkv.weight"][:d])
    assert not model.pos_embed.requires_grad and arch_of(model).name == "sparse_dit"


def test_converted_layers_compute_what_the_source_blocks_compute():
    """The Poolingformer is the source attention with a uniform map; a sparse-gen block over a sparse grid as large
    as the dense one (pooling = identity) is the source DiT block."""
    dit, model = tiny_dit(), tiny_sparse()
    h = torch.randn(2, 64, 64)  # (N, T, D)
    with torch.no_grad():
        attn = dit.blocks[0].attn
        q, k, v = attn.qkv(h).reshape(2, 64, 3, 4, 16).permute(2, 0, 3, 1, 4)
        uniform = F.scaled_dot_product_attention(torch.zeros_like(q), torch.zeros_like(k), v)  # (N, H, T, hd)
        reference = attn.proj(uniform.transpose(1, 2).reshape(2, 64, 64))
        assert torch.allclose(model.blocks[0].attn(h), reference, atol=1e-5)
        c = torch.randn(2, 64)
        assert torch.equal(pool_tokens(h, (8, 8), (8, 8)), h)
        assert torch.allclose(model.blocks[1](h, h, c), dit.blocks[1](h, c), atol=1e-5)


def test_recovery_merge_starts_from_the_dense_tokens_exactly():
    model = tiny_sparse()
    seen = []
    recovery = model.blocks[4]
    assert isinstance(recovery, RecoveryBlock)
    original = recovery.merge

    def record(sparse, dense, sparse_hw, dense_hw):
        merged = original(sparse, dense, sparse_hw, dense_hw)
        seen.append((merged, dense, sparse))
        return merged

    recovery.merge = record
    x, t, y = _inputs(2)
    with torch.no_grad():
        for s in (2, 3, 5):
            model(x, t, y, sparse_grid=s)
    assert len(seen) == 3
    for merged, dense, sparse in seen:
        assert torch.equal(merged, dense)  # W1·Up(X_s) = 0 and W2 = I: X_merged == X_dense bit for bit
        assert sparse.abs().sum() > 0  # while the sparse path carries features
    # nearest upsampling copies each sparse token to its block of the dense grid
    grid = torch.arange(4.0).reshape(1, 4, 1)  # (N, 2*2, D)
    assert upsample_tokens(grid, (2, 2), (4, 4)).reshape(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1],
                                                                            [2, 2, 3, 3], [2, 2, 3, 3]]


#################################################################################
#                                    Network                                    #
#################################################################################


def test_forward_shapes_for_several_sparse_grids_and_guidance():
    model = tiny_sparse()
    x, t, y = _inputs(2)
    with torch.no_grad():
        outs = {s: model(x, t, y, sparse_grid=s) for s in (1, 2, 3, 4, 5, 8, (2, 3))}
        assert all(out.shape == (2, 8, 16, 16) for out in outs.values())
        assert not torch.allclose(outs[2], outs[5], atol=1e-4)  # the grid changes the prediction
        assert torch.equal(model(x, t, y), outs[4])  # None: the config's fixed grid (half of 8x8)
        wide = model(*_inputs(1, size=(16, 24))[:1], t[:1], y[:1], sparse_grid=(3, 4))  # 8x12 tokens
        assert wide.shape == (1, 8, 16, 24)
        xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, model.null_class)])
        guided = model.forward_with_cfg(xx, tt, yy, 3.0, sparse_grid=3)
        cond, uncond = model(xx, tt, yy, sparse_grid=3).chunk(2)
    assert torch.allclose(guided[:2, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert model.config["sparse_grid"] == 4 and model.config["sparse_grid_range"] == [3, 5]
    fresh = SparseDiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, num_heads=4, num_classes=10,
                      **LAYOUT)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y), torch.zeros(2, 8, 16, 16))  # adaLN-Zero and the zero output layer


def test_xl_preset_layout_and_parameters():
    with torch.device("meta"):
        model = SparseDiT_models["SparseDiT-XL/2"]()
        dit = DiT_models["DiT-XL/2"]()
    kinds = model.layout
    assert len(model.blocks) == 28 and kinds[:2] == ["pooling"] * 2 and kinds[-2:] == ["dense"] * 2
    assert kinds[2:8] == ["sparse_gen", "sparse", "sparse", "sparse", "recovery", "dense"] and kinds[2:26] == kinds[2:8] * 4
    assert model.config["sparse_grid"] == 8 and model.config["sparse_grid_range"] == [6, 10]
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dit_params = sum(p.numel() for p in dit.parameters() if p.requires_grad)
    d = 1152
    # the 2 Poolingformers lose q and k, the 4 recovery blocks gain two D x D merges
    assert params - dit_params == 4 * 2 * (d * d + d) - 2 * 2 * (d * d + d)


def _with_block_cache(model):
    model.block_cache = BlockCache(["C" * len(model.blocks)])  # what a sampler's cache= installs
    return model


def test_refusals_are_one_line_value_errors():
    dit = tiny_dit()
    cases = [
        (lambda: _with_block_cache(tiny_sparse())(*_inputs(1)), "does not support block caching"),
        (lambda: flexify(tiny_sparse()), "flexifying it is not supported"),
        (lambda: tiny_sparse().set_attention_modulation([1]), "attention modulation"),
        (lambda: tiny_sparse()(*_inputs(1), sparse_grid=9), "does not fit the 8x8"),
        (lambda: SparseDiT.from_dit(dit, num_pooling=2, num_sdtm=1, sdtm_layers=[1, 3, 1, 1], num_top=0),
         "layout has 8 layers, the DiT 6"),
        (lambda: SparseDiT.from_dit(dit, num_pooling=1, num_sdtm=1, sdtm_layers=[1, 2, 2, 0], num_top=0),
         "recovery = 1"),
        (lambda: SparseDiT.from_dit(tiny_sparse()), "converts a static DiT"),
        (lambda: SparseDiT(input_size=16, hidden_size=64, num_heads=4, depth=5, **LAYOUT), "depth=5 disagrees"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            make()
        assert "\n" not in str(err.value)


#################################################################################
#                                     FLOPs                                     #
#################################################################################


def _cli(argv, capsys) -> dict:
    assert flops_main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_reproduces_the_papers_gmacs_of_sparse_dit_xl(capsys):
    """The paper (fvcore): DiT-XL/2 118.64 GMAC, SparseDiT-XL/2 with the 6x6 -> 10x10 density 68.05 GMAC. Averaged
    over the 250 DDPM steps, the token count growing linearly and the side rounded up: 68.0504 (+0.001%)."""
    report = _cli(["--model", "SparseDiT-XL/2", "--image-size", "256"], capsys)
    assert report["gmacs"] == pytest.approx(68.05, rel=0.01) and report["gmacs"] == 68.0504
    assert report["dense_gmacs"] == pytest.approx(118.64, rel=0.01)
    assert report["dense_gmacs"] == _cli(["--model", "DiT-XL/2", "--image-size", "256"], capsys)["gmacs"]
    assert report["density"] == {"min_grid": 6, "max_grid": 10, "hold_fraction": 0.25, "steps": 250}
    grids = report["grid_per_step"]
    assert len(grids) == len(report["gmacs_per_step"]) == 250 and grids == sorted(grids)
    assert grids[:63] == [6] * 63 and grids[63] == 7 and grids[-1] == 10  # u = k/249 < 0.25 for k <= 62
    assert {g: grids.count(g) for g in set(grids)} == {6: 63, 7: 38, 8: 43, 9: 50, 10: 56}
    assert report["gmacs_per_grid"] == {"6": 60.1305, "7": 63.5348, "8": 67.4745, "9": 71.9546, "10": 76.9806}
    assert report["gmacs"] == pytest.approx(sum(report["gmacs_per_step"]) / 250, abs=1e-3)
    fixed = _cli(["--model", "SparseDiT-XL/2", "--image-size", "256", "--sparse-grid", "8"], capsys)
    assert fixed["gmacs"] == report["fixed_grid_gmacs"] == 67.4745 and "grid_per_step" not in fixed
    assert flops_main(["--model", "DiT-XL/2", "--sparse-grid", "8"]) == 2
    assert "price a SparseDiT" in capsys.readouterr().err


@pytest.mark.parametrize("layout", [LAYOUT, dict(num_pooling=2, num_sdtm=2, sdtm_layers=[1, 1, 1, 0], num_top=0)])
def test_analytic_count_matches_flop_counter_mode(layout):
    torch.manual_seed(0)
    model = SparseDiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, num_heads=4, num_classes=10,
                      **layout).eval()
    x, t, y = _inputs(1)
    for s in (2, 3, 5, (2, 3)):
        # the math backend: the CPU flash kernel that SDPA picks without a mask is not counted by FlopCounterMode
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, t, y, sparse_grid=s)
        breakdown = cost_model(model).breakdown(2, s)
        assert breakdown["attention"] > 0
        assert counter.get_total_flops() == pytest.approx(2 * sum(breakdown.values()), rel=0.02)


#################################################################################
#                           Temporal density schedule                           #
#################################################################################


def test_density_schedule_is_data_priced_by_the_cost_model():
    density = SparseDensity(6, 10)
    assert density.grids(5) == (6, 6, 8, 9, 10) and density.grids(1) == (6,)
    assert density.grid_at(0.0) == density.grid_at(0.2499) == 6 and density.grid_at(1.0) == 10
    assert density.grid_at_noise(1.0) == 6 and density.grid_at_noise(0.0) == 10
    cost = cost_model("SparseDiT-XL/2")
    schedule = sparse_density(250, 2, density, cfg=True)
    assert schedule.sparse_grids == density.grids(250) and schedule.cond_patch_sizes == (2,) * 250
    # both branches at each step's grid; the reference is the dense DiT-XL/2 (118.62 GMAC per forward)
    assert schedule.macs(cost) == pytest.approx(2 * 250 * 68.0504e9, rel=1e-6)
    assert schedule.compute_fraction(cost) == pytest.approx(68.0504 / 118.6214, rel=1e-5)
    unguided = sparse_density(250, 2, density, cfg=False)
    assert unguided.macs(cost) == pytest.approx(schedule.macs(cost) / 2)
    assert unguided.compute_fraction(cost) == pytest.approx(schedule.compute_fraction(cost))
    assert static(250, 2).compute_fraction(cost) == pytest.approx(67.4745 / 118.6214, rel=1e-5)  # fixed 8x8
    assert BudgetSchedule.from_dict(json.loads(json.dumps(schedule.to_dict()))) == schedule
    assert "sparse grid s6x63 -> s7x38 -> s8x43 -> s9x50 -> s10x56" in schedule.describe()
    node = {"name": "sparse_density", "mode": "sparse_density", "min_grid": None, "max_grid": None,
            "hold_fraction": 0.25}
    built = build_schedule(node, 250, 2, None, cost, cfg=True)
    assert built.sparse_grids == schedule.sparse_grids and built.name == "sparse_density"
    assert build_schedule({**node, "max_grid": 8}, 10, 2, None, cost).sparse_grids[-1] == 8
    for bad, match in (
        (lambda: build_schedule(node, 10, 2, None, cost_model("DiT-XL/2")), "needs a SparseDiT"),
        (lambda: SparseDensity(8, 6), "min_grid <= max_grid"),
        (lambda: BudgetSchedule((2, 2), None, 2, sparse_grids=(6,)), "one positive sparse grid side per"),
        (lambda: cost_model("DiT-XL/2")(2, sparse_grid=6), "prices a SparseDiT"),
    ):
        with pytest.raises(ValueError, match=match) as err:
            bad()
        assert "\n" not in str(err.value)


def test_sampler_passes_each_steps_grid_to_the_model():
    model = tiny_sparse()
    calls = []
    forward = model.forward

    def record(*args, **kwargs):
        calls.append(kwargs.get("sparse_grid"))
        return forward(*args, **kwargs)

    model.forward = record
    sampler = Sampler.for_model(model, {"name": "sparse_density", "mode": "sparse_density"}, "ddim5", 1.5)
    assert sampler.schedule.sparse_grids == (3, 3, 4, 5, 5)
    images = sampler.generate(torch.tensor([1, 2]), seed=0, indices=[0, 1])
    assert images.shape == (2, 4, 16, 16) and torch.isfinite(images).all()
    assert calls == [3, 3, 4, 5, 5]  # one doubled-batch CFG call per step, noisiest first
    fraction = sampler.schedule.compute_fraction(sampler.cost)
    assert 0 < fraction < 1  # a share of the dense source DiT's compute
    with pytest.raises(ValueError, match="does not support block caching"):
        Sampler.for_model(model, {"name": "static", "mode": "static"}, "ddim2", 1.0,
                          cache={"policy": "fora", "interval": 2}).generate(torch.tensor([1]), 0, [0])


#################################################################################
#                                 Training draw                                 #
#################################################################################


def test_training_draws_the_grid_of_each_samples_timestep():
    diffusion = create_diffusion("")
    module = SparseDensityModule(tiny_sparse(), diffusion, functools.partial(torch.optim.AdamW, lr=1e-4))
    assert (module.density.min_grid, module.density.max_grid) == (3, 5)
    steps = torch.tensor([999, 800, 760, 500, 250, 0])
    assert noise_level(diffusion, steps).tolist() == pytest.approx([1.0, 800 / 999, 760 / 999, 0.5005, 0.2503, 0.0],
                                                                  abs=1e-4)
    assert module.sparse_grids(steps).tolist() == [3, 3, 3, 4, 5, 5]
    calls = []
    forward = module.model.forward

    def record(x, t, y, **kwargs):
        calls.append((kwargs["sparse_grid"], t.tolist(), y.tolist()))
        return forward(x, t, y, **kwargs)

    module.model.forward = record
    x, _, y = _inputs(8, seed=3)
    torch.manual_seed(0)
    t, terms = module.compute_losses({"x": x, "y": y}, None)
    assert terms["loss"].shape == (8,) and torch.isfinite(terms["loss"]).all()
    seen = {}
    for grid, ts, labels in calls:  # every sample ran once, at the grid of its timestep, with its own label
        for step, label in zip(ts, labels, strict=True):
            assert grid == module.density.grid_at_noise(step / 999)
            seen[step] = label
    assert sorted(seen) == sorted(t.tolist()) and len(calls) == len(set(module.sparse_grids(t).tolist()))
    # per-sample losses come back in batch order: each sample recomputed on its own with the same draws
    torch.manual_seed(0)
    t_again = diffusion.sample_timesteps(8, "cpu")
    noise = torch.randn_like(x)
    assert torch.equal(t_again, t)
    for i in range(8):
        alone = diffusion.training_losses(module.model, x[i : i + 1], t[i : i + 1], noise=noise[i : i + 1],
                                          cond={"y": y[i : i + 1], "sparse_grid": int(module.sparse_grids(t)[i])})
        assert float(alone["loss"][0]) == pytest.approx(float(terms["loss"][i]), rel=1e-4, abs=1e-6)
    terms["loss"].mean().backward()
    assert module.model.blocks[2].attn.qkv.weight.grad is not None  # the sparse blocks train
    grid_cost = cost_model(module.model)
    assert module.step_flops(x, None) == pytest.approx(
        sum(6 * grid_cost(2, sparse_grid=g) for g in module.sparse_grids(t).tolist()))
    fixed = SparseDensityModule(tiny_sparse(), diffusion, functools.partial(torch.optim.AdamW, lr=1e-4), fixed_grid=4)
    assert fixed.sparse_grids(steps).tolist() == [4] * 6
    with pytest.raises(ValueError, match="needs a SparseDiT"):
        SparseDensityModule(tiny_dit(), diffusion, functools.partial(torch.optim.AdamW, lr=1e-4))


#################################################################################
#                           Checkpoints and configs                             #
#################################################################################


def test_checkpoint_round_trip_and_build_model_conversion(tmp_path):
    model = tiny_sparse()
    path = export_safetensors(model, tmp_path / "sparse.safetensors")
    loaded = from_pretrained(path)
    assert type(loaded) is SparseDiT and loaded.config == model.config
    x, t, y = _inputs(2)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y, sparse_grid=3), model(x, t, y, sparse_grid=3))
    rebuilt = build_model(arch="sparse_dit", pretrained=str(path), input_size=16, num_classes=10, in_channels=4)
    assert rebuilt.config == model.config
    # a DiT file under model.pretrained is converted with the config's layout
    dit_path = export_safetensors(tiny_dit(), tmp_path / "dit.safetensors")
    converted = build_model(arch="sparse_dit", pretrained=str(dit_path), input_size=16, num_classes=10, **LAYOUT,
                            sparse_grid=3)
    assert converted.config == {**model.config, "sparse_grid": 3}
    assert torch.equal(converted.state_dict()["blocks.1.attn.q_linear.weight"], model.state_dict()["blocks.1.attn.q_linear.weight"])
    with pytest.raises(ValueError, match="holds a sparse_dit, the model config a dit"):
        build_model(arch="dit", pretrained=str(path))
    with pytest.raises(ValueError, match="width 64 and 4 heads, SparseDiT-XL/2 1152"):
        build_model(arch="sparse_dit", name="SparseDiT-XL/2", pretrained=str(dit_path))


def test_model_configs_compose_and_convert_the_mnist_teacher():
    with initialize_config_dir(version_base="1.3", config_dir=flexdit_train.CONF_DIR):
        cfg = compose("train", overrides=["+experiment=mnist_sparse_dit"])
        xl = compose("train", overrides=["+experiment=sparse_dit_xl"])
    assert cfg.model.arch == "sparse_dit" and cfg.objective._target_.endswith("SparseDensityModule")
    assert xl.model.name == "SparseDiT-XL/2" and xl.model.pretrained.endswith("DiT-XL-2-256x256.pt")
    model = build_model(**{k: v for k, v in dict(cfg.model).items() if k != "_target_"})
    assert model.layout == ["pooling", "sparse_gen", "sparse", "recovery"]
    assert model.config["sparse_grid_range"] == [3, 5] and model.config["sparse_grid"] == 4
    teacher = from_pretrained(cfg.model.pretrained)
    assert torch.equal(model.blocks[3].attn.kv_linear.weight, teacher.blocks[3].attn.qkv.weight[128:])


#################################################################################
#                               Train and sample                                #
#################################################################################


@pytest.mark.slow
def test_mnist_sparse_dit_trains_two_steps_and_samples_with_the_density_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXDIT_DATA_CACHE", str(tmp_path / "data_cache"))
    cfg = compose_train(
        ["+experiment=mnist_sparse_dit", "trainer=cpu", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
         "logger=csv", "data.global_batch_size=4", "data.num_workers=0", "callbacks.sample_grid.num_images=2",
         "callbacks.sample_grid.sampling_steps=ddim2"],
        tmp_path / "train",
    )
    run(cfg)
    metrics = (tmp_path / "train" / "csv").rglob("metrics.csv")
    assert any("train/sparse_grid" in path.read_text().splitlines()[0] for path in metrics)
    ckpt = tmp_path / "train" / "checkpoints" / "final.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
    model = from_pretrained(ckpt)
    assert type(model) is SparseDiT and model.layout == ["pooling", "sparse_gen", "sparse", "recovery"]

    with initialize_config_dir(version_base="1.3", config_dir=flexdit_train.CONF_DIR):
        sample_cfg = compose("sample", overrides=["budget=sparse_density"], return_hydra_config=True)
    with open_dict(sample_cfg):
        sample_cfg.hydra.runtime.output_dir = sample_cfg.out_dir = str(tmp_path / "samples")
        sample_cfg.hydra.runtime.cwd = str(tmp_path)
    sample_cfg.checkpoint = str(ckpt)
    sample_cfg.num_samples, sample_cfg.sampling_steps, sample_cfg.cfg_scale = 3, "ddim4", 1.5
    sample_cfg.progress, sample_cfg.device, sample_cfg.clip_denoised = False, "cpu", True
    HydraConfig.instance().set_config(sample_cfg)
    card = run_sampling(sample_cfg)["card"]
    assert card["arch"] == "sparse_dit" and card["schedule"]["sparse_grids"] == [3, 4, 5, 5]
    assert set(card["sparse_grid_gmacs"]) == {"3", "4", "5"} and 0 < card["compute_fraction"] < 1
    images = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert images.shape == (3, 32, 32, 1) and images.dtype == np.uint8
