"""Video and text-to-image flexible DiTs end to end: caption embeddings, both experiments, sampling, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from PIL import Image
from test_train import compose_train

import flexdit_train
from flexdit_train.data.captions import CaptionEmbeddingsWdsDataModule
from flexdit_train.data.media import TEXT_EMB_FIELD, TEXT_MASK_FIELD, encode_mp4, read_frames, video_info
from flexdit_train.data.stream import WorkerStats, read_shards
from flexdit_train.data.text import TextEncoder, encode_text_shards
from flexdit_train.diffusion import create_diffusion
from flexdit_train.flops import cost_model
from flexdit_train.models import TextDiT, VideoDiT, export_safetensors, flexify, from_pretrained
from flexdit_train.sample import run_sampling
from flexdit_train.sampling import ScheduledDenoiser
from flexdit_train.sampling.schedule import BudgetSchedule, build_schedule
from flexdit_train.shards import main as shards_main
from flexdit_train.train import build_module, run
from flexdit_train.training.flex_objectives import DistillModule

FRAMES, SIZE, TEXT_LEN, TEXT_WIDTH = 4, 8, 8, 32
NATIVE, TEMPORAL, SPATIAL = (1, 2, 2), (2, 2, 2), (1, 4, 4)
CAPTIONS = ["a red square", "two blue dots", "a green line", "an empty grey sky"]
COMMON = ["trainer=cpu", "trainer.max_steps=2", "logger=csv", "callbacks.sample_grid.vae=null",
          "callbacks.sample_grid.num_images=2", "callbacks.sample_grid.sampling_steps=ddim2",
          "data.global_batch_size=2", "data.num_workers=0"]


def randomized(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """A "pretrained" model: random trainable weights (adaLN-Zero would make every prediction 0)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- data and checkpoints
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("video_t2i")


@pytest.fixture(scope="module")
def video_shards(root) -> Path:
    """Four 4-frame 16x16 mp4 clips of two classes through the `shards video` writer."""
    src = root / "clips"
    src.mkdir()
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(4):
        frames = rng.integers(0, 256, (FRAMES, 16, 16, 3), dtype=np.uint8)  # (F, H, W, 3)
        (src / f"clip{i}.mp4").write_bytes(encode_mp4(frames, 8))
        rows.append(f"clip{i}.mp4,{'ab'[i % 2]}")
    (src / "list.csv").write_text("\n".join(rows) + "\n")
    assert shards_main(["video", str(src / "list.csv"), str(root / "video"), "--maxcount", "2"]) == 0
    return root / "video" / "train.json"


def video_checkpoint(path: Path, frames: int) -> Path:
    model = VideoDiT(input_size=(frames, SIZE, SIZE), in_channels=3, hidden_size=32, depth=2, num_heads=2,
                     num_classes=2)
    return export_safetensors(randomized(model), path)


