"""Flexible DiT: PI-resize matrices, function preservation, LoRA, checkpoints and export (FlexiDiT §3.1-3.2)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F

from flexdit_train.models.dit import DiT
from flexdit_train.models.flex import FlexDiT, flexify
from flexdit_train.models.flex.resize import embed_projection, project_kernel, resize_matrix

CONFIG = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
PIXEL_CONFIG = dict(CONFIG, input_size=32, patch_size=4, in_channels=1)


def pretrained_dit(seed: int = 0, **overrides) -> DiT:
    """A DiT with every weight random (adaLN-Zero would output zeros), reloaded from its state dict."""
    config = {**CONFIG, **overrides}
    source = DiT(**config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model = DiT(**config)
    model.load_state_dict(source.state_dict(), strict=True)
    return model.eval()


def inputs(hw=(16, 16), channels: int = 4, n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, *hw, generator=g)  # (N, C, H, W)
    return x, torch.randint(0, 1000, (n,), generator=g), torch.randint(0, 10, (n,), generator=g)


def randomize_(params, seed: int = 2, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def flex_pair(mode: str = "shared", seed: int = 0, **kwargs) -> tuple[DiT, FlexDiT]:
    """(original, flexified copy); flexify adopts the modules it is given, so the original is deep-copied."""
    base = pretrained_dit(seed, **kwargs.pop("dit", {}))
    return base, flexify(copy.deepcopy(base), mode=mode, **kwargs).eval()


# ----------------------------------------------------------------------------- PI-resize matrices
@pytest.mark.parametrize("size_in,size_out", [(4, 2), (2, 4), (4, 8), (3, 5), (4, 4)])
def test_resize_matrix_is_torch_bilinear(size_in, size_out):
    patch = torch.randn(size_in, size_in, dtype=torch.float64)
    expected = F.interpolate(patch[None, None], size=size_out, mode="bilinear", align_corners=False)
    got = resize_matrix((size_in, size_in), (size_out, size_out)) @ patch.flatten()  # (size_out²,)
    torch.testing.assert_close(got, expected.flatten(), rtol=0, atol=1e-12)


def test_known_projections():
    patch = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    pooled = F.avg_pool2d(patch, 2).flatten()  # (4,)
    torch.testing.assert_close(resize_matrix((4, 4), (2, 2)) @ patch.flatten(), pooled, rtol=0, atol=1e-12)
    identity = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(embed_projection((4, 4), (4, 4)), identity, rtol=0, atol=1e-12)
    # Q_embed(2) for p' = 4 sums each 2x2 block of the underlying kernel.
    torch.testing.assert_close(embed_projection((2, 2), (4, 4)) @ patch.flatten(), 4 * pooled, rtol=0, atol=1e-12)


@pytest.mark.parametrize("new_size", [6, 8])
def test_flexivit_property_when_upsampling(new_size):
    """<x, w> == <resize(x), PI-resized w>: a resized patch with the resized kernel gives the same token."""
    kernel = torch.randn(5, 3, 4, 4, dtype=torch.float64)  # (D, C, p', p')
    patch = torch.randn(2, 3, 4, 4, dtype=torch.float64)  # (N, C, p', p')
    resized_patch = F.interpolate(patch, size=new_size, mode="bilinear", align_corners=False)
    size = (new_size, new_size)
    resized_kernel = project_kernel(kernel, embed_projection(size, (4, 4)), size)  # (D, C, p, p)
    expected = F.conv2d(patch, kernel, stride=4)
    torch.testing.assert_close(F.conv2d(resized_patch, resized_kernel, stride=new_size), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", ["shared", "lora"])
@pytest.mark.parametrize("dit,sizes", [({}, (2, 4)), (PIXEL_CONFIG, (4, 8))], ids=["native2", "native4"])
def test_initial_weak_path_is_the_worked_example(mode, dit, sizes):
    """PI-resize init (FlexiDiT §3.1) with p' = p_weak = 2 p_nat: weak token = native token of the
    2x-average-pooled patch; weak head output = the native head's output bilinearly upsampled within the patch."""
    base, flex = flex_pair(mode, dit=dit, patch_sizes=sizes, lora_rank=4)
    p_nat, p_weak = sizes
    c_in, c_out, d = flex.in_channels, flex.out_channels, flex.hidden_size
    x, _, _ = inputs(flex.input_size, c_in)
    with torch.no_grad():
        native_of_pooled = base.x_embedder(F.avg_pool2d(x, 2))  # (N, T_weak, D)
        torch.testing.assert_close(flex.embed_patches(x, p_weak), native_of_pooled, rtol=0, atol=1e-5)

        h = torch.randn(3, 5, d)  # tokens entering the final linear
        native = base.final_layer.linear(h).reshape(15, p_nat, p_nat, c_out).permute(0, 3, 1, 2)  # (15, C, p, p)
        upsampled = F.interpolate(native, size=p_weak, mode="bilinear", align_corners=False)
        weak = flex.project_out(h, p_weak).reshape(15, p_weak, p_weak, c_out).permute(0, 3, 1, 2)
        torch.testing.assert_close(weak, upsampled, rtol=0, atol=1e-5)


