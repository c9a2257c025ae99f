"""Evaluation: Fréchet distance numerics, feature extractors, references, cards, tables, the app and the FID proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import flexdit_train
from flexdit_train.evaluation import (
    CARD_KEYS,
    INCEPTION,
    INCEPTION_WEIGHTS_FILE,
    Extractor,
    RunningStats,
    compute_metrics,
    extract_features,
    feature_statistics,
    fid_label,
    frechet_distance,
    load_reference,
    record_result,
    resolve_inception_weights,
)
from flexdit_train.evaluation.mnist_classifier import (
    CLASSIFIER_VERSION,
    MNIST_EXTRACTOR,
    MnistCNN,
    accuracy,
    classifier_path,
    ensure_classifier,
    load_classifier,
    register_mnist_extractor,
    split_images,
)
from flexdit_train.evaluation.report import log_to_wandb, read_table, seed_statistics, table_row
from flexdit_train.sampling.schedule import BudgetSchedule

CONF_DIR = str(Path(flexdit_train.__file__).parent / "conf")
CPU = torch.device("cpu")
FIDELITY = {"isc_splits": 10, "kid_subsets": 20, "kid_subset_size": 1000, "prc_neighborhood": 3,
            "prc_batch_size": 10000, "save_cpu_ram": False, "samples_shuffle": True, "rng_seed": 2020}


# ---------------------------------------------------------------- fixtures: everything is created here


@pytest.fixture(scope="session")
def random_classifier_cache(tmp_path_factory) -> Path:
    """A cache dir holding an untrained (seeded) MNIST classifier: a fixed feature space in milliseconds."""
    cache = tmp_path_factory.mktemp("eval-cache-random")
    torch.manual_seed(0)
    path = classifier_path(cache)
    path.parent.mkdir(parents=True)
    torch.save({"version": CLASSIFIER_VERSION, "val_accuracy": 0.0, "state_dict": MnistCNN().state_dict()}, path)
    return cache


@pytest.fixture(scope="session")
def trained_classifier_cache(tmp_path_factory) -> Path:
    """A cache dir with the real classifier, trained once per session (~15-25 s on one core)."""
    cache = tmp_path_factory.mktemp("eval-cache-trained")
    ensure_classifier(cache)
    return cache


@pytest.fixture()
def mnist_extractor(random_classifier_cache) -> Extractor:
    register_mnist_extractor()
    return Extractor(MNIST_EXTRACTOR, classifier_path(random_classifier_cache))


def val_digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = split_images("val")
    return torch.from_numpy(images), torch.from_numpy(labels)  # uint8 (500, 32, 32, 1), int64 (500,)


def faded(images: torch.Tensor, amount: float) -> torch.Tensor:
    """Blend uint8 images toward mid-gray by ``amount`` in [0, 1]."""
    return ((1 - amount) * images.float() + amount * 128.0).round().to(torch.uint8)


def app_config(tmp_path: Path, overrides: list[str]):
    """The evaluate app's config as Hydra would run it, with the run directory under ``tmp_path``."""
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("evaluate", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.cwd = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    return cfg


def scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------- Fréchet distance and labels


def test_frechet_distance_matches_a_direct_scipy_sqrtm_computation():
    rng = np.random.default_rng(0)
    for dim, n in ((8, 50), (64, 400), (64, 40)):  # the last set is rank-deficient (n < dim)
        a = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
        b = 0.5 + rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.8
        mu1, s1 = feature_statistics(a)
        mu2, s2 = feature_statistics(b)
        ours, ref = frechet_distance(mu1, s1, mu2, s2), scipy_frechet(mu1, s1, mu2, s2)
        assert abs(ours - ref) <= 1e-6 * max(1.0, abs(ref)), (dim, n, ours, ref)


def test_running_stats_match_numpy_in_float64():
    x = np.random.default_rng(1).normal(loc=1e3, size=(300, 16)).astype(np.float32)  # large mean on purpose
    stats = RunningStats()
    for chunk in np.array_split(x, 7):
        stats.update(torch.from_numpy(chunk))
    mu, sigma = stats.statistics()
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2 images"):
        RunningStats().statistics()


def test_fid_label_names_the_sample_count():
    assert fid_label(50000) == "fid50k"
    assert [fid_label(n) for n in (10000, 5000, 2500, 49999, 640, 24)] == [
        "fid10k", "fid5k", "fid2.5k", "fid49999", "fid640", "fid24"]


# ---------------------------------------------------------------- feature spaces through torch-fidelity


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(mnist_extractor, random_classifier_cache):
    images, _ = val_digits()
    reference = load_reference("mnist:val", mnist_extractor, cache_dir=random_classifier_cache, image_size=32,
                               channels=1, device=CPU)
    scale = np.trace(reference.sigma)
    fids = []
    for amount in (0.0, 0.15, 0.3, 0.5):
        features = extract_features(mnist_extractor, faded(images, amount), CPU, batch_size=128)
        values, _, _ = compute_metrics(features, reference, ["fid"], mnist_extractor, labels=None,
                                       fidelity=FIDELITY, device=CPU)
        fids.append(values["fid500"])
    assert abs(fids[0]) < 1e-6 * scale, fids  # the same 500 digits
    assert fids[1] < fids[2] < fids[3], fids


def test_mnist_extractor_is_registered_with_torch_fidelity_and_agrees_with_its_fid(mnist_extractor):
    import torch_fidelity
    from torch.utils.data import Dataset

    images, _ = val_digits()

    class Digits(Dataset):
        def __init__(self, x):
            self.x = x.permute(0, 3, 1, 2)  # uint8 (N, 1, 32, 32)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    fake = faded(images[:250], 0.3)
    out = torch_fidelity.calculate_metrics(
        input1=Digits(fake), input2=Digits(images[250:]), fid=True, isc=True, feature_extractor=MNIST_EXTRACTOR,
        feature_extractor_weights_path=str(mnist_extractor.weights), cuda=False, cache=False, verbose=False,
        save_cpu_ram=True, batch_size=100,
    )
    ours = frechet_distance(*feature_statistics(extract_features(mnist_extractor, fake, CPU, 100)["128"]),
                            *feature_statistics(extract_features(mnist_extractor, images[250:], CPU, 100)["128"]))
    assert out["frechet_inception_distance"] == pytest.approx(ours, rel=1e-5)
    assert out["inception_score_mean"] >= 1.0


def test_reference_npz_images_are_cached_and_stats_only_npz_skips_kid_and_pr(mnist_extractor, tmp_path):
    images, labels = val_digits()
    np.savez(tmp_path / "ref_images.npz", arr_0=images.numpy())
    kwargs = dict(cache_dir=tmp_path / "cache", image_size=32, channels=1, device=CPU, max_features=200)
    full = load_reference(str(tmp_path / "ref_images.npz"), mnist_extractor, **kwargs)
    assert full.kind == "npz-images" and full.num_images == 500 and full.features.shape == (200, 128)
    cached = list((tmp_path / "cache" / "reference").glob("*.npz"))
    assert len(cached) == 1 and full.cache == str(cached[0])
    again = load_reference(str(tmp_path / "ref_images.npz"), mnist_extractor, **kwargs)
    np.testing.assert_array_equal(again.sigma, full.sigma)

    np.savez(tmp_path / "adm_stats.npz", mu=full.mu, sigma=full.sigma)  # ADM layout without the image batch
    stats_only = load_reference(str(tmp_path / "adm_stats.npz"), mnist_extractor, **kwargs)
    assert stats_only.features is None and stats_only.card()["statistics"] == "stored in the file"
    assert stats_only.sha256 != full.sha256
    # The full ADM layout: FID from the stored statistics, KID / P-R from the stored reference batch.
    np.savez(tmp_path / "adm_full.npz", mu=full.mu + 1.0, sigma=full.sigma, arr_0=images.numpy())
    adm = load_reference(str(tmp_path / "adm_full.npz"), mnist_extractor, **kwargs)
    np.testing.assert_array_equal(adm.mu, full.mu + 1.0)
    assert adm.kind == "npz-stats" and adm.features.shape == (200, 128) and adm.num_images is None

    features = extract_features(mnist_extractor, faded(images, 0.2), CPU, 128)
    metrics = ["fid", "isc", "kid", "prc", "mnist_accuracy"]
    with_images = compute_metrics(features, full, metrics, mnist_extractor, labels=labels, fidelity=FIDELITY, device=CPU)
    stats = compute_metrics(features, stats_only, metrics, mnist_extractor, labels=labels, fidelity=FIDELITY, device=CPU)
    assert set(with_images[0]) == {"fid500", "isc", "isc_std", "kid", "kid_std", "precision", "recall", "mnist_accuracy"}
    assert with_images[1] == {} and with_images[2]["kid_subset_size"] == 200
    assert stats[0]["fid500"] == pytest.approx(with_images[0]["fid500"], rel=1e-9)
    assert set(stats[1]) == {"kid", "prc"} and "statistics only" in stats[1]["prc"]


def test_reference_from_an_image_folder_and_a_shard_set(mnist_extractor, tmp_path):
    from PIL import Image

    from flexdit_train.data.mnist import write_mnist_shards

    images, _ = val_digits()
    folder = tmp_path / "folder" / "digits"
    folder.mkdir(parents=True)
    for i in range(60):
        Image.fromarray(images[i, :, :, 0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    kwargs = dict(cache_dir=tmp_path / "cache", image_size=32, channels=1, device=CPU)
    from_folder = load_reference(str(tmp_path / "folder"), mnist_extractor, **kwargs)
    direct = feature_statistics(extract_features(mnist_extractor, images[:60], CPU, 64)["128"])
    np.testing.assert_allclose(from_folder.mu, direct[0], rtol=1e-6, atol=1e-6)
    assert from_folder.kind == "image-folder" and from_folder.num_images == 60

    write_mnist_shards(tmp_path / "shards")
    from_shards = load_reference(str(tmp_path / "shards" / "val.json"), mnist_extractor, **kwargs)
    from_split = load_reference("mnist:val", mnist_extractor, **kwargs)
    assert from_shards.num_images == from_split.num_images == 500
    np.testing.assert_allclose(from_shards.mu, from_split.mu, rtol=1e-6, atol=1e-6)  # same digits, other order
    with pytest.raises(FileNotFoundError, match="mnist:train"):
        load_reference(str(tmp_path / "nope.npz"), mnist_extractor, **kwargs)


# ---------------------------------------------------------------- offline Inception weights


def test_missing_inception_weights_error_is_one_line_naming_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for given in (None, str(tmp_path / "elsewhere.pth")):
        with pytest.raises(FileNotFoundError) as err:
            resolve_inception_weights(given)
        message = str(err.value)
        assert "\n" not in message
        assert INCEPTION_WEIGHTS_FILE in message and "eval.inception_weights=" in message
        assert str(tmp_path / "torch" / "hub" / "checkpoints") in message and "$TORCH_HOME/hub/checkpoints" in message


def test_app_checks_inception_weights_before_loading_or_sampling(tmp_path, monkeypatch):
    from flexdit_train.evaluate import run_evaluation

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = app_config(tmp_path, ["eval=fid10k", f"checkpoint={tmp_path / 'never_read.pt'}"])
    # The checkpoint does not exist either: failing on the weights proves they are checked first.
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        run_evaluation(cfg)


def test_inception_weights_reach_torch_fidelity_from_the_hub_cache_or_a_path(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    stub = tmp_path / "stub.pth"
    torch.save({}, stub)
    torch.manual_seed(0)
    random_weights = Unloaded(INCEPTION, ["2048"], feature_extractor_weights_path=str(stub)).state_dict()
    hub = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    hub.parent.mkdir(parents=True)
    torch.save(random_weights, hub)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert resolve_inception_weights(None) == hub
    assert resolve_inception_weights(str(stub)) == stub  # an explicit path wins over the hub cache

    extractor = Extractor(INCEPTION, resolve_inception_weights(None))
    gray = torch.randint(0, 256, (2, 32, 32, 1), dtype=torch.uint8)  # replicated to RGB for Inception
    features = extract_features(extractor, gray, CPU, batch_size=2)
    assert features["2048"].shape == (2, 2048) and features["logits_unbiased"].shape == (2, 1008)
    assert extractor.layer("fid") == "2048" and extractor.layer("isc") == "logits_unbiased"


# ---------------------------------------------------------------- presets, cards, tables, W&B


@pytest.mark.parametrize("preset", ["adm_fid50k", "fid10k", "mnist"])
def test_eval_presets_compose_with_every_sampling_knob(preset):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("evaluate", overrides=[f"eval={preset}", "checkpoint=x.pt"])
    ev = cfg.eval
    for key in ("num_samples", "sampling_steps", "cfg_scale", "guidance", "guide_all_channels", "vae",
                "reference", "feature_extractor", "metrics", "save_npz"):
        assert key in ev, key
    if preset == "adm_fid50k":
        assert (ev.num_samples, str(ev.sampling_steps), ev.cfg_scale) == (50000, "250", 1.5)
        assert ev.guide_all_channels is False and ev.save_npz is True and ev.feature_extractor == INCEPTION
        assert str(ev.vae).endswith("sd-vae-ft-ema") and fid_label(ev.num_samples) == "fid50k"
    if preset == "fid10k":
        assert fid_label(ev.num_samples) == "fid10k"
    if preset == "mnist":
        assert ev.feature_extractor == MNIST_EXTRACTOR and "mnist_accuracy" in ev.metrics and ev.vae is None


def test_results_table_upserts_rows_and_redraws_the_plot(tmp_path):
    def row(budget, fraction, fid, checkpoint="a.pt"):
        order = "static" if fraction == 1.0 else "weak_first"
        return {"checkpoint": checkpoint, "budget": budget, "preset": "mnist", "order": order, "compute_fraction": fraction,
                "gmacs_per_image": 1.0, "nfe": 20, "num_samples": 500, "sampling_steps": "ddim10",
                "cfg_scale": 1.5, "seed": 0, "fid500": fid, "card": "x/eval.json"}

    record_result(tmp_path, row("static", 1.0, 3.0))
    record_result(tmp_path, row("paper_70_70", 0.46, 3.5))
    record_result(tmp_path, row("paper_70_70", 0.46, 3.4))  # re-evaluated: replaces, not duplicates
    paths = record_result(tmp_path, {**row("static", 1.0, 9.0, "b.pt"), "kid": 0.1})
    rows = read_table(paths["csv"])
    assert [(r["checkpoint"], r["budget"], r["fid500"]) for r in rows] == [
        ("a.pt", "static", 3.0), ("a.pt", "paper_70_70", 3.4), ("b.pt", "static", 9.0)]
    assert rows[0]["kid"] == "" and rows[2]["kid"] == 0.1
    markdown = paths["markdown"].read_text().splitlines()
    assert len(markdown) == 2 + 3 and "| a.pt | paper_70_70 | mnist | weak_first | 46.0% |" in markdown[3]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_amm_evaluation_is_its_own_row_next_to_the_plain_one(tmp_path):
    card = {"checkpoint": "t.pt", "budget": "static", "preset": "mnist", "schedule_order": "static",
            "compute_fraction": 1.0, "gmacs_per_image": 1.0, "nfe": {"cond": {"p4": 20}}, "num_samples": 500,
            "sampling_steps": "ddim20", "cfg_scale": 1.5, "seed": 0, "metrics": {"fid500": 3.0}, "amm_blocks": []}
    record_result(tmp_path, table_row(card, "a/eval.json"))
    paths = record_result(tmp_path, table_row({**card, "amm_blocks": [2, 4], "metrics": {"fid500": 2.5}}, "b/eval.json"))
    rows = read_table(paths["csv"])  # not an upsert of the plain row: AMM draws other digits
    assert [(r["budget"], r["order"], r["nfe"], r["fid500"]) for r in rows] == [
        ("static", "static", 20, 3.0), ("static + amm2-4", "static+amm2-4", 20, 2.5)]
    assert [len(e["seeds"]) for e in seed_statistics(rows, ["fid500"])] == [1, 1]


def test_wandb_failure_is_a_warning_not_an_error(tmp_path, caplog):
    card = {"metrics": {"fid500": 1.0}, "compute_fraction": 1.0}
    assert log_to_wandb({"project": None}, card, "run", "group", {}, []) is False  # not configured: nothing
    ok = log_to_wandb({"project": "p", "mode": "no-such-mode", "dir": str(tmp_path)}, card, "run", "g", {}, [])
    assert ok is False and "W&B logging skipped" in caplog.text


# ---------------------------------------------------------------- distributed helpers and the FID proxy


def test_rank_shares_partition_the_indices_and_reassemble_in_order():
    from flexdit_train.evaluate import gather_samples, rank_indices

    shares = [rank_indices(10, r, 3) for r in range(3)]
    assert sorted(i for s in shares for i in s) == list(range(10)) and shares[1] == [1, 4, 7]
    local = torch.arange(10)
    assert torch.equal(gather_samples(local, 10, 0, 1), local)


def tiny_pixel_dit(flex: bool = True, seed: int = 0) -> torch.nn.Module:
    """A 32x32x1 MNIST-shaped DiT whose zero-initialised output layers are given values."""
    from flexdit_train.models import DiT
    from flexdit_train.models.flex import flexify

    torch.manual_seed(seed)
    model = DiT(input_size=32, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0.0, 0.05)
    return (flexify(model, patch_sizes=(4, 8), mode="shared") if flex else model).eval()


def test_fid_proxy_logs_on_every_step_and_matches_an_offline_computation(random_classifier_cache, tmp_path):
    import lightning as L

    from flexdit_train.diffusion import create_diffusion
    from flexdit_train.evaluation.callback import FidProxy
    from flexdit_train.evaluation.mnist_classifier import MnistFeatures
    from flexdit_train.flops import cost_model
    from flexdit_train.sampling import Sampler, sample_labels, weak_guidance_scale
    from flexdit_train.sampling.schedule import static
    from flexdit_train.training.ema import make_ema

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_pixel_dit(flex=False)
            self.ema = make_ema(self.model)

        def training_step(self, batch, batch_idx):
            return self.model(batch[0], torch.zeros(len(batch[0]), dtype=torch.long), batch[1]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.0)

    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,)))
    proxy = FidProxy(every_n_steps=1, reference="mnist:val", num_samples=12, num_real=100, feature="mnist",
                     sampling_steps="ddim2", cfg_scale=1.5, seed=3, batch_size=8, cache_dir=str(random_classifier_cache))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, callbacks=[proxy], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    module = Tiny()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    logged = float(trainer.callback_metrics["eval/fid_proxy"])
    assert np.isfinite(logged) and logged > 0

    # Offline: the same seeds, labels and real digits through our float64 Fréchet distance.
    net = MnistFeatures(classifier_path(random_classifier_cache))
    diffusion = create_diffusion("ddim2", learn_sigma=True)
    indices = list(range(12))
    sampler = Sampler(module.ema, diffusion, static(2, 4), cost_model(module.ema), cfg_scale=1.5,
                      weak_scale=weak_guidance_scale(1.5), guide_all_channels=False)
    fake = sampler.sample_images(sample_labels(3, indices, 10), 3, indices, batch_size=12)  # uint8 (12, 32, 32, 1)
    real = torch.from_numpy(split_images("val")[0][:100])
    with torch.no_grad():
        offline = frechet_distance(*feature_statistics(net(fake.permute(0, 3, 1, 2)).double()),
                                   *feature_statistics(net(real.permute(0, 3, 1, 2)).double()))
    assert logged == pytest.approx(offline, rel=1e-4)


def test_latent_model_is_decoded_through_the_vae_and_saved_in_adm_layout(random_classifier_cache, tmp_path):
    from flexdit_train.data.vae import TINY_VAE_CONFIG
    from flexdit_train.evaluate import run_evaluation
    from flexdit_train.models import DiT, export_safetensors

    torch.manual_seed(0)
    latent_dit = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    checkpoint = export_safetensors(latent_dit, tmp_path / "latent.safetensors")
    vae_config = tmp_path / "tiny_vae.json"
    vae_config.write_text(json.dumps(TINY_VAE_CONFIG))
    overrides = [f"checkpoint={checkpoint}", "eval=mnist", f"eval.vae={vae_config}", "eval.num_samples=6",
                 "eval.sampling_steps=ddim3", "eval.save_npz=true", "eval.metrics=[fid,mnist_accuracy]",
                 "device=cpu", f"cache_dir={random_classifier_cache}", f"results_dir={tmp_path / 'results'}"]
    cfg = app_config(tmp_path, overrides)
    with pytest.warns(UserWarning, match="random weights"):
        card = run_evaluation(cfg)["card"]
    samples = np.load(tmp_path / "run" / "samples.npz")
    assert samples["arr_0"].shape == (6, 32, 32, 3) and samples["arr_0"].dtype == np.uint8  # 4x4 latents x 8
    assert samples["arr_1"].dtype == np.int64 and samples["arr_1"].shape == (6,)
    assert card["vae"] == str(vae_config) and set(card["metrics"]) == {"fid6", "mnist_accuracy"}
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["metrics"] == card["metrics"]
    assert len(read_table(tmp_path / "results" / "results.csv")) == 1


# ---------------------------------------------------------------- slow: classifier accuracy, the app end to end


@pytest.mark.slow
def test_mnist_classifier_is_accurate_on_the_val_split_and_cached(trained_classifier_cache):
    path = classifier_path(trained_classifier_cache)
    model = load_classifier(path)
    images, labels = split_images("val")
    val_accuracy = accuracy(model, torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels))
    assert val_accuracy > 0.97
    assert val_accuracy == pytest.approx(torch.load(path, weights_only=True)["val_accuracy"])
    assert ensure_classifier(trained_classifier_cache) == path  # cached: not retrained


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, trained_classifier_cache):
    """``python -m flexdit_train.evaluate -m`` over two budgets of a tiny flexible MNIST DiT, on CPU."""
    from flexdit_train.models import export_safetensors

    root = tmp_path_factory.mktemp("eval-sweep")
    checkpoint = export_safetensors(tiny_pixel_dit(), root / "tiny_flex.safetensors")
    command = [
        sys.executable, "-m", "flexdit_train.evaluate", "-m", "budget=static,paper_70_70",
        f"checkpoint={checkpoint}", "eval=mnist", "eval.num_samples=40", "eval.sampling_steps=ddim10",
        "batch_size=20", "device=cpu", f"cache_dir={trained_classifier_cache}", f"hydra.sweep.dir={root / 'sweep'}",
        "wandb.project=flexdit-test", "wandb.mode=offline",
    ]
    env = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "sweep", checkpoint


