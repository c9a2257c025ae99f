"""Feature extractors from torch-fidelity's registry with local weights, and the features of image sets.

Evaluation extracts features once per image set (samples and references) and scores them afterwards:
:mod:`flexdit_train.evaluation.reference` computes and caches reference statistics with these extractors,
:mod:`flexdit_train.evaluation.metrics` turns sample features into metrics.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from flexdit_train.evaluation.mnist_classifier import (
    MNIST_EXTRACTOR,
    ensure_classifier,
    register_mnist_extractor,
)

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hub_weights_path() -> Path:
    """Where torch.hub (and torch-fidelity) keep the Inception weights: ``$TORCH_HOME/hub/checkpoints/...``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def resolve_inception_weights(path: str | os.PathLike | None) -> Path:
    """The local Inception weights file: ``path`` when given, else the torch hub cache; never downloads."""
    candidate = Path(path).expanduser() if path else hub_weights_path()
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"Inception weights {INCEPTION_WEIGHTS_FILE} not found at {candidate}: pass "
        f"eval.inception_weights=/path/to/{INCEPTION_WEIGHTS_FILE} or put the file at {hub_weights_path()} "
        "($TORCH_HOME/hub/checkpoints/); nothing is downloaded"
    )


@dataclass
class Extractor:
    """A registered torch-fidelity feature extractor and its local weights file."""

    name: str
    weights: Path
    _modules: dict = field(default_factory=dict, repr=False, compare=False)

    @cached_property
    def sha256(self) -> str:
        return file_sha256(self.weights)

    @property
    def key(self) -> str:
        """Cache key: extractor name + weights content hash."""
        return f"{self.name}-{self.sha256[:12]}"

    def layer(self, metric: str) -> str:
        """The extractor's feature layer for ``metric`` (fid, isc, kid, prc)."""
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        return FEATURE_EXTRACTORS_REGISTRY[self.name].get_default_feature_layer_for_metric(metric)

    @property
    def layers(self) -> list[str]:
        return sorted({self.layer(m) for m in ("fid", "isc", "kid", "prc")})

    def module(self, device: torch.device) -> torch.nn.Module:
        """The extractor on ``device`` (built once per device) returning all of :attr:`layers`."""
        if str(device) not in self._modules:
            from torch_fidelity.utils import create_feature_extractor

            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # torch-fidelity moves it with a bare .cuda()
            self._modules[str(device)] = create_feature_extractor(
                self.name, self.layers, cuda=device.type == "cuda",
                feature_extractor_weights_path=str(self.weights), verbose=False,
            )
        return self._modules[str(device)]

    def card(self) -> dict:
        return {"name": self.name, "weights": str(self.weights), "weights_sha256": self.sha256,
                "layers": {m: self.layer(m) for m in ("fid", "isc", "kid", "prc")}}


def resolve_extractor(name: str, inception_weights: str | None, cache_dir: str | os.PathLike) -> Extractor:
    """Extractor ``name`` with its weights resolved locally (the MNIST classifier is trained on a cache miss)."""
    if name == INCEPTION:
        return Extractor(name, resolve_inception_weights(inception_weights))
    if name == MNIST_EXTRACTOR:
        register_mnist_extractor()
        return Extractor(name, ensure_classifier(cache_dir))
    raise ValueError(f"unknown feature extractor {name!r}: set eval.feature_extractor to {INCEPTION} or {MNIST_EXTRACTOR}")


def extractor_input(images: torch.Tensor, extractor_name: str) -> torch.Tensor:
    """uint8 (B, C, H, W) as the extractor takes it: Inception wants 3 channels, so gray is replicated."""
    if extractor_name == INCEPTION and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    return images


@torch.no_grad()
def iter_features(
    extractor: Extractor, batches: Iterable[torch.Tensor], layers: Iterable[str], device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Per batch of uint8 images (B, C, H, W): ``{layer: float32 (B, D) on CPU}`` for the requested layers."""
    module = extractor.module(device)
    layers = set(layers)
    for batch in batches:
        out = module.convert_features_tuple_to_dict(module(extractor_input(batch, extractor.name).to(device)))
        yield {name: value.float().cpu() for name, value in out.items() if name in layers}


def extract_features(
    extractor: Extractor, images: torch.Tensor, device: torch.device, batch_size: int
) -> dict[str, torch.Tensor]:
    """All layers' features of uint8 images (N, H, W, C): ``{layer: (N, D)}``."""
    batches = (images[i : i + batch_size].permute(0, 3, 1, 2) for i in range(0, len(images), batch_size))
    parts = list(iter_features(extractor, batches, extractor.layers, device))
    return {name: torch.cat([p[name] for p in parts]) for name in extractor.layers}
