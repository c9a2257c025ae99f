"""Text-conditioned DiT (PixArt-alpha style): null caption and CFG, LoRA flexify, FLOPs model, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from flexdit_train.diffusion import create_diffusion
from flexdit_train.flops import cost_model
from flexdit_train.models.flex import FlexTextDiT, flexify
from flexdit_train.models.flex.lora import LoRALinear
from flexdit_train.models.text_dit import TextDiT
from flexdit_train.sampling.schedule import from_powerful_steps

CONFIG = dict(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=4, caption_channels=24, text_len=6)


def pretrained_text(seed: int = 0, **overrides) -> TextDiT:
    """A TextDiT with every weight random (zero-init layers would hide the conditioning)."""
    model = TextDiT(**{**CONFIG, **overrides})
    randomize_([p for n, p in model.named_parameters() if n != "pos_embed"], seed)
    return model.eval()


def randomize_(params, seed: int = 2, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def flex_pair(mode: str = "lora", **kwargs) -> tuple[TextDiT, FlexTextDiT]:
    base = pretrained_text()
    return base, flexify(copy.deepcopy(base), mode=mode, lora_rank=4, **kwargs).eval()


def inputs(n: int = 2, seed: int = 1):
    """x (N, 4, 8, 8), t (N,), caption (N, 6, 24) and a mask with the last 2 tokens of item 0 padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    mask = torch.ones(n, 6, dtype=torch.bool)
    mask[0, 4:] = False
    return x, torch.randint(0, 1000, (n,), generator=g), torch.randn(n, 6, 24, generator=g), mask


def test_pixart_layout_and_zero_init():
    model = TextDiT(**{**CONFIG, "depth": 1})
    keys = set(model.state_dict())
    assert {
        "pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.2.weight", "t_block.1.weight",
        "y_embedder.y_embedding", "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc2.weight",
        "blocks.0.scale_shift_table", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
        "blocks.0.cross_attn.q_linear.weight", "blocks.0.cross_attn.kv_linear.weight",
        "blocks.0.cross_attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight",
        "final_layer.scale_shift_table", "final_layer.linear.weight",
    } <= keys  # fmt: skip
    x, t, emb, mask = inputs()
    assert torch.equal(model(x, t, emb, mask), torch.zeros(2, 8, 8, 8))  # zero output layer at init
    assert model.blocks[0].cross_attn.proj.weight.abs().sum() == 0 and model.t_block[1].weight.abs().sum() == 0


# ----------------------------------------------------------------------------- conditioning
def test_mask_hides_padding_tokens_and_caption_matters():
    model = pretrained_text()
    x, t, emb, mask = inputs()
    changed = emb.clone()
    changed[0, 4:] += 5.0  # padding of item 0
    with torch.no_grad():
        out = model(x, t, emb, mask)
        torch.testing.assert_close(model(x, t, changed, mask), out, rtol=0, atol=1e-6)
        assert (model(x, t, emb + 1.0, mask) - out).abs().max() > 1e-2


def test_null_text_cfg_and_caption_dropout():
    model = pretrained_text()
    x, t, emb, mask = inputs()
    null_emb, null_mask = model.null_text(2)
    assert null_emb.shape == (2, 6, 24) and null_mask.dtype == torch.bool and null_mask.all()
    with torch.no_grad():
        cond = model(x, t, emb, mask)
        uncond = model(x, t, null_emb, null_mask)
        # force_drop_ids (and training-time dropout) substitute exactly the null caption of null_text()
        assert torch.equal(model(x, t, emb, mask, force_drop_ids=torch.ones(2)), uncond)
        assert (uncond - cond).abs().max() > 1e-2

        batch = torch.cat([x, x]), torch.cat([t, t]), torch.cat([emb, null_emb])
        both_masks = torch.cat([mask, null_mask])
        guided_1 = model.forward_with_cfg(*batch, 1.0, text_mask=both_masks)[:2]
        torch.testing.assert_close(guided_1, cond, rtol=0, atol=1e-6)
        guided_4 = model.forward_with_cfg(*batch, 4.0, text_mask=both_masks)[:2]
        torch.testing.assert_close(guided_4[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
        assert (guided_4 - cond).abs().max() > 1e-2

    model.train()
    model.y_embedder.dropout_prob = 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, emb, mask), uncond, rtol=0, atol=0)


# ----------------------------------------------------------------------------- acceptance: flexify
@pytest.mark.parametrize("mode", ["shared", "lora"])
def test_native_path_is_preserved_and_weak_size_runs(mode):
    base, flex = flex_pair(mode)
    if mode == "lora":
        randomize_(flex.lora_parameters())
    x, t, emb, mask = inputs()
    with torch.no_grad():
        native, original = flex(x, t, emb, mask), base(x, t, emb, mask)
        if mode == "lora":
            assert torch.equal(native, original)
        else:
            torch.testing.assert_close(native, original, rtol=0, atol=1e-5)
        weak = flex(x, t, emb, mask, patch_size=4)
        assert weak.shape == (2, 8, 8, 8) and torch.isfinite(weak).all()
        assert (weak - native).abs().max() > 1e-3