@pytest.mark.slow
def test_sweep_over_two_budgets_writes_two_rows_a_plot_and_wandb_runs(sweep):
    sweep_dir, _ = sweep
    rows = read_table(sweep_dir / "results.csv")
    assert [r["budget"] for r in rows] == ["static", "paper_70_70"]
    assert [r["order"] for r in rows] == ["static", "weak_first"]
    assert rows[0]["compute_fraction"] == pytest.approx(1.0) and rows[1]["compute_fraction"] < 0.6
    for r in rows:
        assert r["preset"] == "mnist" and r["num_samples"] == 40
        assert r["fid40"] > 0 and 0.0 <= r["mnist_accuracy"] <= 1.0 and r["isc"] >= 1.0
    assert rows[0]["fid40"] != rows[1]["fid40"]  # the weak steps changed the samples
    assert (sweep_dir / "fid_vs_compute.png").read_bytes()[:4] == b"\x89PNG"
    assert len((sweep_dir / "results.md").read_text().splitlines()) == 4
    assert len(list(sweep_dir.glob("*/wandb/offline-run-*"))) == 2


@pytest.mark.slow
def test_eval_card_carries_every_knob_and_the_schedule_compute_fraction(sweep):
    from flexdit_train.flops import cost_model
    from flexdit_train.models.loading import from_pretrained

    sweep_dir, checkpoint = sweep
    cost = cost_model(from_pretrained(checkpoint))
    for job, budget in (("0", "static"), ("1", "paper_70_70")):
        card = json.loads((sweep_dir / job / "eval.json").read_text())
        assert set(CARD_KEYS) <= set(card)
        schedule = BudgetSchedule.from_dict(card["schedule"])
        assert card["budget"] == schedule.name == budget
        assert card["compute_fraction"] == pytest.approx(schedule.compute_fraction(cost), rel=1e-12)
        assert (card["sampler"], card["num_steps"], card["cfg_scale"], card["num_samples"]) == ("ddim", 10, 1.5, 40)
        assert card["diffusion_process"]["prediction"] == "epsilon"  # the sweep's checkpoint records none: DiT's
        assert card["metric_backend"]["name"] == "torch-fidelity" and card["metric_backend"]["version"]
        assert card["metric_backend"]["extractor"]["name"] == MNIST_EXTRACTOR
        assert card["reference"]["source"] == "mnist:val" and len(card["reference"]["sha256"]) == 64
        assert set(card["metrics"]) == {"fid40", "isc", "isc_std", "kid", "kid_std", "precision", "recall",
                                        "mnist_accuracy"}
        assert (sweep_dir / job / "grid.png").exists()
    card = json.loads((sweep_dir / "1" / "eval.json").read_text())
    assert card["nfe"] == {"cond": {"4": 3, "8": 7}, "guidance": {"4": 3, "8": 7}}  # 0.28 * 10 -> 3 native steps


