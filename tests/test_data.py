"""Data: shard writers round-trip into their readers, verify, skip counting, DDP splitting and resume."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing as mp
import pickle
import shutil
import tarfile
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import hydra
import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from PIL import Image

from flexdit_train.data import (
    DataSkipMonitor,
    ImageWdsDataModule,
    LatentsWdsDataModule,
    MNISTDataModule,
    SyntheticDataModule,
    VideoWdsDataModule,
    adm_center_crop,
    ensure_mnist_shards,
    verify_shards,
)
from flexdit_train.data.media import decode_image
from flexdit_train.data.vae import TINY_VAE_CONFIG, encode_moments, load_vae
from flexdit_train.runtime.errors import UserError
from flexdit_train.shards import main as shards_main

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"
CLASSES = ("cat", "dog", "fox")


# ---------------------------------------------------------------- fixtures: data the tests create


def make_image_tree(root: Path, per_class: int = 8) -> Path:
    """Class folders of random JPEG and PNG images of assorted sizes."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            height, width = (int(v) for v in rng.integers(36, 90, 2))
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            if i % 2:
                image.save(root / name / f"img{i}.png")
            else:
                image.save(root / name / f"img{i}.JPEG", format="JPEG")
    return root


def make_video(path: Path, frames: int, shift: int) -> None:
    """A moving gradient written with PyAV (mpeg4)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(12))
        stream.width, stream.height, stream.pix_fmt = 40, 32, "yuv420p"
        for t in range(frames):
            array = np.zeros((32, 40, 3), np.uint8)
            array[..., 0] = (np.arange(40) * 6 + 10 * t + shift) % 256
            array[..., 1] = shift
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def images(data_root) -> Path:
    """Train shards from a class-per-folder tree, val shards from a CSV list of the same files."""
    tree = make_image_tree(data_root / "tree")
    out = data_root / "images"
    assert shards_main(["imagefolder", str(tree), str(out), "--maxcount", "4"]) == 0
    files = sorted(tree.rglob("*.*"))
    with (data_root / "val.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows([[str(p.relative_to(data_root)), p.parent.name] for p in files[:12]])
    argv = ["imagefolder", str(data_root / "val.csv"), str(out), "--prefix", "val", "--maxcount", "3"]
    assert shards_main([*argv, "--classes", str(out / "train.json")]) == 0
    return out


@pytest.fixture(scope="module")
def mnist_cache(data_root) -> Path:
    """The MNIST shards written by the CLI where MNISTDataModule(cache_dir=...) looks for them."""
    assert shards_main(["mnist", str(data_root / "cache" / "mnist-v1")]) == 0
    return data_root / "cache"


@pytest.fixture(scope="module")
def tiny_vae(data_root) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    path = data_root / "tiny-vae"
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(path)
    return path


def image_module(images: Path, **overrides) -> ImageWdsDataModule:
    args = dict(train_shards=str(images / "train.json"), val_shards=str(images / "val.json"), global_batch_size=4,
                num_workers=0, seed=0, input_size=32, in_channels=3, num_classes=3, image_size=32, steps_per_epoch=5)
    return ImageWdsDataModule(**{**args, **overrides})


def fake_trainer(rank: int, world: int, step: int = 0) -> SimpleNamespace:
    """What the DataModule reads from a Lightning trainer, for rank logic without processes."""
    return SimpleNamespace(global_rank=rank, world_size=world, global_step=step, accumulate_grad_batches=1, training=True)


def keys_of(loader) -> list[list[str]]:
    return [list(batch["key"]) for batch in loader]


# ---------------------------------------------------------------- writers -> readers


def test_adm_center_crop_box_then_bicubic():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (700, 1100, 3), dtype=np.uint8))
    half = image.resize((550, 350), Image.Resampling.BOX)  # 700 >= 2 * 256: one halving
    expected = half.resize((402, 256), Image.Resampling.BICUBIC).crop((73, 0, 329, 256))
    assert np.array_equal(np.asarray(adm_center_crop(image, 256)), np.asarray(expected))


def test_imagefolder_round_trip(images, data_root):
    index = json.loads((images / "train.json").read_text())
    assert index["total"] == 24 and index["classes"] == list(CLASSES) and len(index["shards"]) == 6
    assert verify_shards(str(images / "train.json")).ok
    # original bytes survive: each sample's payload equals its source file
    with tarfile.open(images / index["shards"][0]["url"]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    key = sorted(members)[0].split(".")[0]
    meta = json.loads(members[f"{key}.json"])
    payload = next(v for n, v in members.items() if n.startswith(key) and n.split(".", 1)[1] in ("jpg", "png"))
    assert payload == (data_root / "tree" / meta["path"]).read_bytes()
    assert int(members[f"{key}.cls"]) == CLASSES.index(Path(meta["path"]).parent.name)

    dm = image_module(images)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 3, 32, 32) and batch["x"].dtype == torch.float32
    assert -1.0 <= batch["x"].min() and batch["x"].max() <= 1.0 and batch["y"].dtype == torch.int64
    # the fixed val set (from a CSV list) is read whole, in order, without flips
    val = [b for b in dm.val_dataloader()]
    assert len(val) == 3 and sum(len(b["key"]) for b in val) == 12
    first = decode_image((data_root / "tree" / "cat" / "img0.JPEG").read_bytes(), 32)
    assert first.shape == (32, 32, 3)


def test_video_round_trip(data_root):
    src = data_root / "videos"
    src.mkdir()
    rows = [["path", "label", "caption"]]
    for i, (frames, label) in enumerate([(12, "run"), (16, "jump"), (9, "run")]):
        make_video(src / f"v{i}.mp4", frames, shift=40 * i)
        rows.append([f"v{i}.mp4", label, f"clip number {i}"])
    with (src / "list.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    out = data_root / "video-shards"
    assert shards_main(["video", str(src / "list.csv"), str(out), "--frame-stride", "2", "--size", "16", "--maxcount", "1"]) == 0
    index = json.loads((out / "train.json").read_text())
    assert index["total"] == 3 and index["classes"] == ["jump", "run"]
    assert verify_shards(str(out / "train.json")).ok
    # without subsampling or resizing the mp4 bytes are copied as they are
    assert shards_main(["video", str(src / "list.csv"), str(out), "--prefix", "copy"]) == 0
    with tarfile.open(out / "copy-000000.tar") as tar:
        payloads = {tar.extractfile(m).read() for m in tar if m.name.endswith(".mp4")}
    assert payloads == {(src / f"v{i}.mp4").read_bytes() for i in range(3)}

    dm = VideoWdsDataModule(train_shards=str(out / "train.json"), val_shards=str(out / "train.json"), global_batch_size=3,
                            num_workers=0, seed=0, input_size=16, in_channels=3, num_classes=2, num_frames=4,
                            frame_stride=1, image_size=16, steps_per_epoch=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (3, 3, 4, 16, 16) and batch["y"].dtype == torch.int64
    val = next(iter(dm.val_dataloader()))
    assert sorted(val["caption"]) == ["clip number 0", "clip number 1", "clip number 2"]
    # frame subsampling: stride 2 kept frames 0, 2, 4, ... whose red ramp starts at 20 t + shift
    v0 = val["key"].index(next(k for k, c in zip(val["key"], val["caption"]) if c == "clip number 0"))
    red = (val["x"][v0, 0, :, :, 0].mean(-1) + 1) * 127.5  # (F,) left column mean
    assert torch.all(red[1:] > red[:-1])


def test_latents_round_trip(images, tiny_vae, data_root, capsys):
    out = data_root / "latents"
    argv = ["latents", str(images / "train.json"), str(out), "--vae", str(tiny_vae), "--image-size", "32", "--batch-size", "5"]
    assert shards_main(argv) == 0
    captured = capsys.readouterr()
    assert "latent std after scaling" in captured.out and "far from 1" in captured.err  # random VAE: std is off
    index = json.loads((out / "train.json").read_text())
    assert index["latent_shape"] == [4, 4, 4] and index["total"] == 24 and index["scale_factor"] == 0.18215
    assert verify_shards(str(out / "train.json")).ok
    assert shards_main(argv) == 0 and "encoding 0 of 6 shards" in capsys.readouterr().out  # resumable

    dm = LatentsWdsDataModule(train_shards=str(out / "train.json"), val_shards=str(out / "train.json"), global_batch_size=6,
                              num_workers=0, seed=0, input_size=4, in_channels=4, num_classes=3, steps_per_epoch=3)
    dm.setup("fit")
    val = next(iter(dm.val_dataloader()))
    train = next(iter(dm.train_dataloader()))
    assert val["x"].shape == train["x"].shape == (6, 4, 4, 4)
    # evaluation = scaled posterior mean of the unflipped image, as the VAE gives it (fp16 storage)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    tree = {p.relative_to(data_root / "tree").as_posix(): p for p in (data_root / "tree").rglob("*.*")}
    sources = {}
    for shard in json.loads((images / "train.json").read_text())["shards"]:
        with tarfile.open(images / shard["url"]) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    sources[m.name.split(".")[0]] = tree[json.loads(tar.extractfile(m).read())["path"]]
    pixels = np.stack([decode_image(sources[k].read_bytes(), 32).transpose(2, 0, 1) for k in val["key"]])
    mean, _ = encode_moments(vae, torch.from_numpy(pixels).float() / 127.5 - 1)
    torch.testing.assert_close(val["x"], mean * 0.18215, atol=2e-3, rtol=2e-3)

    with pytest.raises(ValueError, match="set data.in_channels=4 and data.input_size=4"):
        LatentsWdsDataModule(train_shards=str(out / "train.json"), global_batch_size=6, num_workers=0, seed=0,
                             input_size=32, in_channels=4, num_classes=3).setup("fit")


def test_on_the_fly_vae_for_images_and_video(images, tiny_vae, data_root):
    dm = image_module(images, vae=str(tiny_vae), input_size=4, in_channels=4)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert batch["x"].shape == (4, 4, 4, 4)  # (N, C, h, w) latents
    again = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert not torch.equal(batch["x"], again["x"])  # no trainer: posterior samples from a running position
    with pytest.raises(ValueError, match=r"set data.input_size=\[4, 4\] and data.in_channels=4"):
        image_module(images, vae=str(tiny_vae)).setup("fit")

    clip = {"x": torch.rand(2, 3, 5, 16, 16) * 2 - 1, "y": torch.zeros(2, dtype=torch.int64)}
    video = VideoWdsDataModule(train_shards=None, global_batch_size=2, num_workers=0, seed=0, input_size=2, in_channels=4,
                               num_classes=1, image_size=16, num_frames=5, vae=str(tiny_vae))
    video.setup("fit")
    assert video.on_after_batch_transfer(clip, 0)["x"].shape == (2, 4, 5, 2, 2)  # (N, C, F, h, w)


def test_load_vae_routes(tiny_vae, tmp_path):
    from safetensors.torch import save_file

    reference = load_vae(str(tiny_vae))
    save_file(reference.state_dict(), tmp_path / "vae.safetensors")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_VAE_CONFIG))
    from_weights = load_vae(str(tmp_path / "vae.safetensors"), str(tmp_path / "tiny.json"))
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), from_weights.state_dict().values()))
    with pytest.warns(UserWarning, match="random weights"):
        assert load_vae(str(tmp_path / "tiny.json")).config.latent_channels == 4
    with pytest.raises(ValueError, match="does not match the VAE config"):
        load_vae(str(tmp_path / "vae.safetensors"))  # the default SD-VAE architecture
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_vae("stabilityai/sd-vae-ft-ema")


@pytest.mark.slow
def test_latents_multiprocess_matches_single(images, tiny_vae, data_root):
    single, multi = data_root / "lat1", data_root / "lat2"
    for out, workers in ((single, "1"), (multi, "2")):
        assert shards_main(["latents", str(images / "train.json"), str(out), "--vae", str(tiny_vae), "--image-size", "32",
                            "--workers", workers]) == 0
    for shard in json.loads((single / "train.json").read_text())["shards"]:
        assert (single / shard["url"]).read_bytes() == (multi / shard["url"]).read_bytes()


def test_mnist_cli_shards_feed_the_module(mnist_cache):
    stamp = (mnist_cache / "mnist-v1" / "train.json").stat().st_mtime_ns
    dm = MNISTDataModule(global_batch_size=50, num_workers=0, seed=0, cache_dir=str(mnist_cache), steps_per_epoch=2)
    dm.setup("fit")
    assert (mnist_cache / "mnist-v1" / "train.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (50, 1, 32, 32) and set(batch["y"].tolist()) <= set(range(10))
    assert dm.num_val_batches == 10 and len(dm.train_set.urls) == 60


def _ensure(root: str) -> str:
    return str(ensure_mnist_shards(root))


def test_mnist_first_use_is_race_safe(tmp_path):
    root = tmp_path / "cache" / "mnist-v1"
    with mp.get_context("fork").Pool(2) as pool:
        assert pool.map(_ensure, [str(root)] * 2) == [str(root)] * 2
    assert verify_shards(str(root / "train.json")).ok and verify_shards(str(root / "val.json")).ok
    assert sorted(p.name for p in root.parent.iterdir()) == ["mnist-v1"]  # the loser's copy is gone


# ---------------------------------------------------------------- verify


def test_verify_flags_damage_and_passes_good_sets(images, tmp_path, capsys):
    good = tmp_path / "good"
    shutil.copytree(images, good)
    assert shards_main(["verify", str(good / "train.json")]) == 0
    assert "24 samples: OK" in capsys.readouterr().out

    truncated = tmp_path / "truncated"
    shutil.copytree(images, truncated)
    shard = truncated / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert shards_main(["verify", str(truncated / "train.json"), "--json", str(tmp_path / "r.json")]) == 1
    assert "train-000002.tar: truncated" in capsys.readouterr().out
    assert not json.loads((tmp_path / "r.json").read_text())["ok"]

    duplicated = tmp_path / "dup"
    shutil.copytree(images, duplicated)
    shutil.copy(duplicated / "train-000000.tar", duplicated / "train-000009.tar")
    assert shards_main(["verify", str(duplicated / "train-*.tar")]) == 1
    assert "duplicate key" in capsys.readouterr().out

    split = tmp_path / "split.tar"
    with tarfile.open(split, "w") as tar:
        for name in ("a.cls", "b.cls", "a.png"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    assert shards_main(["verify", str(split)]) == 1
    assert "split keys" in capsys.readouterr().out


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["mnist", "imagenet_wds", "latents_wds", "video_wds", "synthetic"])
def test_configs_instantiate(name, tmp_path):
    cfg = OmegaConf.merge(
        {"seed": 3, "paths": {"data_dir": str(tmp_path)}},
        {"data": OmegaConf.load(CONF_DIR / f"{name}.yaml")},
    )
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.seed == 3 and dm.global_batch_size == cfg.data.global_batch_size
    assert dm.input_size == (cfg.data.input_size,) * 2 and dm.num_classes == cfg.data.num_classes


# ---------------------------------------------------------------- distribution, determinism, skips


def test_global_batch_must_divide_by_world():
    dm = SyntheticDataModule(global_batch_size=10, num_workers=0, seed=0, input_size=8, in_channels=1, num_classes=2)
    dm.trainer = fake_trainer(0, 4)
    with pytest.raises(ValueError, match="set it to a multiple of 4"):
        dm.setup("fit")


def test_val_preflight_names_the_fix(images):
    dm = image_module(images, global_batch_size=2, num_workers=3)
    dm.trainer = fake_trainer(0, 2)
    with pytest.raises(ValueError, match=r"val set has 4 shards but 2 ranks x 3 workers need 6.*num_workers=2"):
        dm.setup("fit")


def test_ranks_are_disjoint_with_equal_batch_counts(mnist_cache):
    seen = {}
    for rank in range(2):
        dm = MNISTDataModule(global_batch_size=32, num_workers=2, seed=0, cache_dir=str(mnist_cache), steps_per_epoch=6)
        dm.trainer = fake_trainer(rank, 2)
        dm.setup("fit")
        seen[rank] = (keys_of(dm.train_dataloader()), keys_of(dm.val_dataloader()))
    (train0, val0), (train1, val1) = seen[0], seen[1]
    assert len(train0) == len(train1) == 6 and len(val0) == len(val1) == 15
    pickle.loads(pickle.dumps(dm))  # ddp_spawn pickles the DataModule
    pickle.loads(pickle.dumps(dm.train_dataloader().stream))  # spawn-started workers unpickle the stream
    assert not {k for b in train0 for k in b} & {k for b in train1 for k in b}
    assert not {k for b in val0 for k in b} & {k for b in val1 for k in b}
    assert all(len(b) == 16 for b in train0 + val0 + train1 + val1)


def test_stream_is_a_function_of_seed_and_position(mnist_cache):
    def run(seed: int, start: int, workers: int = 2) -> list[list[str]]:
        """Batches of two epochs from ``start``; the second starts at the next multiple of 4."""
        dm = MNISTDataModule(global_batch_size=8, num_workers=workers, seed=seed, cache_dir=str(mnist_cache),
                             steps_per_epoch=4, shuffle_buffer=64)
        dm.setup("fit")
        dm.set_resume_step(start)
        loader = dm.train_dataloader()
        return keys_of(loader) + keys_of(loader)

    base = run(0, 0) + run(0, 8)  # steps 0..15
    assert len(base) == 16 and run(0, 0) == base[:8]
    assert run(0, 4) == base[4:12]  # a restart at an epoch boundary = the uninterrupted batches
    for start in (5, 6, 7):  # mid-epoch: the epoch's stream, fast-forwarded, whichever worker is next
        assert run(0, start) == base[start : start + 8 - start % 4]
    assert run(0, 3, workers=3) == (run(0, 0, workers=3) + run(0, 4, workers=3))[3:8]
    assert run(0, 2, workers=0) == run(0, 0, workers=0)[2:8]
    assert run(1, 0) != base[:8] and run(0, 0, workers=0) != base[:8]  # other seed, other worker layout


def test_synthetic_is_deterministic():
    def batches(seed: int, step: int = 0) -> list[dict]:
        dm = SyntheticDataModule(global_batch_size=4, num_workers=0, seed=seed, input_size=[8, 6], in_channels=2,
                                 num_classes=5, num_frames=3, steps_per_epoch=3, val_batches=2)
        dm.setup("fit")
        dm.set_resume_step(step)
        return [*dm.train_dataloader(), *dm.val_dataloader()]

    a, b = batches(0), batches(0)
    assert a[0]["x"].shape == (4, 2, 3, 8, 6) and len(a) == 5
    assert all(torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"]) for x, y in zip(a, b))
    assert not torch.equal(batches(1)[0]["x"], a[0]["x"])
    restarted = batches(0, step=1)
    assert len(restarted) == 4 and torch.equal(restarted[0]["x"], batches(0, step=1)[0]["x"])
    assert torch.equal(restarted[-1]["x"], a[-1]["x"])  # the fixed val set does not depend on the step


def damaged_copy(images: Path, tmp_path: Path) -> Path:
    """The image set with one shard truncated and one sample replaced by undecodable bytes."""
    out = tmp_path / "damaged"
    shutil.copytree(images, out)
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 2 // 3])
    with tarfile.open(out / "train-000003.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    image = next(m.name for m, _ in members if m.name.endswith((".jpg", ".png")))
    with tarfile.open(out / "train-000003.tar", "w") as tar:
        for member, data in members:
            if member.name == image:
                data = b"not an image"
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return out


def test_damaged_shards_are_skipped_and_counted(images, tmp_path):
    damaged = damaged_copy(images, tmp_path)
    dm = image_module(damaged, num_workers=2, steps_per_epoch=30, val_shards=None)
    dm.setup("fit")
    assert len(keys_of(dm.train_dataloader())) == 30  # training went on
    stats = dm.skip_stats()
    assert stats["skipped"] > 0 and 0 < stats["skip_rate"] < 1
    assert {Path(u).name for u in stats["per_shard"]} == {"train-000001.tar", "train-000003.tar"}


class Recorder(LightningModule):
    """Records the keys of every batch with the step it was trained at; ``out`` gets them per rank."""

    def __init__(self, out: str | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out = out
        self.train_keys: list = []
        self.val_keys: list = []

    def training_step(self, batch, batch_idx):
        self.train_keys.append([self.global_step, list(batch["key"])])
        return (self.weight * batch["x"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.val_keys.append(list(batch["key"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_fit_end(self):
        if self.out:
            Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps([self.train_keys, self.val_keys]))


def trainer(max_steps: int, **kwargs) -> Trainer:
    args = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False)
    return Trainer(**{**args, **kwargs})


def test_skip_monitor_logs_and_stops(images, tmp_path):
    damaged = damaged_copy(images, tmp_path)
    module = Recorder()
    monitor = DataSkipMonitor(every_n_steps=4, max_skip_rate=0.5, min_samples=1)
    fit = trainer(12, callbacks=[monitor], log_every_n_steps=1, limit_val_batches=None)  # no val set: [] loader
    fit.fit(module, datamodule=image_module(damaged, num_workers=2, steps_per_epoch=6, val_shards=None))
    assert fit.logged_metrics["data/skipped"] > 0 and 0 < fit.logged_metrics["data/skip_rate"] < 0.5
    strict = trainer(12, callbacks=[DataSkipMonitor(every_n_steps=4, max_skip_rate=0.0, min_samples=1)])
    with pytest.raises(UserError, match=r"lost .*above max_skip_rate=0.0%.*train-00000[13].tar"):
        strict.fit(Recorder(), datamodule=image_module(damaged, num_workers=2, steps_per_epoch=6, val_shards=None))


@pytest.mark.slow
def test_lightning_resume_reproduces_the_uninterrupted_batches(mnist_cache, tmp_path):
    def datamodule():
        return MNISTDataModule(global_batch_size=8, num_workers=2, seed=0, cache_dir=str(mnist_cache), steps_per_epoch=4,
                               shuffle_buffer=64)

    full = Recorder()
    trainer(12).fit(full, datamodule=datamodule())
    steps = {step: keys for step, keys in full.train_keys}
    assert sorted(steps) == list(range(12))

    def resumed(stop: int) -> dict:
        ckpt = ModelCheckpoint(dirpath=tmp_path / f"ckpt{stop}", every_n_train_steps=stop, save_top_k=-1)
        trainer(stop, callbacks=[ckpt], enable_checkpointing=True).fit(Recorder(), datamodule=datamodule())
        (path,) = (tmp_path / f"ckpt{stop}").glob("*.ckpt")
        runs = []
        for _ in range(2):
            module = Recorder()
            trainer(12).fit(module, datamodule=datamodule(), ckpt_path=str(path))
            runs.append({step: keys for step, keys in module.train_keys})
        assert runs[0] == runs[1]
        return runs[0]

    at_boundary = resumed(4)
    assert sorted(at_boundary) == list(range(4, 12))
    assert all(at_boundary[s] == steps[s] for s in range(4, 12))
    for stop in (5, 6, 7):  # mid-epoch, each of the two workers next in turn
        mid_epoch = resumed(stop)
        assert sorted(mid_epoch) == list(range(stop, 12))
        assert all(mid_epoch[s] == steps[s] for s in range(stop, 12))  # exactly the uninterrupted batches


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ddp_two_processes(mnist_cache, tmp_path):
    dm = MNISTDataModule(global_batch_size=32, num_workers=2, seed=0, cache_dir=str(mnist_cache), steps_per_epoch=5)
    # fork, not spawn: spawned children re-import torch and Lightning (~30 s on 2 cores); the DataModule and
    # its streams are checked to pickle in test_ranks_are_disjoint_with_equal_batch_counts
    fit = trainer(5, devices=2, strategy="ddp_fork", limit_val_batches=None, callbacks=[DataSkipMonitor(every_n_steps=2)])
    fit.fit(Recorder(str(tmp_path)), datamodule=dm)
    (train0, val0), (train1, val1) = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert len(train0) == len(train1) == 5 and len(val0) == len(val1) == 15
    keys = [{k for _, batch in train for k in batch} for train in (train0, train1)]
    assert not keys[0] & keys[1]
    assert not {k for b in val0 for k in b} & {k for b in val1 for k in b}