@pytest.fixture(scope="module")
def tiny_encoder(root) -> Path:
    """A random 1-layer T5 encoder and a character-level tokenizer, saved like real ones (nothing downloaded)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for char in "abcdefghijklmnopqrstuvwxyz ":
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = root / "encoder"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    config = T5Config(d_model=TEXT_WIDTH, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=len(vocab))
    T5EncoderModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def caption_shards(root) -> Path:
    """Four captioned 8x8 PNGs through `shards imagefolder` with a 'path,caption' list."""
    src = root / "images"
    src.mkdir()
    rng = np.random.default_rng(1)
    rows = ["path,caption"]
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(src / f"{i}.png")
        rows.append(f"{i}.png,{caption}")
    (src / "list.csv").write_text("\n".join(rows) + "\n")
    assert shards_main(["imagefolder", str(src / "list.csv"), str(root / "captions"), "--maxcount", "2"]) == 0
    return root / "captions" / "train.json"


@pytest.fixture(scope="module")
def embedded(root, caption_shards, tiny_encoder) -> Path:
    out = root / "captions-t5"
    argv = ["text-embeddings", str(caption_shards), str(out), "--encoder", str(tiny_encoder),
            "--max-length", str(TEXT_LEN), "--batch-size", "3"]
    assert shards_main(argv) == 0
    return out / "train.json"


def samples(index: Path) -> list[dict]:
    urls = [str(index.parent / s["url"]) for s in json.loads(index.read_text())["shards"]]
    return list(read_shards([dict(url=u) for u in urls], WorkerStats()))


def sample_app(overrides: list[str], out_dir: Path) -> dict:
    with initialize_config_dir(version_base="1.3", config_dir=flexdit_train.CONF_DIR):
        cfg = compose("sample", overrides=[*overrides, "device=cpu", "progress=false", "num_samples=2",
                                           "batch_size=2", "sampling_steps=ddim4", "cfg_scale=2.0"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    return run_sampling(cfg)["card"]


def video_overrides(shards: Path, checkpoint: Path, frames: int = FRAMES) -> list[str]:
    return ["+experiment=video_flex", *COMMON, f"data.train_shards={shards}", "data.vae=null",
            f"data.image_size={SIZE}", f"data.input_size={SIZE}", "data.in_channels=3", f"data.num_frames={frames}",
            "data.frame_stride=1", "data.num_classes=2", f"model.pretrained={checkpoint}", "flex.lora_rank=4"]


def t2i_overrides(shards: Path, checkpoint: Path) -> list[str]:
    return ["+experiment=t2i_flex", *COMMON, f"data.train_shards={shards}", f"data.input_size={SIZE}",
            "data.in_channels=3", f"data.image_size={SIZE}", f"data.text_len={TEXT_LEN}",
            f"data.text_channels={TEXT_WIDTH}", f"model.pretrained={checkpoint}", "flex.lora_rank=4"]


# ----------------------------------------------------------------------------- caption embeddings
def test_text_embeddings_keep_the_samples_add_states_and_resume(embedded, caption_shards, tiny_encoder, capsys):
    index = json.loads(embedded.read_text())
    assert (index["total"], index["text_len"], index["text_channels"], index["kind"]) == (4, TEXT_LEN, TEXT_WIDTH, "image")
    originals = {s["__key__"]: s for s in samples(caption_shards)}
    encoder = TextEncoder(tiny_encoder)
    for sample in samples(embedded):
        source = originals[sample["__key__"]]
        assert all(sample[k] == source[k] for k in ("png", "txt", "json"))  # members copied byte for byte
        emb, mask = np.load(io.BytesIO(sample[TEXT_EMB_FIELD])), np.load(io.BytesIO(sample[TEXT_MASK_FIELD]))
        assert emb.dtype == np.float16 and emb.shape == (TEXT_LEN, TEXT_WIDTH) and mask.dtype == bool
        ref_emb, ref_mask = encoder.encode([sample["txt"].decode()], TEXT_LEN)
        assert np.array_equal(mask, ref_mask[0].numpy())
        assert mask.sum() == min(len(sample["txt"]) + 1, TEXT_LEN)  # characters + </s>, cut to L
        assert np.allclose(emb, ref_emb[0].numpy(), atol=2e-3)
    shards = sorted(embedded.parent.glob("train-*.tar"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    capsys.readouterr()
    argv = ["text-embeddings", str(caption_shards), str(embedded.parent), "--encoder", str(tiny_encoder),
            "--max-length", str(TEXT_LEN)]
    assert shards_main(argv) == 0  # a rerun resumes: nothing left to encode
    assert "0 of 2 shards (2 already done)" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    with pytest.raises(SystemExit) as err:  # a user error: one line on stderr, exit 2
        shards_main([*argv[:-1], "16"])
    assert err.value.code == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and f"encoded with encoder {tiny_encoder.name!r} and --max-length 8" in stderr[0]


def test_an_embedded_set_re_encodes_with_another_length(embedded, tmp_path, tiny_encoder):
    index = encode_text_shards(embedded, tmp_path / "again", encoder=tiny_encoder, max_length=TEXT_LEN + 4,
                               log=lambda *_: None)
    assert (index["total"], index["text_len"], index["kind"]) == (4, TEXT_LEN + 4, "image")
    for sample in samples(tmp_path / "again" / "train.json"):
        assert np.load(io.BytesIO(sample[TEXT_EMB_FIELD])).shape == (TEXT_LEN + 4, TEXT_WIDTH)


def datamodule(shards: Path) -> CaptionEmbeddingsWdsDataModule:
    cfg = OmegaConf.load(Path(flexdit_train.CONF_DIR) / "data" / "t2i_wds.yaml")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
    kwargs.update(train_shards=str(shards), seed=0, global_batch_size=2, num_workers=0, input_size=SIZE,
                  in_channels=3, image_size=SIZE, text_len=TEXT_LEN, text_channels=TEXT_WIDTH)
    return CaptionEmbeddingsWdsDataModule(**kwargs)


def test_caption_batches_carry_embeddings_and_masks(embedded):
    dm = datamodule(embedded)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "text_emb", "text_mask", "key"}
    assert batch["x"].shape == (2, 3, SIZE, SIZE) and -1 <= batch["x"].min() and batch["x"].max() <= 1
    assert batch["text_emb"].shape == (2, TEXT_LEN, TEXT_WIDTH) and batch["text_emb"].dtype == torch.float32
    assert batch["text_mask"].shape == (2, TEXT_LEN) and batch["text_mask"].dtype == torch.bool


def test_caption_shards_without_embeddings_name_the_command(caption_shards, embedded):
    with pytest.raises(ValueError) as err:
        datamodule(caption_shards).setup()
    assert "captions but no text embeddings" in one_line(err) and "shards text-embeddings" in one_line(err)
    wrong = datamodule(embedded)
    wrong.text_channels = 64
    with pytest.raises(ValueError) as err:
        wrong.setup()
    assert f"set data.text_len={TEXT_LEN} and data.text_channels={TEXT_WIDTH}" in one_line(err)


def test_missing_text_embeddings_are_the_models_error():
    torch.manual_seed(0)
    model = flexify(TextDiT(input_size=SIZE, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                                 caption_channels=TEXT_WIDTH, text_len=TEXT_LEN), patch_sizes=(2, 4), lora_rank=4)
    module = DistillModule(model=model, diffusion=create_diffusion(), optimizer=None)
    with pytest.raises(ValueError) as err:
        module.compute_losses({"x": torch.randn(2, 3, SIZE, SIZE), "key": ["a", "b"]}, 4)
    assert f"needs text embeddings (N=2, L={TEXT_LEN}, D_text={TEXT_WIDTH})" in one_line(err)


@pytest.mark.parametrize("config,data", [
    ("video_dit_s_2", {"num_frames": 4, "input_size": SIZE, "in_channels": 4, "num_classes": 3}),
    ("text_dit_xl_2", {"input_size": SIZE, "in_channels": 4, "text_len": TEXT_LEN, "text_channels": TEXT_WIDTH}),
])
def test_model_configs_build_the_presets_from_the_data_shapes(config, data):
    node = OmegaConf.merge({"data": data}, {"model": OmegaConf.load(Path(flexdit_train.CONF_DIR) / "model" / f"{config}.yaml")})
    with torch.device("meta"):
        model = instantiate(node.model)
    assert isinstance(model, VideoDiT if config.startswith("video") else TextDiT)
    assert model.input_size == ((4, SIZE, SIZE) if config.startswith("video") else (SIZE, SIZE))
    assert model.config["depth"] == (12 if config.startswith("video") else 28)  # VDiT-S/2, TextDiT-XL/2


def test_text_guidance_uses_the_null_caption_or_the_weak_conditional_branch():
    base = randomized(TextDiT(input_size=SIZE, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                              caption_channels=TEXT_WIDTH, text_len=TEXT_LEN))
    model = randomized(flexify(base, lora_rank=4)).eval()  # then random adapters too
    tmap = create_diffusion("2").timestep_map.tolist()
    x, emb = torch.randn(2, 4, SIZE, SIZE), torch.randn(2, TEXT_LEN, TEXT_WIDTH)
    mask = torch.ones(2, TEXT_LEN, dtype=torch.bool)
    mask[1, 5:] = False
    null_emb, null_mask = model.null_text(2)
    for guidance in ("standard", "weak_conditional"):
        den = ScheduledDenoiser(model, tmap, [4, 2], [4, 4], cfg_scale=3.0, guidance=guidance, guide_all_channels=True)
        with torch.no_grad():
            for k, (p_cond, p_guide) in enumerate([(4, 4), (2, 4)]):
                t = torch.full((2,), tmap[1 - k])
                out = den(x, t, text_emb=emb, text_mask=mask)
                cond = model(x, t, emb, mask, patch_size=p_cond)
                if p_cond == p_guide or guidance == "standard":
                    guide, scale = model(x, t, null_emb, null_mask, patch_size=p_guide), 3.0
                else:
                    guide, scale = model(x, t, emb, mask, patch_size=p_guide), den.weak_scale
                assert torch.allclose(out[:, :4], guide[:, :4] + scale * (cond[:, :4] - guide[:, :4]), atol=1e-5)


# ----------------------------------------------------------------------------- video budgets
def test_video_budget_presets_solve_with_the_video_flops_model():
    model = VideoDiT(input_size=(16, 32, 32), in_channels=4, hidden_size=64, depth=2, num_heads=2)
    cost = cost_model(model)
    available = [NATIVE, TEMPORAL, SPATIAL]
    for stem, weak in (("temporal_75", TEMPORAL), ("spatial_75", SPATIAL)):
        node = OmegaConf.load(Path(flexdit_train.CONF_DIR) / "budget" / "video" / f"{stem}.yaml")
        schedule = build_schedule(node, 50, NATIVE, None, cost, available_patch_sizes=available)
        assert schedule.patch_sizes == tuple(sorted({NATIVE, weak}))
        assert schedule.cond_patch_sizes[0] == weak and schedule.cond_patch_sizes[-1] == NATIVE  # weak first
        n_weak = schedule.nfe()["cond"][weak]
        by_hand = (50 - n_weak + n_weak * cost(weak) / cost(NATIVE)) / 50
        assert schedule.compute_fraction(cost) == pytest.approx(by_hand, rel=1e-12)
        assert 0.75 <= schedule.compute_fraction(cost) < 0.75 + (1 - cost(weak) / cost(NATIVE)) / 50
        assert BudgetSchedule.from_dict(json.loads(json.dumps(schedule.to_dict()))) == schedule
        assert f"native p(1x2x2); cond p({'x'.join(map(str, weak))})x{n_weak}" in schedule.describe()
    with pytest.raises(ValueError) as err:
        build_schedule({"mode": "target", "compute_fraction": 0.8, "weak_patch": [1, 8, 8]}, 10, NATIVE, None, cost,
                       available_patch_sizes=available)
    assert "uses patch size (1, 8, 8)" in one_line(err)


def test_a_frame_count_the_temporal_patch_does_not_divide_fails_from_the_run_config(video_shards, root, tmp_path):
    checkpoint = video_checkpoint(root / "video3.safetensors", frames=3)
    cfg = compose_train(video_overrides(video_shards, checkpoint, frames=3), tmp_path)
    with pytest.raises(ValueError) as err:
        build_module(cfg)
    assert "temporal patch 2 does not divide the frame count 3" in one_line(err)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_video_flex_trains_and_samples_mp4s_and_frame_grids(video_shards, root, tmp_path):
    checkpoint = video_checkpoint(root / "video.safetensors", frames=FRAMES)
    run(compose_train(video_overrides(video_shards, checkpoint), tmp_path / "train"))
    final = tmp_path / "train" / "checkpoints" / "final.ckpt"
    model = from_pretrained(final)
    assert model.patch_sizes == (NATIVE, SPATIAL, TEMPORAL) and model.flex_config["mode"] == "lora"
    grids = sorted(p.name for p in (tmp_path / "train" / "samples").glob("*_final.png"))
    assert grids == ["static_final.png", "video_spatial_75_final.png", "video_temporal_75_final.png"]
    with Image.open(tmp_path / "train" / "samples" / "static_final.png") as grid:
        assert grid.width > grid.height  # one row of 4 frames per video, 2 videos

    for stem, weak in (("temporal_75", TEMPORAL), ("spatial_75", SPATIAL)):
        out = tmp_path / stem
        card = sample_app([f"checkpoint={final}", f"budget=video/{stem}"], out)
        label = "x".join(map(str, weak))
        assert card["arch"] == "video_dit" and set(card["nfe"]["cond"]) == {"1x2x2", label}
        # merged LoRA: the fraction is the plain video FLOPs model's, from the card's NFEs
        macs = {"1x2x2": cost_model(model)(NATIVE), label: cost_model(model)(weak)}
        total = sum(n * macs[p] for branch in card["nfe"].values() for p, n in branch.items())
        assert card["compute_fraction"] == pytest.approx(total / (2 * 4 * macs["1x2x2"]), rel=1e-12)
        assert card["compute_fraction"] >= 0.75 and card["schedule"]["name"] == f"video_{stem}"
        videos = sorted((out / "videos").glob("*.mp4"))
        assert [p.name for p in videos] == ["sample_000000.mp4", "sample_000001.mp4"]
        data = videos[0].read_bytes()
        assert video_info(data)[:3] == (FRAMES, SIZE, SIZE) and read_frames(data, [0, 3]).shape == (2, SIZE, SIZE, 3)
        assert np.load(out / "samples.npz")["arr_0"].shape == (2, FRAMES, SIZE, SIZE, 3)
        with Image.open(out / "grid.png") as grid:
            assert grid.size == (2 + FRAMES * (SIZE + 2), 2 + 2 * (SIZE + 2))  # rows of frames, 2 px padding


@pytest.mark.slow
def test_t2i_flex_distils_lora_and_samples_from_prompts(embedded, tiny_encoder, root, tmp_path):
    base = randomized(TextDiT(input_size=SIZE, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                              caption_channels=TEXT_WIDTH, text_len=TEXT_LEN))
    checkpoint = export_safetensors(base, root / "text.safetensors")
    cfg = compose_train(t2i_overrides(embedded, checkpoint), tmp_path / "train")
    assert cfg.objective.optimizer.lr == 8e-4 and cfg.objective.weight_decay == 0.01
    assert cfg.trainer.gradient_clip_val == 0.02 and cfg.flex.mode == "lora"
    run(cfg)
    final = tmp_path / "train" / "checkpoints" / "final.ckpt"
    trained = torch.load(final, map_location="cpu", weights_only=True)["state_dict"]
    frozen = base.state_dict()
    for key in ("blocks.0.cross_attn.q_linear.weight", "blocks.0.attn.qkv.weight", "y_embedder.y_embedding"):
        assert torch.equal(trained[f"model.{key}"], frozen[key]), key  # the pretrained network stays frozen
    assert not any("cross_attn" in k and ".lora." in k for k in trained)  # no adapters on cross-attention
    assert trained["model.blocks.0.attn.qkv.lora.p4.B"].abs().max() > 0  # the weak path's adapters learnt
    assert (tmp_path / "train" / "samples" / "target_72_final.png").is_file()

    out = tmp_path / "sample"
    card = sample_app([f"checkpoint={final}", "budget=target", "budget.compute_fraction=0.5",
                       f"prompts=[{CAPTIONS[0]!r},{CAPTIONS[1]!r}]", f"text_encoder={tiny_encoder}"], out)
    assert card["arch"] == "text_dit" and card["prompts"] == CAPTIONS[:2]
    cost = cost_model(from_pretrained(final))
    n_weak = card["nfe"]["cond"]["4"]
    assert card["compute_fraction"] == pytest.approx((4 - n_weak + n_weak * cost(4) / cost(2)) / 4, rel=1e-12)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 + SIZE + 2, 2 + 2 * (SIZE + 2))  # two images: one column
    assert "arr_1" not in np.load(out / "samples.npz")  # no class labels for a text model