@pytest.mark.slow
def test_two_rank_evaluation_scores_the_same_samples_as_one_process(sweep, trained_classifier_cache, tmp_path):
    sweep_dir, checkpoint = sweep
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "flexdit_train.evaluate", "budget=static", f"checkpoint={checkpoint}", "eval=mnist",
        "eval.num_samples=40", "eval.sampling_steps=ddim10", "batch_size=7", "device=cpu",
        f"cache_dir={trained_classifier_cache}", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "run" / "eval.json").read_text())
    one = json.loads((sweep_dir / "0" / "eval.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    # Same (seed, index) noise and labels: only batch layout differs, so uint8 images match up to rounding.
    assert two["metrics"]["fid40"] == pytest.approx(one["metrics"]["fid40"], rel=1e-3)
    assert two["metrics"]["mnist_accuracy"] == pytest.approx(one["metrics"]["mnist_accuracy"], abs=1 / 40)


def test_checkpoints_with_one_file_name_get_distinct_labels():
    from flexdit_train.evaluation.report import short_names

    names = short_names(["/runs/a/pretrain/checkpoints/final.ckpt", "/runs/a/flex/checkpoints/final.ckpt", "b.pt"])
    assert names == {"/runs/a/pretrain/checkpoints/final.ckpt": "pretrain/checkpoints/final.ckpt",
                     "/runs/a/flex/checkpoints/final.ckpt": "flex/checkpoints/final.ckpt", "b.pt": "b.pt"}


def test_named_series_give_the_plot_one_line_each_with_their_name(tmp_path, monkeypatch):
    """A comparison of methods (benchmarks/mnist_methods.py) names its lines; without a name a line is its
    checkpoint / preset / schedule order."""
    from matplotlib.figure import Figure

    from flexdit_train.evaluation.report import plot_fid_vs_compute

    def row(checkpoint, budget, fraction, order, seed, fid, series=""):
        return {"checkpoint": checkpoint, "budget": budget, "preset": "mnist", "sampling_steps": "ddim20",
                "cfg_scale": 1.5, "seed": seed, "compute_fraction": fraction, "order": order, "fid1k": fid,
                "series": series}

    rows = [row("a.ckpt", "static", 1.0, "static", s, 6.0 + s, "teacher") for s in (0, 1)]
    rows += [row("b.ckpt", "sparse_density", 0.6, "static", s, 30.0 + s, "SparseDiT") for s in (0, 1)]
    rows += [row("b.ckpt", "fixed grid", 0.58, "static", s, 47.0 + s, "SparseDiT") for s in (0, 1)]
    rows += [row("c.ckpt", "target_0.6", 0.6, "weak_first", s, 6.5 + s) for s in (0, 1)]
    legends, lines = [], []

    def capture(fig, *args, **kwargs):
        legends.extend(text.get_text() for text in fig.axes[0].get_legend().get_texts())
        lines.extend(len(line.get_xdata()) for line in fig.axes[0].get_lines() if line.get_marker() == "o")

    monkeypatch.setattr(Figure, "savefig", capture)
    plot_fid_vs_compute(rows, tmp_path / "plot.png", reference=("teacher", 6.5))
    assert legends == ["teacher 6.5 +-5%", "SparseDiT (fid1k)", "c.ckpt / mnist / weak-first (fid1k)", "teacher (fid1k)"]
    assert sorted(lines) == [1, 1, 2]  # the SparseDiT's two settings form one line; the others are single points