def test_weak_positions_are_the_native_table_at_native_coordinates():
    _, flex = flex_pair()
    native = flex.pos_embed.reshape(8, 8, -1)  # (8, 8, D): the stored table of the 16x16 latent at p = 2
    weak = flex.position_embedding((4, 4), 4).reshape(4, 4, -1)  # coordinates 0, 2, 4, 6
    assert torch.equal(weak, native[::2, ::2])
    assert flex.position_embedding((8, 8), 2) is flex.pos_embed


# ----------------------------------------------------------------------------- acceptance: shared
@pytest.mark.parametrize("patch_size_norm", [False, True])
def test_shared_native_path_reproduces_the_original(patch_size_norm):
    base, flex = flex_pair(patch_size_norm=patch_size_norm)
    if patch_size_norm:  # move the LN off identity: the native path must not see it
        randomize_(flex.patch_size_norm.parameters())
    keys = set(flex.state_dict())
    assert {"x_embedder.proj.weight", "final_layer.linear.weight"}.isdisjoint(keys)
    assert {"flex_embed.weight", "flex_final.bias", "patch_size_embed.p2", "patch_size_embed.p4"} <= keys
    assert tuple(flex.flex_embed.weight.shape) == (64, 4, 4, 4)
    assert {k for k in keys if k.startswith("patch_size_norm")} == (
        {"patch_size_norm.p4.weight", "patch_size_norm.p4.bias"} if patch_size_norm else set()
    )
    assert {k for k in base.state_dict() if not k.startswith(("x_embedder", "final_layer.linear"))} <= keys
    with torch.no_grad():
        for hw in [(16, 16), (16, 24)]:
            x, t, y = inputs(hw)
            torch.testing.assert_close(flex(x, t, y), base(x, t, y), rtol=0, atol=1e-5)
            weak = flex(x, t, y, patch_size=4)
            assert weak.shape == (2, 8, *hw) and torch.isfinite(weak).all()


def test_shared_weak_loss_reaches_underlying_weights():
    _, flex = flex_pair()
    flex.train()
    x, t, y = inputs()
    flex(x, t, y, patch_size=4).square().mean().backward()
    for name in ["flex_embed.weight", "flex_embed.bias", "flex_final.weight", "flex_final.bias", "patch_size_embed.p4"]:
        grad = flex.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert flex.patch_size_embed.p2.grad is None
    assert flex.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert len(flex.trainable_parameters()) == len(list(flex.parameters())) - 1  # all but pos_embed


def test_projection_cache_follows_parameter_updates():
    _, flex = flex_pair()
    x, t, y = inputs()
    with torch.no_grad():
        first = flex(x, t, y, patch_size=4)
        assert flex.flex_embed(4)[0] is flex.flex_embed(4)[0]  # cached while autograd is off
        # An EMA/optimizer-style in-place update bumps the version counter and invalidates the cache.
        torch._foreach_lerp_([flex.flex_embed.weight], [torch.zeros_like(flex.flex_embed.weight)], 0.5)
        updated = flex(x, t, y, patch_size=4)
    assert not torch.allclose(updated, first)
    torch.testing.assert_close(updated, flex(x, t, y, patch_size=4), rtol=0, atol=0)  # grad on: no cache
    assert list(flex.buffers()) == []  # nothing for DDP to broadcast or for checkpoints to store


