"""In-training FID proxy: fixed seeds and labels, EMA weights, torchmetrics FID, computed on every rank."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from flexdit_train.evaluation.features import INCEPTION, extractor_input, resolve_inception_weights
from flexdit_train.evaluation.mnist_classifier import MnistFeatures, ensure_classifier
from flexdit_train.evaluation.reference import iter_images, reference_kind
from flexdit_train.sampling.pipeline import Sampler, latent_decoder
from flexdit_train.sampling.seeds import sample_labels


class FidProxy(L.Callback):
    """Every ``every_n_steps`` steps, FID of ``num_samples`` EMA samples against ``num_real`` reference images.

    Sample i's noise and label derive from ``(seed, i)``, as in offline evaluation, so curves from
    different runs are comparable. Each rank samples indices ``i % world == rank`` and adds the same
    share of the real set once; ``compute()`` all-reduces the feature sums, so every rank must call it
    (under ``rank_zero_only`` it would hang). ``feature="mnist"`` swaps Inception for the digit classifier.
    Logged as ``eval/fid_proxy``.
    """

    def __init__(
        self,
        every_n_steps: int,
        reference: str,
        num_samples: int = 1000,
        num_real: int | None = None,
        feature: str = "inception",
        inception_weights: str | None = None,
        antialias: bool = False,
        sampling_steps: str = "ddim50",
        cfg_scale: float = 1.0,
        guide_all_channels: bool | None = None,
        seed: int = 0,
        batch_size: int = 64,
        vae: str | None = None,
        latent_scale_factor: float = 0.18215,
        cache_dir: str | None = None,
    ):
        if feature not in ("inception", "mnist"):
            raise ValueError(f"FidProxy feature={feature!r}: use 'inception' or 'mnist'")
        if feature == "mnist" and cache_dir is None:
            raise ValueError("FidProxy feature='mnist' needs cache_dir (where the digit classifier is cached)")
        self.every_n_steps = every_n_steps
        self.reference = reference
        self.cache_dir = cache_dir
        self.num_samples = num_samples
        self.num_real = num_real
        self.feature = feature
        self.inception_weights = inception_weights
        self.antialias = antialias
        self.sampling_steps = sampling_steps
        self.cfg_scale = cfg_scale
        self.guide_all_channels = guide_all_channels
        self.seed = seed
        self.batch_size = batch_size
        self.vae = vae
        self.latent_scale_factor = latent_scale_factor
        self.metric: FrechetInceptionDistance | None = None
        self._decode = None
        self._real_added = False
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve weights and the reference before the first step, so a missing file fails at once."""
        if self.metric is not None:  # set up by an earlier stage; keeps the real features
            return
        reference_kind(self.reference)
        if self.feature == "inception":
            weights = resolve_inception_weights(self.inception_weights)
            feature = 2048
        else:
            if trainer.is_global_zero:
                ensure_classifier(self.cache_dir)  # one rank trains it; the others load after the barrier
            trainer.strategy.barrier()
            weights, feature = None, MnistFeatures(ensure_classifier(self.cache_dir))
        self.metric = FrechetInceptionDistance(
            feature=feature, reset_real_features=False, antialias=self.antialias,
            feature_extractor_weights_path=None if weights is None else str(weights),
        )

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) in the form the metric's network takes."""
        return extractor_input(images, INCEPTION) if self.feature == "inception" else images

    def _real_share(self, image_size: int, channels: int, rank: int, world: int) -> Iterator[torch.Tensor]:
        """This rank's share (global index % world == rank) of the first ``num_real`` reference images."""
        seen = 0
        for batch in iter_images(self.reference, reference_kind(self.reference), image_size, channels, self.batch_size):
            if self.num_real is not None:
                batch = batch[: max(0, self.num_real - seen)]
            mine = (torch.arange(seen, seen + len(batch)) % world) == rank
            seen += len(batch)
            if mine.any():
                yield batch[mine]
            if self.num_real is not None and seen >= self.num_real:
                return

    @torch.no_grad()
    def fid(self, pl_module: L.LightningModule, rank: int = 0, world: int = 1) -> float:
        """Sample this rank's share from ``pl_module.ema`` and return the all-rank FID (call on every rank)."""
        model = pl_module.ema
        device = next(model.parameters()).device
        if self.vae is not None and self._decode is None:
            self._decode = latent_decoder(self.vae, self.latent_scale_factor, device)
        sampler = Sampler.for_model(model, {"mode": "static"}, self.sampling_steps, self.cfg_scale, self._decode,
                                    guide_all_channels=self.guide_all_channels)
        indices = list(range(rank, self.num_samples, world))
        labels = sample_labels(self.seed, indices, model.num_classes)
        images = sampler.sample_images(labels, self.seed, indices, self.batch_size).permute(0, 3, 1, 2)  # uint8 (n, C, H, W)
        metric = self.metric.to(device)
        if not self._real_added:  # real features persist across resets (reset_real_features=False)
            for batch in self._real_share(images.shape[-1], images.shape[1], rank, world):
                metric.update(self._images(batch).to(device), real=True)
            self._real_added = True
        for start in range(0, len(images), self.batch_size):
            metric.update(self._images(images[start : start + self.batch_size]).to(device), real=False)
        value = float(metric.compute())
        metric.reset()  # drops the fake features only
        return value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        value = self.fid(pl_module, trainer.global_rank, trainer.world_size)
        # Identical on every rank after compute()'s all-reduce: no further sync needed.
        pl_module.log("eval/fid_proxy", value, on_step=True, on_epoch=False, sync_dist=False)
