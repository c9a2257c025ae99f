"""Checkpoint loading and export: every supported layout round-trips, shapes infer the architecture,
and bad input fails with one actionable line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from flexdit_train.models.dit import DiT, DiT_models
from flexdit_train.models.loading import (
    CheckpointError,
    export_official,
    export_safetensors,
    from_pretrained,
    infer_config,
)

# DiT-S width (so plain files infer 6 heads from the preset), but 2 blocks on an 8x8 latent.
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=2, num_heads=6)


def randomized(seed: int = 0, **kwargs) -> DiT:
    """A tiny DiT with every weight random: adaLN-Zero init would make all outputs zero and hide bugs."""
    torch.manual_seed(seed)
    model = DiT(**{**TINY, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def batch(model: DiT, n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    h, w = model.input_size
    x = torch.randn(n, model.in_channels, h, w, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, model.num_classes, (n,), generator=g)
    return x, t, y


def assert_same(loaded: nn.Module, reference: DiT) -> None:
    """Identical state dict, identical frozen pos_embed, bit-identical outputs."""
    ref_sd, got_sd = reference.state_dict(), loaded.state_dict()
    assert list(got_sd) == list(ref_sd)
    for key, value in ref_sd.items():
        assert torch.equal(got_sd[key], value), key
    assert loaded.config == reference.config
    assert not loaded.pos_embed.requires_grad
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(*batch(reference)), reference(*batch(reference)))


def assert_one_line(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


#################################################################################
#                                  Round trips                                  #
#################################################################################


def test_official_round_trip(tmp_path):
    model = randomized()
    path = export_official(model, tmp_path / "DiT-tiny.pt")
    raw = torch.load(path, weights_only=True)
    assert list(raw) == list(model.state_dict())  # a plain official-layout state dict
    assert all(v.device.type == "cpu" and v.is_contiguous() for v in raw.values())
    assert_same(from_pretrained(path), model)


def test_safetensors_round_trip_stores_config(tmp_path):
    # 10 classes without a null row: shapes alone would say 9 classes + null, the metadata must win.
    model = randomized(num_classes=10, class_dropout_prob=0.0, mlp_ratio=2.0, learn_sigma=False)
    path = export_safetensors(model, tmp_path / "tiny.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["flexdit_model_config"]) == model.config
    assert "flexdit_flex_config" not in metadata and "flexdit_diffusion" not in metadata
    loaded = from_pretrained(path)
    assert_same(loaded, model)
    assert loaded.diffusion_process is None  # no record: samplers use DiT's process


def test_the_training_process_travels_through_safetensors_and_lightning_files(tmp_path):
    process = {"noise_schedule": "cosine", "diffusion_steps": 1000, "prediction": "v", "learn_sigma": True,
               "sigma_small": False}
    model = randomized(num_classes=10, class_dropout_prob=0.0)
    model.diffusion_process = process
    assert from_pretrained(export_safetensors(model, tmp_path / "v.safetensors")).diffusion_process == process
    checkpoint = {"state_dict": {f"ema.{k}": v for k, v in model.state_dict().items()},
                  "flexdit": {"format_version": 1, "model_config": model.config, "flex_config": None,
                              "diffusion": process}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    assert from_pretrained(tmp_path / "last.ckpt").diffusion_process == process


def test_plain_safetensors_without_metadata(tmp_path):
    model = randomized()
    save_file(model.state_dict(), tmp_path / "plain.safetensors")
    assert_same(from_pretrained(tmp_path / "plain.safetensors"), model)


def test_safetensors_whose_header_length_starts_like_a_pickle_keeps_its_metadata(tmp_path):
    # The first byte of a safetensors file is the low byte of its header length; 0x80 is a pickle's opcode.
    model = randomized()
    for pad in range(256):
        path = export_safetensors(model, tmp_path / "w.safetensors")
        if path.read_bytes()[0] == 0x80:
            break
        model.config = {**model.config}
        model.diffusion_process = {"noise_schedule": "linear", "note": "x" * pad}  # grows the JSON header
    assert path.read_bytes()[0] == 0x80
    loaded = from_pretrained(path)
    assert_same(loaded, model)
    assert loaded.diffusion_process == model.diffusion_process  # the metadata, not just the tensors


def test_train_py_checkpoint_prefers_ema(tmp_path):
    model, ema = randomized(seed=0), randomized(seed=1)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        # DiT's train.py pickles its argparse.Namespace, which weights_only=True refuses by default.
        "args": argparse.Namespace(model="DiT-S/8", image_size=64, num_classes=1000, results_dir="results"),
    }
    torch.save(checkpoint, tmp_path / "0050000.pt")
    assert_same(from_pretrained(tmp_path / "0050000.pt"), ema)
    assert_same(from_pretrained(tmp_path / "0050000.pt", prefer_ema=False), model)


def test_lightning_checkpoint_prefers_ema_and_stored_config(tmp_path):
    model = randomized(seed=0, num_classes=10, class_dropout_prob=0.0)
    ema = randomized(seed=1, num_classes=10, class_dropout_prob=0.0)
    state_dict = {f"model.{k}": v for k, v in model.state_dict().items()}
    state_dict |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    state_dict["vae.encoder.weight"] = torch.zeros(3)  # other submodules of the LightningModule are ignored
    checkpoint = {
        "state_dict": state_dict,
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "2.4.0",
        "flexdit": {"format_version": 1, "model_config": model.config, "flex_config": None},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    assert_same(from_pretrained(tmp_path / "last.ckpt"), ema)
    assert_same(from_pretrained(tmp_path / "last.ckpt", prefer_ema=False), model)


def test_lightning_checkpoint_without_ema_loads_model(tmp_path):
    model = randomized()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "a.ckpt")
    assert_same(from_pretrained(tmp_path / "a.ckpt"), model)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.module."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    model = randomized()
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "wrapped.pt")
    assert_same(from_pretrained(tmp_path / "wrapped.pt"), model)
    # The same inside a Lightning EMA branch, e.g. an AveragedModel ("ema.module.*" plus its step counter).
    ema_sd = {f"ema.{prefix}{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": {**ema_sd, "ema.n_averaged": torch.tensor(5)}}, tmp_path / "ema.ckpt")
    assert_same(from_pretrained(tmp_path / "ema.ckpt"), model)


def test_export_unwraps_compiled_and_averaged_models(tmp_path):
    model = randomized()
    averaged = torch.optim.swa_utils.AveragedModel(model)
    raw = torch.load(export_official(averaged, tmp_path / "avg.pt"), weights_only=True)
    assert list(raw) == list(model.state_dict())


def test_in_memory_dict_and_existing_module(tmp_path):
    model = randomized()
    assert_same(from_pretrained({"ema": model.state_dict()}), model)
    target = randomized(seed=5)
    assert from_pretrained(export_official(model, tmp_path / "m.pt"), target) is target
    assert_same(target, model)


def test_half_precision_file_loads_into_fp32_model(tmp_path):
    model = randomized()
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "half.pt")
    loaded = from_pretrained(tmp_path / "half.pt")
    assert all(v.dtype == torch.float32 for v in loaded.state_dict().values())
    assert torch.equal(loaded.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight.half().float())


def test_atomic_write_leaves_target_intact_on_failure(tmp_path, monkeypatch):
    model = randomized()
    path = export_official(model, tmp_path / "ckpt.pt")
    before = path.read_bytes()

    def crash(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        export_official(randomized(seed=3), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


class FakeFlexDiT(DiT):
    """Stands in for models.flex.FlexDiT (written separately): only the contract loading relies on."""

    def __init__(self, flex_config: dict, **config):
        super().__init__(**config)
        self.flex_config = flex_config
        self.extra = nn.Linear(3, 3)  # flexible models carry weights a static DiT lacks

    @classmethod
    def from_config(cls, model_config: dict, flex_config: dict) -> FakeFlexDiT:
        return cls(flex_config, **model_config)

    def export_native(self) -> DiT:
        native = DiT(**self.config)
        native.load_state_dict({k: v for k, v in self.state_dict().items() if not k.startswith("extra.")})
        return native


def test_flexible_checkpoints_use_flex_model(tmp_path, monkeypatch):
    fake = types.ModuleType("flexdit_train.models.flex")
    fake.FlexDiT = FakeFlexDiT
    monkeypatch.setitem(sys.modules, "flexdit_train.models.flex", fake)
    torch.manual_seed(0)
    flex = FakeFlexDiT({"patch_sizes": [2, 4]}, **TINY).eval()

    path = export_safetensors(flex, tmp_path / "flex.safetensors")
    loaded = from_pretrained(path)
    assert isinstance(loaded, FakeFlexDiT) and loaded.flex_config == {"patch_sizes": [2, 4]}
    assert_same(loaded, flex)

    meta = {"format_version": 1, "model_config": flex.config, "flex_config": flex.flex_config}
    state_dict = {f"ema.{k}": v for k, v in flex.state_dict().items()}
    torch.save({"state_dict": state_dict, "flexdit": meta}, tmp_path / "flex.ckpt")
    assert_same(from_pretrained(tmp_path / "flex.ckpt"), flex)

    # The official layout holds the native static DiT.
    native = from_pretrained(export_official(flex, tmp_path / "native.pt"))
    assert type(native) is DiT
    assert_same(native, flex.export_native().eval())


#################################################################################
#                             Architecture inference                            #
#################################################################################


def official_xl2_state_dict(input_size: int = 32) -> dict[str, torch.Tensor]:
    """The DiT-XL/2 key set and shapes (anchors-code.md §1.1) as meta tensors: no 675M materialized."""
    with torch.device("meta"):
        return DiT_models["DiT-XL/2"](input_size=input_size).state_dict()


def test_infers_official_xl2_256():
    sd = official_xl2_state_dict()
    assert len([k for k in sd if k.startswith("blocks.27.")]) == 10
    assert tuple(sd["y_embedder.embedding_table.weight"].shape) == (1001, 1152)
    assert infer_config(sd) == dict(
        input_size=[32, 32],
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        num_heads=16,
    )
    assert infer_config(sd, model="DiT-XL/2") == infer_config(sd)


def test_infers_official_xl2_512():
    assert infer_config(official_xl2_state_dict(input_size=64))["input_size"] == [64, 64]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(learn_sigma=False, in_channels=3, patch_size=4, input_size=16),
        dict(mlp_ratio=2.5, depth=3, num_classes=7, patch_size=8, input_size=16),
    ],
)
def test_infers_every_field(tmp_path, kwargs):
    model = randomized(**kwargs)
    assert infer_config(model.state_dict()) == model.config
    assert_same(from_pretrained(export_official(model, tmp_path / "m.pt")), model)


def test_1000_row_table_means_no_null_class():
    with torch.device("meta"):
        sd = DiT(**TINY, num_classes=1000, class_dropout_prob=0.0).state_dict()
    config = infer_config(sd)
    assert (config["num_classes"], config["class_dropout_prob"]) == (1000, 0.0)


def test_overrides_settle_class_count_ambiguity():
    with torch.device("meta"):
        sd = DiT(**TINY, num_classes=10, class_dropout_prob=0.0).state_dict()  # 10 rows
    assert infer_config(sd)["num_classes"] == 9  # the DiT default: 9 classes + null row
    assert infer_config(sd, class_dropout_prob=0.0)["num_classes"] == 10
    config = infer_config(sd, num_classes=10)
    assert (config["num_classes"], config["class_dropout_prob"]) == (10, 0.0)


def test_heads_from_dit_b_preset(tmp_path):
    model = randomized(hidden_size=768, num_heads=12, depth=1, patch_size=4)
    loaded = from_pretrained(export_official(model, tmp_path / "b.pt"))
    assert loaded.config["num_heads"] == 12
    assert_same(loaded, model)


def test_non_square_model_needs_input_size_override(tmp_path):
    model = randomized(input_size=(8, 16))
    path = export_official(model, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(path)
    assert_one_line(excinfo, "32 position tokens, not a square grid", "input_size=(H, W)")
    assert_same(from_pretrained(path, input_size=(8, 16)), model)


def test_unofficial_width_needs_heads(tmp_path):
    model = randomized(hidden_size=96, num_heads=3)
    path = export_official(model, tmp_path / "w96.pt")
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(path)
    assert_one_line(excinfo, "width 96", "model='DiT-<size>/<patch>' or num_heads=N")
    assert_same(from_pretrained(path, num_heads=3), model)


def test_model_name_must_agree_with_weights(tmp_path):
    with torch.device("meta"):
        s8 = DiT_models["DiT-S/8"](input_size=8)
    assert infer_config(s8.state_dict(), model="DiT-S/8") == s8.config
    path = export_official(randomized(patch_size=4), tmp_path / "s4.pt")
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(path, "DiT-XL/2")
    assert_one_line(
        excinfo, "is not a DiT-XL/2", "hidden_size 384 vs 1152", "depth 2 vs 28", "patch_size 4 vs 2"
    )


#################################################################################
#                                   Bad input                                   #
#################################################################################


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(tmp_path / "DiT-XL-2-256x256.pt")
    assert_one_line(excinfo, "does not exist", "check the path")


def test_unknown_model_name(tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(tmp_path / "never-read.pt", "DiT-XXL/2")
    assert_one_line(excinfo, "unknown model 'DiT-XXL/2'", "DiT-XL/2")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize(
    "keep", [lambda n: 10, lambda n: n // 2, lambda n: n - 1], ids=["10B", "half", "n-1"]
)
def test_truncated_file(tmp_path, suffix, keep):
    writer = export_official if suffix == ".pt" else export_safetensors
    data = writer(randomized(hidden_size=64, num_heads=4), tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: keep(len(data))])
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(tmp_path / f"cut{suffix}")
    assert_one_line(excinfo, "is truncated or corrupt", "re-download or re-copy it")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(tmp_path / "empty.pt")
    assert_one_line(excinfo, "truncated or corrupt (only 0 bytes)")


@pytest.mark.parametrize(
    "content", ['{"model": {"weights": [1, 2, 3]}, "note": "not weights"}\n', "hello\nworld\n" * 5]
)
def test_text_file_is_not_a_checkpoint(tmp_path, content):
    (tmp_path / "config.pt").write_text(content)
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(tmp_path / "config.pt")
    assert_one_line(excinfo, "is not a DiT checkpoint: it is a text file", "pass the .pt or .safetensors")


def test_other_network_is_not_a_dit(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(8, 2))
    torch.save(other.state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(tmp_path / "resnet.pt")
    assert_one_line(excinfo, "is not a DiT checkpoint", "0.weight", "x_embedder.proj.weight")


def test_non_tensor_dict_is_not_a_dit(tmp_path):
    torch.save({"epoch": 3, "lr": 1e-4}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(tmp_path / "meta.pt")
    assert_one_line(excinfo, "is not a DiT checkpoint", "[epoch, lr] are not tensors")


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    model = randomized()
    sd = dict(model.state_dict())
    del sd["blocks.1.attn.proj.bias"]
    sd["blocks.1.extra.weight"] = torch.zeros(2)
    sd["t_embedder.mlp.2.weight"] = torch.zeros(384, 32)
    torch.save(sd, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(tmp_path / "edited.pt")
    assert_one_line(
        excinfo,
        "does not match DiT(",
        "missing [blocks.1.attn.proj.bias]",
        "unexpected [blocks.1.extra.weight]",
        "t_embedder.mlp.2.weight (384, 32) vs (384, 384)",
    )


def test_refused_pickle_names_the_class(tmp_path):
    model = randomized()
    torch.save({"model": model.state_dict(), "run": argparse.ArgumentParser}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(tmp_path / "odd.pt")
    assert_one_line(excinfo, "argparse.ArgumentParser", "weights_only=False")


def test_newer_format_version(tmp_path):
    model = randomized()
    meta = {"format_version": 2, "model_config": model.config, "flex_config": None}
    torch.save({"state_dict": {}, "flexdit": meta}, tmp_path / "future.ckpt")
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(tmp_path / "future.ckpt")
    assert_one_line(excinfo, "format_version 2", "reads version 1")


def test_unknown_override(tmp_path):
    path = export_official(randomized(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as excinfo:
        from_pretrained(path, heads=6)
    assert_one_line(excinfo, "unknown DiT argument(s) ['heads']", "num_heads")