# ----------------------------------------------------------------------------- acceptance: LoRA
def test_lora_native_is_bit_exact_and_only_new_parameters_train():
    base, flex = flex_pair("lora", lora_rank=4)
    state = flex.state_dict()
    for key, value in base.state_dict().items():  # every official key kept, with the original tensor
        assert torch.equal(state[key], value), key
    assert "blocks.1.mlp.fc2.lora.p4.A" in state and "patch_size_embed.p2" not in state
    new = re.compile(r"^(flex_embed|flex_final|patch_size_embed)\.|\.lora\.")
    trainable = {n for n, p in flex.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in flex.named_parameters() if new.search(n)}
    assert len(flex.lora_parameters()) == 2 * 4 * 2  # (A, B) x 4 linears x 2 blocks

    _, shared = flex_pair("shared")
    randomize_(flex.lora_parameters())
    with torch.no_grad():
        for hw in [(16, 16), (16, 24)]:
            x, t, y = inputs(hw)
            assert torch.equal(flex(x, t, y), base(x, t, y))
            weak = flex(x, t, y, patch_size=4)
            assert weak.shape == (2, 8, *hw) and torch.isfinite(weak).all()
            assert not torch.allclose(weak, shared(x, t, y, patch_size=4), atol=1e-3)  # the adapters act


def test_lora_starts_as_the_pi_projected_model():
    _, lora = flex_pair("lora", lora_rank=4)
    _, shared = flex_pair("shared")
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(lora(x, t, y, patch_size=4), shared(x, t, y, patch_size=4), rtol=0, atol=1e-5)


def test_lora_merge_and_unmerge():
    base, flex = flex_pair("lora", lora_rank=4)
    randomize_(flex.lora_parameters())
    x, t, y = inputs()
    with torch.no_grad():
        unmerged = flex(x, t, y, patch_size=4)
        flex.merge_lora(4)
        torch.testing.assert_close(flex(x, t, y, patch_size=4), unmerged, rtol=0, atol=1e-5)
        assert torch.equal(flex(x, t, y), base(x, t, y))
        flex.unmerge_lora()
        assert torch.equal(flex(x, t, y, patch_size=4), unmerged)
        assert torch.equal(flex(x, t, y), base(x, t, y))
    assert not any("merged" in k for k in flex.state_dict())
    with pytest.raises(ValueError, match="weak patch size"):
        flex.merge_lora(2)


