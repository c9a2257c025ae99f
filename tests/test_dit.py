"""The DiT architecture: official key names and shapes, numerics, guidance and input checks."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.models import randomize_zero_inits

from flexdit_train.models import DiT, DiT_models, create_model
from flexdit_train.models.dit import TimestepEmbedder, sincos_2d, unpatchify

# anchors-code.md §1.1: the official DiT-XL/2 256x256 state-dict contract (N = 0..27).
XL2_SHAPES = {
    "pos_embed": (1, 256, 1152),
    "x_embedder.proj.weight": (1152, 4, 2, 2),
    "x_embedder.proj.bias": (1152,),
    "t_embedder.mlp.0.weight": (1152, 256),
    "t_embedder.mlp.0.bias": (1152,),
    "t_embedder.mlp.2.weight": (1152, 1152),
    "t_embedder.mlp.2.bias": (1152,),
    "y_embedder.embedding_table.weight": (1001, 1152),
    "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    "final_layer.adaLN_modulation.1.bias": (2304,),
    "final_layer.linear.weight": (32, 1152),
    "final_layer.linear.bias": (32,),
}
XL2_BLOCK_SHAPES = {
    "attn.qkv.weight": (3456, 1152),
    "attn.qkv.bias": (3456,),
    "attn.proj.weight": (1152, 1152),
    "attn.proj.bias": (1152,),
    "mlp.fc1.weight": (4608, 1152),
    "mlp.fc1.bias": (4608,),
    "mlp.fc2.weight": (1152, 4608),
    "mlp.fc2.bias": (1152,),
    "adaLN_modulation.1.weight": (6912, 1152),
    "adaLN_modulation.1.bias": (6912,),
}


def tiny_dit(**kwargs) -> DiT:
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    args.update(kwargs)
    return DiT(**args)


def test_xl2_has_official_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = dict(XL2_SHAPES)
    for n in range(28):
        expected.update({f"blocks.{n}.{k}": v for k, v in XL2_BLOCK_SHAPES.items()})
    assert shapes == expected
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == 675_129_632  # "675M" in the paper: 674,834,720 trainable + 294,912 pos_embed
    assert trainable == 674_834_720
    assert round(total / 1e6, 1) == 675.1


def test_registry_has_the_twelve_official_names():
    assert set(DiT_models) == {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    with torch.device("meta"):
        m = DiT_models["DiT-B/4"](input_size=16, num_classes=7, in_channels=3, learn_sigma=False,
                                  class_dropout_prob=0.0)
    assert (len(m.blocks), m.hidden_size, m.num_heads, m.patch_size) == (12, 768, 12, 4)
    assert m.y_embedder.embedding_table.weight.shape == (7, 768)  # no null row without dropout
    assert m.final_layer.linear.weight.shape == (4 * 4 * 3, 768)


def test_unknown_model_name_is_one_line_error():
    with pytest.raises(ValueError, match="unknown model 'DiT-M/2'") as err:
        create_model("DiT-M/2")
    assert "\n" not in str(err.value)


def test_a_registry_name_fixes_the_sizes_and_keeps_the_other_model_keys():
    from flexdit_train.models.factory import build_model

    torch.manual_seed(0)
    m = build_model(name="DiT-S/8", input_size=16, in_channels=1, num_classes=10, hidden_size=128, depth=4,
                    num_heads=4, patch_size=4, label_embed_std=1.0)
    assert (len(m.blocks), m.hidden_size, m.num_heads, m.patch_size) == (12, 384, 6, 8)  # the preset's sizes
    assert m.y_embedder.embedding_table.weight.std().item() == pytest.approx(1.0, rel=0.05)  # config's init


def test_timestep_embedding_is_cos_then_sin_in_fp32():
    t = torch.tensor([0.0, 998.39], dtype=torch.bfloat16).float()
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 998.39]), 256)
    assert emb.dtype == torch.float32 and emb.shape == (2, 256)
    assert torch.allclose(emb[0, :128], torch.ones(128)) and torch.allclose(emb[0, 128:], torch.zeros(128))
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    assert torch.allclose(emb[1, :128], torch.cos(998.39 * freqs), atol=1e-4)
    assert torch.allclose(emb[1, 128:], torch.sin(998.39 * freqs), atol=1e-4)
    assert t[1] == 1000.0  # why fp32 matters: bf16 would have turned 998.39 into 1000


def test_pos_embed_first_half_encodes_the_column():
    table = sincos_2d(16, (3, 5))  # (15, 16)
    # token (row 1, col 3) = index 8: first half = 1-D sincos of column 3, second half of row 1
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4.0)
    col = torch.cat([torch.sin(3 * omega), torch.cos(3 * omega)]).float()
    row = torch.cat([torch.sin(1 * omega), torch.cos(1 * omega)]).float()
    assert torch.allclose(table[8], torch.cat([col, row]))
    model = tiny_dit(input_size=(8, 12))
    assert torch.equal(model.pos_embed[0], sincos_2d(32, (4, 6)))


def test_unpatchify_inverts_patch_layout():
    n, c, p, h, w = 2, 3, 2, 4, 6
    image = torch.randn(n, c, h, w)
    # tokens in row-major grid order, per token (p_row, p_col, channel) with channel fastest
    tokens = image.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, p * p * c)
    assert torch.equal(unpatchify(tokens, (h // p, w // p), p, c), image)


def test_forward_shapes_square_and_non_square():
    model = randomize_zero_inits(tiny_dit(input_size=(8, 12)))
    x = torch.randn(3, 4, 8, 12)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 1, 10]))  # 10 = null class
    assert out.shape == (3, 8, 8, 12) and torch.isfinite(out).all()
    fresh = tiny_dit()
    assert torch.count_nonzero(fresh(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4]))) == 0


def test_patch_size_that_does_not_divide_is_one_line_error():
    with pytest.raises(ValueError, match="patch size 4 does not divide the latent size 6x8") as err:
        tiny_dit(input_size=(6, 8), patch_size=4)
    assert "\n" not in str(err.value)
    model = tiny_dit()
    with pytest.raises(ValueError, match="does not divide the latent size 9x8"):
        model(torch.randn(1, 4, 9, 8), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="runs only at patch size 2"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([1]), patch_size=4)


def test_label_dropout_uses_the_null_row_in_training_only():
    model = tiny_dit(class_dropout_prob=1.0)
    labels = torch.tensor([1, 2, 3])
    assert torch.equal(model.y_embedder.token_drop(labels), torch.full((3,), 10))
    model.eval()
    emb = model.y_embedder(labels, model.training)
    assert torch.equal(emb, model.y_embedder.embedding_table.weight[labels])


def test_guidance_on_three_vs_all_channels_differs_only_in_fourth_eps_channel():
    model = randomize_zero_inits(tiny_dit()).eval()
    x = torch.randn(2, 4, 8, 8)
    x = torch.cat([x[:1], x[:1]])  # CFG batch: the same latent twice
    t = torch.tensor([300, 300])
    y = torch.tensor([3, model.null_class])
    three = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    four = model.forward_with_cfg(x, t, y, cfg_scale=4.0, guide_all_channels=True)
    assert torch.equal(three[:, :3], four[:, :3])
    assert torch.equal(three[:, 4:], four[:, 4:])
    assert not torch.allclose(three[:, 3], four[:, 3])
    cond, uncond = model(x, t, y).chunk(2)
    assert torch.allclose(four[0, :4], uncond[0, :4] + 4.0 * (cond[0, :4] - uncond[0, :4]), atol=1e-5)
    assert torch.allclose(three[0, 3], cond[0, 3], atol=1e-6)  # the unguided 4th channel is the cond eps


def test_activation_checkpointing_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = randomize_zero_inits(tiny_dit(class_dropout_prob=0.0))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    out = model(x, t, y)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.grad_checkpointing = True
    out_ckpt = model(x, t, y)
    out_ckpt.square().mean().backward()
    assert torch.allclose(out, out_ckpt)
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(grads[n], p.grad, atol=1e-6), n


def test_label_table_init_scale_is_a_knob_with_dits_default():
    torch.manual_seed(0)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=256, depth=1, num_heads=4, num_classes=1000)
    wide = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=256, depth=1, num_heads=4, num_classes=1000,
               label_embed_std=1.0)
    assert dit.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert wide.y_embedder.embedding_table.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert "label_embed_std" not in wide.config  # an initialisation, not part of the architecture
