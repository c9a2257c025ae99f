"""Latent video DiT: factorised/full attention, 3-D flexify (FlexiDiT's video setting), FLOPs model, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from flexdit_train.diffusion import create_diffusion
from flexdit_train.flops import DIT_TERMS, CostModel, cost_model
from flexdit_train.models.flex import FlexVideoDiT, flexify
from flexdit_train.models.flex.resize import embed_projection, linear_resize_matrix, resize_matrix
from flexdit_train.models.video_dit import VideoBlock, VideoDiT, create_video_model
from flexdit_train.sampling.schedule import BudgetSchedule

CONFIG = dict(input_size=(4, 8, 8), in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
NATIVE, TEMPORAL, SPATIAL = (1, 2, 2), (2, 2, 2), (1, 4, 4)
ATTENTION = ["factorised", "full"]


def pretrained_video(attention: str = "factorised", seed: int = 0, **overrides) -> VideoDiT:
    """A VideoDiT with every weight random (adaLN-Zero would output zeros)."""
    model = VideoDiT(**{**CONFIG, "attention": attention, **overrides})
    randomize_(model.parameters(), seed)
    return model.eval()


def randomize_(params, seed: int = 2, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def flex_pair(mode: str = "shared", attention: str = "factorised", **kwargs) -> tuple[VideoDiT, FlexVideoDiT]:
    """(original, flexified deep copy); flexify adopts the modules it is given."""
    base = pretrained_video(attention)
    return base, flexify(copy.deepcopy(base), mode=mode, lora_rank=4, **kwargs).eval()


def inputs(fhw=(4, 8, 8), n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, *fhw, generator=g)  # (N, C, F, H, W)
    return x, torch.randint(0, 1000, (n,), generator=g), torch.randint(0, 10, (n,), generator=g)


# ----------------------------------------------------------------------------- projections
def test_resize_matrices_are_torch_linear_resizes():
    r = linear_resize_matrix(4, 2)
    assert torch.equal(resize_matrix((4, 4), (2, 2)), torch.kron(r, r))  # the square 2-D patch: bilinear
    for size_in, size_out in [((2, 4, 4), (1, 2, 2)), ((1, 2, 2), (2, 4, 4)), ((2, 2, 2), (2, 4, 4))]:
        patch = torch.randn(1, 1, *size_in, dtype=torch.float64)
        expected = F.interpolate(patch, size=size_out, mode="trilinear", align_corners=False).flatten()
        torch.testing.assert_close(resize_matrix(size_in, size_out) @ patch.flatten(), expected, rtol=0, atol=1e-12)
    # Temporal axis alone, native pt = 1 under p't = 2: Q_embed(1) sums the two frames of the underlying
    # kernel, so the pseudo-inverse init halves the native kernel into both frames.
    torch.testing.assert_close(embed_projection((1,), (2,)), torch.ones(1, 2, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["shared", "lora"])
def test_initial_weak_paths_follow_the_method_doc(mode):
    """PI-resize along time (the paper duplicates the weights along time, App. C.2): weak temporal token =
    native token of the frame-averaged patch (kernel duplicated and halved), weak temporal head = native head
    output duplicated on both frames; weak spatial token = native token of the 2x2-average-pooled frames."""
    base, flex = flex_pair(mode)
    x, _, _ = inputs()
    w = base.x_embedder.proj.weight  # (D, C, 1, 2, 2)
    with torch.no_grad():
        kernel = flex.flex_embed.resize(TEMPORAL)[0] if mode == "shared" else flex.flex_embed["p2x2x2"].weight
        torch.testing.assert_close(kernel, torch.cat([w / 2, w / 2], dim=2), rtol=0, atol=1e-6)

        frame_avg = x.reshape(2, 4, 2, 2, 8, 8).mean(3)  # (N, C, F/2, H, W)
        torch.testing.assert_close(flex.embed_patches(x, TEMPORAL), base.x_embedder(frame_avg), rtol=0, atol=1e-5)
        pooled = F.avg_pool3d(x, (1, 2, 2))  # (N, C, F, H/2, W/2)
        torch.testing.assert_close(flex.embed_patches(x, SPATIAL), base.x_embedder(pooled), rtol=0, atol=1e-5)

        h = torch.randn(2, 5, 32)  # tokens entering the final linear
        native = base.final_layer.linear(h).reshape(2, 5, 1, 2, 2, 8)  # (N, T, pt, ph, pw, C_out)
        weak = flex.project_out(h, TEMPORAL).reshape(2, 5, 2, 2, 2, 8)
        torch.testing.assert_close(weak, native.expand(-1, -1, 2, -1, -1, -1), rtol=0, atol=1e-5)


def test_positions_are_the_native_tables_at_native_coordinates():
    _, flex = flex_pair()
    native = flex.position_embedding((4, 4, 4), NATIVE).reshape(4, 4, 4, -1)  # (F', H', W', D)
    temporal = flex.position_embedding((2, 4, 4), TEMPORAL).reshape(2, 4, 4, -1)  # frames 0, 2
    spatial = flex.position_embedding((4, 2, 2), SPATIAL).reshape(4, 2, 2, -1)  # rows/columns 0, 2
    torch.testing.assert_close(temporal, native[::2], rtol=0, atol=1e-6)
    torch.testing.assert_close(spatial, native[:, ::2, ::2], rtol=0, atol=1e-6)


def test_factorised_blocks_attend_within_frames_then_across_frames():
    grid = (4, 3, 3)
    x, c = torch.randn(2, 36, 32), torch.randn(2, 32)
    frames_0_to_2, positions_1_to_8 = (slice(None), slice(0, 3)), (slice(None), slice(None), slice(1, 9))
    for kind, untouched in [("spatial", frames_0_to_2), ("temporal", positions_1_to_8)]:
        block = VideoBlock(32, 4, 4.0, kind)
        randomize_(block.parameters())
        moved = x.clone().reshape(2, 4, 9, 32)
        moved[:, 3, 0] += 1.0  # frame 3, spatial position 0
        with torch.no_grad():
            out = block(x, c, grid).reshape(2, 4, 9, 32)
            out_moved = block(moved.reshape(2, 36, 32), c, grid).reshape(2, 4, 9, 32)
        # spatial: frames 0-2 are unaffected; temporal: positions 1-8 of every frame are unaffected
        torch.testing.assert_close(out_moved[untouched], out[untouched], rtol=0, atol=1e-6)
        assert (out_moved - out).abs().max() > 1e-2


# ----------------------------------------------------------------------------- acceptance: flexify
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("mode", ["shared", "lora"])
def test_native_path_is_preserved_and_weak_modes_run(mode, attention):
    base, flex = flex_pair(mode, attention)
    if mode == "lora":
        randomize_(flex.lora_parameters())  # adapters must not touch the native path
    x, t, y = inputs()
    with torch.no_grad():
        native, original = flex(x, t, y), base(x, t, y)
        if mode == "lora":
            assert torch.equal(native, original)
        else:
            torch.testing.assert_close(native, original, rtol=0, atol=1e-5)
        for p in (TEMPORAL, SPATIAL):
            weak = flex(x, t, y, patch_size=p)
            assert weak.shape == (2, 8, 4, 8, 8) and torch.isfinite(weak).all()
            assert not torch.allclose(weak, native, atol=1e-3)


def test_lora_trains_only_new_parameters_and_checkpointing_matches():
    _, flex = flex_pair("lora")
    randomize_(flex.lora_parameters())
    trainable = {n for n, p in flex.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in flex.named_parameters() if ".lora." in n or n.startswith(("flex_", "patch_size_embed"))
    }
    assert {"blocks.1.attn.qkv.lora.p2x2x2.A", "blocks.0.mlp.fc2.lora.p1x4x4.B"} <= trainable
    x, t, y = inputs()
    grads = []
    for checkpointing in (False, True):
        flex.zero_grad()
        flex.train()
        flex.grad_checkpointing = checkpointing
        flex(x, t, y, patch_size=SPATIAL, force_drop_ids=torch.zeros(2)).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in flex.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)
    assert flex.blocks[0].attn.qkv.lora["p1x4x4"].B.grad.abs().sum() > 0
    assert flex.blocks[0].attn.qkv.lora["p2x2x2"].B.grad is None  # other weak size untouched


def test_merged_lora_matches_unmerged():
    base, flex = flex_pair("lora")
    randomize_(flex.lora_parameters())
    x, t, y = inputs()
    with torch.no_grad():
        unmerged = flex(x, t, y, patch_size=SPATIAL)
        flex.merge_lora(SPATIAL)
        torch.testing.assert_close(flex(x, t, y, patch_size=SPATIAL), unmerged, rtol=0, atol=1e-5)
        assert torch.equal(flex(x, t, y), base(x, t, y))
        flex.unmerge_lora()
        assert torch.equal(flex(x, t, y, patch_size=SPATIAL), unmerged)
    with pytest.raises(ValueError, match="weak patch size"):
        flex.merge_lora(NATIVE)


def test_diffusion_loss_and_sampling_take_video_latents():
    """The layout-agnostic diffusion drives the video model as model(x, t, **cond), at a weak patch too."""
    _, flex = flex_pair("lora")
    x, _, y = inputs()
    train = create_diffusion()
    losses = train.training_losses(flex, x, torch.tensor([10, 900]), {"y": y, "patch_size": TEMPORAL})
    assert losses["loss"].shape == (2,) and torch.isfinite(losses["loss"]).all()
    sample = create_diffusion("ddim3").sample(flex, torch.randn_like(x), {"y": y, "patch_size": SPATIAL})
    assert sample.shape == x.shape and torch.isfinite(sample).all()


@pytest.mark.parametrize("mode", ["shared", "lora"])
def test_from_config_round_trip(mode):
    _, flex = flex_pair(mode, "full")
    configs = json.loads(json.dumps({"model": flex.config, "flex": flex.flex_config}))
    restored = FlexVideoDiT.from_config(configs["model"], configs["flex"]).eval()
    restored.load_state_dict(flex.state_dict(), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        for p in flex.patch_sizes:
            assert torch.equal(restored(x, t, y, patch_size=p), flex(x, t, y, patch_size=p))


def test_cfg_scale_one_is_the_conditional_prediction():
    _, flex = flex_pair("lora")
    x, t, y = inputs()
    both = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, flex.null_class)])
    with torch.no_grad():
        cond = flex(x, t, y, patch_size=TEMPORAL)
        torch.testing.assert_close(flex.forward_with_cfg(*both, 1.0, patch_size=TEMPORAL)[:2], cond, rtol=0, atol=1e-6)
        assert not torch.allclose(flex.forward_with_cfg(*both, 4.0, patch_size=TEMPORAL)[:2], cond, atol=1e-3)


# ----------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("attention", ATTENTION)
def test_flops_model_matches_torch_flop_counter(attention):
    base, flex = flex_pair("lora", attention)
    x, t, y = inputs()
    for p in (NATIVE, TEMPORAL, SPATIAL):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            flex(x, t, y, patch_size=p)
        measured = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
        analytic = cost_model(base, (4, 8, 8), lora_rank=4).breakdown(p)  # no adapters on the native patch
        sdpa = sum(n for op, n in measured.items() if "attention" in op)
        assert sdpa == pytest.approx(2 * 2 * analytic["attention"], rel=0.02)
        assert measured["convolution"] == pytest.approx(2 * 2 * analytic["patchify"], rel=0.02)
        total = cost_model(base, None, lora_rank=4)(p)
        assert counter.get_total_flops() == pytest.approx(2 * 2 * total, rel=0.02)


def test_compute_fraction_of_a_video_schedule():
    """50 steps, the first 40 at (1, 4, 4): fraction = (sum of per-step MACs) / (50 native MACs)."""
    _, flex = flex_pair("shared", "full")
    x, t, y = inputs(n=1)
    measured = {}
    with torch.no_grad():
        for p in (NATIVE, SPATIAL):
            flex(x, t, y, patch_size=p)  # fill the projection cache outside the counter
            with FlopCounterMode(display=False) as counter:
                flex(x, t, y, patch_size=p)
            measured[p] = counter.get_total_flops()
    schedule = [SPATIAL] * 40 + [NATIVE] * 10
    cost = cost_model(flex)
    fraction = BudgetSchedule(schedule, None, NATIVE).compute_fraction(cost)
    assert fraction == pytest.approx(sum(measured[p] for p in schedule) / (50 * measured[NATIVE]), rel=0.01)
    r = cost(SPATIAL) / cost(NATIVE)
    assert fraction == pytest.approx((10 + 40 * r) / 50, rel=1e-12)
    with_guidance = BudgetSchedule(schedule, [NATIVE] * 50, NATIVE).compute_fraction(cost)
    assert with_guidance == pytest.approx((fraction + 1) / 2, rel=1e-12)


def test_xl_full_attention_matches_the_perf_anchor():
    """perf-anchors §10: 16 frames x 256 px, (1, 2, 2), full 3-D attention XL: ~2.9 TMAC, attention ~37 %."""
    with torch.device("meta"):
        model = create_video_model("VDiT-XL/2", input_size=(16, 32, 32), attention="full")
    terms = cost_model(model).breakdown(model.native_patch_size)
    total = sum(terms.values())
    assert total / 1e12 == pytest.approx(2.9, abs=0.05)
    assert terms["attention"] / total == pytest.approx(0.37, abs=0.01)
    factorised_config = {**model.config, "attention": "factorised"}
    factorised = CostModel(factorised_config, model.input_size, DIT_TERMS)(model.native_patch_size)
    assert factorised < 0.7 * total


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "shape,patch,message",
    [
        ((2, 4, 5, 8, 8), TEMPORAL, "temporal patch 2 does not divide the frame count 5"),
        ((2, 4, 4, 6, 6), SPATIAL, "patch size 4 does not divide the latent size 6x6"),
        ((2, 4, 8, 8), None, "takes (N, C, F, H, W) latents"),
        ((2, 4, 4, 8, 8), 4, "(pt, ph, pw) triples"),
        ((2, 4, 4, 8, 8), (1, 2, 4), "(pt, ph, pw) triples"),
        ((2, 4, 4, 8, 8), (4, 2, 2), "not one of this model's patch sizes"),
    ],
)
def test_one_line_errors(shape, patch, message):
    _, flex = flex_pair("lora")
    x = torch.randn(*shape)
    with pytest.raises(ValueError) as err:
        flex(x, torch.zeros(2), torch.zeros(2, dtype=torch.long), patch_size=patch)
    assert message in str(err.value) and "\n" not in str(err.value)
    static = pretrained_video()
    with pytest.raises(ValueError, match="flexify it"):
        static(torch.randn(2, 4, 4, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long), patch_size=TEMPORAL)