def test_lora_grad_checkpointing_gives_the_same_gradients():
    _, flex = flex_pair("lora", lora_rank=4)
    randomize_(flex.lora_parameters())
    flex.train()
    x, t, y = inputs()
    grads = []
    for ckpt in (False, True):
        flex.grad_checkpointing = ckpt
        flex.zero_grad()
        flex(x, t, y, patch_size=4, force_drop_ids=torch.zeros(2)).square().mean().backward()
        grads.append([p.grad.clone() for p in flex.lora_parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
    assert all(m.active is None for m in flex.blocks.modules() if hasattr(m, "active"))


# ----------------------------------------------------------------------------- pixel-space native 4
@pytest.mark.parametrize("mode,underlying", [("shared", None), ("shared", 4), ("lora", None)])
def test_native4_weak8_pixel_model(mode, underlying):
    base, flex = flex_pair(mode, dit=PIXEL_CONFIG, patch_sizes=(8, 4), underlying_patch_size=underlying, lora_rank=4)
    assert flex.patch_sizes == (4, 8) and flex.weak_patch_sizes == (8,) and flex.native_patch_size == 4
    assert flex.flex_config["underlying_patch_size"] == (underlying or 8)
    x, t, y = inputs((32, 32), channels=1)
    with torch.no_grad():
        torch.testing.assert_close(flex(x, t, y), base(x, t, y), rtol=0, atol=0 if mode == "lora" else 1e-5)
        weak = flex(x, t, y, patch_size=8)
    assert weak.shape == (2, 2, 32, 32) and torch.isfinite(weak).all()


# ----------------------------------------------------------------------------- checkpoints, export, API
@pytest.mark.parametrize("mode", ["shared", "lora"])
def test_from_config_round_trip(mode):
    _, flex = flex_pair(mode, patch_sizes=(2, 4, 8), lora_rank=4, patch_size_norm=mode == "shared")
    randomize_(flex.trainable_parameters(), seed=3)  # LN, patch-size embeddings and LoRA B off their zero init
    model_config = json.loads(json.dumps(flex.config))
    flex_config = json.loads(json.dumps(flex.flex_config))
    clone = FlexDiT.from_config(model_config, flex_config).eval()
    clone.load_state_dict(flex.state_dict(), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        for p in (2, 4, 8):
            assert torch.equal(clone(x, t, y, patch_size=p), flex(x, t, y, patch_size=p)), p


@pytest.mark.parametrize("mode", ["shared", "lora"])
def test_export_native_matches_the_native_path(mode):
    base, flex = flex_pair(mode, lora_rank=4)
    randomize_(flex.patch_size_embed.parameters())  # shared: the native vector must fold into the bias
    exported = flex.export_native()
    assert type(exported) is DiT and set(exported.state_dict()) == set(base.state_dict())
    assert not exported.pos_embed.requires_grad
    x, t, y = inputs((16, 24))
    with torch.no_grad():
        torch.testing.assert_close(exported(x, t, y), flex(x, t, y), rtol=0, atol=1e-6)
        if mode == "lora":
            assert torch.equal(exported(x, t, y), base(x, t, y))


def test_forward_with_cfg_at_a_weak_size():
    _, flex = flex_pair()
    x, t, _ = inputs(n=4)
    y = torch.tensor([1, 2, flex.null_class, flex.null_class])
    with torch.no_grad():
        guided = flex.forward_with_cfg(x, t, y, cfg_scale=3.0, patch_size=4)
        out = flex(torch.cat([x[:2], x[:2]]), t, y, patch_size=4)
    cond, uncond = out[:2, :3], out[2:, :3]
    torch.testing.assert_close(guided[:2, :3], uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(guided[:, 3:], out[:, 3:])


def test_one_line_errors():
    base, flex = flex_pair()
    x, t, y = inputs((18, 18))
    errors = []
    for call in [
        lambda: flex(x, t, y, patch_size=4),  # 4 does not divide 18
        lambda: flex(*inputs(), patch_size=8),  # not flexified for 8
        lambda: flexify(copy.deepcopy(base), patch_sizes=(2,), mode="lora"),
        lambda: flexify(copy.deepcopy(base), patch_sizes=(4, 8)),
        lambda: flexify(copy.deepcopy(base), underlying_patch_size=1),
        lambda: flexify(copy.deepcopy(base), mode="full"),
        lambda: flexify(copy.deepcopy(base), mode="lora", patch_size_norm=True),
        lambda: flex.merge_lora(4),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        errors.append(str(info.value))
    assert all("\n" not in e for e in errors)
    assert "does not divide the latent size 18x18" in errors[0]
    assert "not one of this model's patch sizes (2, 4)" in errors[1]
    assert "needs a weak patch size" in errors[2]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shared", "lora"])
def test_compiles_one_graph_per_patch_size_with_checkpointing(mode):
    """fullgraph torch.compile (aot_eager: no C++ toolchain needed) with activation checkpointing."""
    _, flex = flex_pair(mode, lora_rank=4)
    randomize_(flex.lora_parameters())
    flex.train().grad_checkpointing = True
    compiled = torch.compile(flex, backend="aot_eager", fullgraph=True)
    x, t, y = inputs()
    drop = torch.zeros(2)
    for p in (4, 2, 4):
        results = []
        for net in (compiled, flex):
            flex.zero_grad()
            out = net(x, t, y, patch_size=p, force_drop_ids=drop)
            if out.requires_grad:  # not at the frozen native size of a LoRA model
                out.square().mean().backward()
            results.append((out.detach(), [q.grad for q in flex.trainable_parameters()]))
        (compiled_out, compiled_grads), (eager_out, eager_grads) = results
        torch.testing.assert_close(compiled_out, eager_out)
        for a, b in zip(compiled_grads, eager_grads):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))
