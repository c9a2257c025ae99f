"""Feature extractors from torch-fidelity's registry with offline weights, and the metrics of a sample set.

Features are extracted once per image set; FID comes from our float64 :func:`frechet_distance`, IS / KID /
precision-recall from torch-fidelity's own metric functions (the ones ``calculate_metrics`` runs),
called on those features with ``calculate_metrics``-style keyword arguments.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flexdit_train.evaluation.frechet import feature_statistics, fid_label, frechet_distance
from flexdit_train.evaluation.mnist_classifier import (
    MNIST_EXTRACTOR,
    ensure_classifier,
    label_accuracy,
    register_mnist_extractor,
)

if TYPE_CHECKING:
    from flexdit_train.evaluation.reference import Reference

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
METRICS = ("fid", "isc", "kid", "prc", "mnist_accuracy")


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


def check_metrics(metrics: Iterable[str], extractor_name: str) -> list[str]:
    """Validate the requested metric names before any compute is spent."""
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown} in eval.metrics; choose from {list(METRICS)}")
    if "mnist_accuracy" in metrics and extractor_name != MNIST_EXTRACTOR:
        raise ValueError(f"mnist_accuracy needs eval.feature_extractor={MNIST_EXTRACTOR} (the digit classifier)")
    return metrics


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


def compute_metrics(
    features: Mapping[str, torch.Tensor],
    reference: Reference,
    metrics: Iterable[str],
    extractor: Extractor,
    *,
    labels: torch.Tensor | None,
    fidelity: Mapping[str, Any],
    device: torch.device,
) -> tuple[dict[str, float], dict[str, str], dict[str, Any]]:
    """(metric values, {metric: reason} for skipped ones, the parameters actually used) of one sample set.

    ``fidelity`` holds torch-fidelity keyword arguments (isc_splits, kid_subsets, kid_subset_size,
    prc_neighborhood, ...); KID and P/R are skipped, with the reason, when the reference has no images.
    """
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    kwargs = {**fidelity, "verbose": False}
    # Reference features are stored at the KID layer, which is also the P/R layer of both extractors.
    fid_layer, subset_layer = extractor.layer("fid"), extractor.layer("kid")
    n = len(features[fid_layer])
    values: dict[str, float] = {}
    skipped: dict[str, str] = {}
    used: dict[str, Any] = {}
    for metric in metrics:
        if metric == "fid":
            if reference.mu.shape[0] != features[fid_layer].shape[1]:
                raise ValueError(
                    f"reference {reference.source} holds {reference.mu.shape[0]}-d statistics but {extractor.name} "
                    f"layer {fid_layer} gives {features[fid_layer].shape[1]}-d features: use a reference for this extractor"
                )
            mu, sigma = feature_statistics(features[fid_layer])
            values[fid_label(n)] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
        elif metric == "isc":
            used["isc_splits"] = min(int(kwargs["isc_splits"]), n)
            out = isc_featuresdict_to_metric(features, extractor.layer("isc"), **{**kwargs, **used})
            values["isc"], values["isc_std"] = out["inception_score_mean"], out["inception_score_std"]
        elif metric in ("kid", "prc") and reference.features is None:
            skipped[metric] = f"reference {Path(reference.source).name} holds statistics only (mu/sigma), no images"
        elif metric == "kid":
            # torch-fidelity refuses subsets larger than either set; small sets use all they have.
            used["kid_subset_size"] = min(int(kwargs["kid_subset_size"]), n, len(reference.features))
            out = kid_features_to_metric(features[subset_layer], reference.features, **{**kwargs, **used})
            values["kid"], values["kid_std"] = out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]
        elif metric == "prc":
            gen, real = features[subset_layer].to(device), reference.features.to(device)
            out = prc_features_to_metric(gen, real, **kwargs)  # generated first, real second
            values["precision"], values["recall"] = out["precision"], out["recall"]
        elif metric == "mnist_accuracy":
            values["mnist_accuracy"] = label_accuracy(features["logits"], labels)
    return values, skipped, used
