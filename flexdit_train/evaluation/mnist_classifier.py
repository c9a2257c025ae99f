"""A small MNIST CNN as a feature space for FID/KID/P-R/IS without Inception, and a digit-accuracy metric.

Trained once, deterministically (fixed seed, one thread), on the bundled MNIST train split and cached
under ``<cache_dir>/mnist_classifier/<CLASSIFIER_VERSION>.pt``. Registered in torch-fidelity as
``mnist-cnn``: features ``"128"`` (penultimate layer, for FID/KID/P-R) and ``"logits"`` (for IS).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from flexdit_train.runtime.atomic import atomic_write

# Bump when the architecture, data or recipe changes: cached classifiers of other versions are ignored.
CLASSIFIER_VERSION = "mnist-cnn-v1"
MNIST_EXTRACTOR = "mnist-cnn"
FEATURE_DIM = 128
IMAGE_SIZE = 32
TRAIN_SEED, TRAIN_EPOCHS, TRAIN_BATCH, TRAIN_LR = 0, 6, 64, 3e-3  # 98.4% val accuracy in ~16 s on one core
MAX_SHIFT = 2  # random translation (pixels) during training: the generalisation that 4,500 digits lack


class MnistCNN(nn.Module):
    """Three conv-BN-ReLU-pool blocks and a 128-d hidden layer; input float (N, 1, 32, 32) in [0, 1]."""

    def __init__(self, widths: tuple[int, ...] = (12, 24, 48), num_classes: int = 10) -> None:
        super().__init__()
        blocks, channels = [], 1
        for width in widths:
            blocks += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.body = nn.Sequential(*blocks)
        side = IMAGE_SIZE // 2 ** len(widths)
        self.fc = nn.Linear(channels * side * side, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features (N, 128), logits (N, 10))."""
        h = F.relu(self.fc(self.body(x).flatten(1)))  # (N, 128)
        return h, self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[1]


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) with C in {1, 3} -> float (N, 1, 32, 32) in [0, 1] (RGB averaged to gray)."""
    x = images.float() / 255.0
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)  # replicated gray digits come back unchanged
    if x.shape[1] != 1:
        raise ValueError(f"the MNIST classifier takes 1- or 3-channel images, got {x.shape[1]} channels")
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


def _split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled MNIST ``train`` or ``val`` split: uint8 (N, 1, 32, 32) images and int64 (N,) labels."""
    from flexdit_train.data.mnist import load_mnist_digits, split_train_val

    images, labels = load_mnist_digits()
    train_idx, val_idx = split_train_val(labels)
    idx = {"train": train_idx, "val": val_idx}[name]
    return torch.from_numpy(images[idx])[:, None], torch.from_numpy(labels[idx])


def _shifted(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image (N, 1, H, W) by up to MAX_SHIFT pixels (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4)  # (N, 1, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * MAX_SHIFT + 1, (2, n), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model: MnistCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on uint8 images (N, C, H, W) against ``labels`` (N,)."""
    model.eval()
    preds = torch.cat([model(preprocess(images[i : i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)])
    return int((preds == labels).sum()) / len(labels)


def train_classifier(epochs: int = TRAIN_EPOCHS, seed: int = TRAIN_SEED) -> tuple[MnistCNN, float]:
    """Train on the MNIST train split on CPU in one thread (bit-reproducible); returns (model, val accuracy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thread count changes reduction order, hence the weights
    try:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = MnistCNN()
        images, labels = _split("train")
        x_all = preprocess(images)  # (N, 1, 32, 32)
        optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
        steps = epochs * -(-len(x_all) // TRAIN_BATCH)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=TRAIN_LR, total_steps=steps)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x_all), generator=generator)
            for start in range(0, len(order), TRAIN_BATCH):
                batch = order[start : start + TRAIN_BATCH]
                loss = F.cross_entropy(model(_shifted(x_all[batch], generator)), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        val_images, val_labels = _split("val")
        return model.eval(), accuracy(model, val_images, val_labels)
    finally:
        torch.set_num_threads(threads)


def classifier_path(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / "mnist_classifier" / f"{CLASSIFIER_VERSION}.pt"


def ensure_classifier(cache_dir: str | os.PathLike) -> Path:
    """Path of the cached classifier, training and saving it first when absent (atomic write)."""
    path = classifier_path(cache_dir)
    if path.exists():
        return path
    model, val_accuracy = train_classifier()
    state = {"version": CLASSIFIER_VERSION, "val_accuracy": val_accuracy, "state_dict": model.state_dict()}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_classifier(path: str | os.PathLike) -> MnistCNN:
    """The classifier stored by :func:`ensure_classifier`, in eval mode."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("version") != CLASSIFIER_VERSION:
        raise ValueError(
            f"{path} holds MNIST classifier {blob.get('version')!r}, not {CLASSIFIER_VERSION!r}: delete it "
            "and rerun to retrain"
        )
    model = MnistCNN()
    model.load_state_dict(blob["state_dict"])
    return model.eval().requires_grad_(False)


class MnistFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor over :class:`MnistCNN`; ``feature_extractor_weights_path`` = the cached file."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(
                "the mnist-cnn extractor needs feature_extractor_weights_path: pass "
                "flexdit_train.evaluation.mnist_classifier.ensure_classifier(CACHE_DIR)"
            )
        self.net = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (str(FEATURE_DIM), "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else str(FEATURE_DIM)

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, logits = self.net.features(preprocess(images))  # (N, 128), (N, 10)
        provided = {str(FEATURE_DIM): h, "logits": logits}
        return tuple(provided[name] for name in self.features_list)


class MnistFeatures(nn.Module):
    """The 128-d features as a plain module, for torchmetrics ``FrechetInceptionDistance(feature=...)``."""

    num_features = FEATURE_DIM

    def __init__(self, weights_path: str | os.PathLike) -> None:
        super().__init__()
        self.net = load_classifier(weights_path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(preprocess(images))[0]  # (N, 128)


def register_mnist_extractor() -> None:
    """Register ``mnist-cnn`` with torch-fidelity (idempotent: the registry refuses duplicates)."""
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if MNIST_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(MNIST_EXTRACTOR, MnistFeatureExtractor)


def label_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of generated digits (logits (N, 10)) classified as their conditioning label (N,)."""
    return int((logits.argmax(1).cpu() == labels.cpu()).sum()) / len(labels)


def split_images(name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 32, 32, 1) images and int64 (N,) labels of the MNIST ``train`` or ``val`` split."""
    images, labels = _split(name)
    return images.permute(0, 2, 3, 1).numpy(), labels.numpy()