def test_initial_weak_token_is_the_native_token_of_the_pooled_patch():
    base, flex = flex_pair("lora")
    x, *_ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(flex.embed_patches(x, 4), base.x_embedder(F.avg_pool2d(x, 2)), rtol=0, atol=1e-5)


def test_lora_on_self_attention_and_mlp_only_and_distillation_step():
    _, flex = flex_pair("lora")
    adapted = {n.removesuffix(".lora") for n, m in flex.named_modules() if isinstance(m, LoRALinear)}
    layers = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert adapted == {f"blocks.{i}.{layer}" for i in range(2) for layer in layers}
    trainable = {n for n, p in flex.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in flex.named_parameters() if ".lora." in n or n.startswith(("flex_", "patch_size_embed"))
    }
    assert not any("cross_attn" in n for n in trainable)

    # Method doc §3.2: frozen native prediction (the teacher) vs the weak prediction of the same network.
    flex.train()
    x, t, emb, mask = inputs()
    drop = torch.zeros(2)
    with torch.no_grad():
        teacher = flex(x, t, emb, mask, force_drop_ids=drop)
    F.mse_loss(flex(x, t, emb, mask, patch_size=4, force_drop_ids=drop), teacher).backward()
    for name in ["flex_embed.p4.weight", "flex_final.p4.weight", "patch_size_embed.p4", "blocks.0.attn.qkv.lora.p4.B"]:
        assert flex.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in flex.parameters() if not p.requires_grad)


def test_diffusion_loss_and_sampling_take_text_conditions():
    _, flex = flex_pair("lora")
    x, _, emb, mask = inputs()
    cond = {"text_emb": emb, "text_mask": mask, "patch_size": 4}
    losses = create_diffusion().training_losses(flex, x, torch.tensor([10, 900]), cond)
    assert losses["loss"].shape == (2,) and torch.isfinite(losses["loss"]).all()
    sample = create_diffusion("ddim3").sample(flex, torch.randn_like(x), cond)
    assert sample.shape == x.shape and torch.isfinite(sample).all()


@pytest.mark.parametrize("mode", ["shared", "lora"])
def test_from_config_round_trip(mode):
    _, flex = flex_pair(mode)
    configs = json.loads(json.dumps({"model": flex.config, "flex": flex.flex_config}))
    restored = FlexTextDiT.from_config(configs["model"], configs["flex"]).eval()
    restored.load_state_dict(flex.state_dict(), strict=True)
    x, t, emb, mask = inputs()
    with torch.no_grad():
        for p in (2, 4):
            assert torch.equal(restored(x, t, emb, mask, patch_size=p), flex(x, t, emb, mask, patch_size=p))


# ----------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("patch_size", [2, 4])
def test_flops_model_matches_torch_flop_counter(patch_size):
    base, flex = flex_pair("lora")
    x, t, emb, mask = inputs()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        flex(x, t, emb, mask, patch_size=patch_size)
    measured = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    cost = cost_model(base, 8, lora_rank=4)  # no adapters on the native patch
    terms = cost.breakdown(patch_size)
    n, d, length = (8 // patch_size) ** 2, 32, 6
    # SDPA: self-attention 2·N²·D and the cross-attention core 2·N·L·D per block
    sdpa = sum(v for op, v in measured.items() if "attention" in op)
    assert sdpa == pytest.approx(2 * 2 * (terms["attention"] + 2 * 2 * n * length * d), rel=0.02)
    assert counter.get_total_flops() == pytest.approx(2 * 2 * cost(patch_size), rel=0.02)
    assert terms["adaln"] == 6 * d * d and terms["final_adaln"] == 0


def test_text_cost_model_drives_budget_schedules():
    base = pretrained_text()
    cost = cost_model(base, lora_rank=4)
    schedule = from_powerful_steps(20, 2, 4, powerful_steps=5)
    r = cost(4) / cost(2)
    assert schedule.compute_fraction(cost) == pytest.approx((5 + 15 * r) / 20, rel=1e-12)
    assert 0.25 < r < 0.6  # caption terms do not shrink with the patch


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "emb_shape,mask_shape,patch,message",
    [
        (None, None, None, "needs text embeddings (N=2, L=6, D_text=24)"),
        ((2, 6, 16), None, None, "caption_channels=24"),
        ((2, 5, 24), None, None, "pad or truncate them to text_len=6"),
        ((2, 6, 24), (2, 5), None, "text_mask has shape (2, 5)"),
        ((2, 6, 24), None, 8, "not one of this model's patch sizes"),
    ],
)
def test_one_line_errors(emb_shape, mask_shape, patch, message):
    _, flex = flex_pair("lora")
    x, t, *_ = inputs()
    emb = None if emb_shape is None else torch.randn(*emb_shape)
    mask = None if mask_shape is None else torch.ones(*mask_shape, dtype=torch.bool)
    with pytest.raises(ValueError) as err:
        flex(x, t, emb, mask, patch_size=patch)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_video_latents_are_refused_in_one_line():
    _, flex = flex_pair("lora")
    _, t, emb, mask = inputs()
    with pytest.raises(ValueError) as err:
        flex(torch.randn(2, 4, 3, 8, 8), t, emb, mask)
    assert "takes image latents (N, C, H, W), got shape (2, 4, 3, 8, 8)" in str(err.value)
    assert "\n" not in str(err.value)
