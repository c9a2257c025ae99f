"""The metrics of a sample set, from its features (:mod:`flexdit_train.evaluation.features`) and a reference.

FID comes from our float64 :func:`frechet_distance`, IS / KID / precision-recall from torch-fidelity's own
metric functions (the ones ``calculate_metrics`` runs), called on those features with
``calculate_metrics``-style keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from flexdit_train.evaluation.features import Extractor
from flexdit_train.evaluation.frechet import feature_statistics, fid_label, frechet_distance
from flexdit_train.evaluation.mnist_classifier import MNIST_EXTRACTOR, label_accuracy
from flexdit_train.evaluation.reference import Reference

METRICS = ("fid", "isc", "kid", "prc", "mnist_accuracy")


def check_metrics(metrics: Iterable[str], extractor_name: str) -> list[str]:
    """Validate the requested metric names before any compute is spent."""
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown} in eval.metrics; choose from {list(METRICS)}")
    if "mnist_accuracy" in metrics and extractor_name != MNIST_EXTRACTOR:
        raise ValueError(f"mnist_accuracy needs eval.feature_extractor={MNIST_EXTRACTOR} (the digit classifier)")
    return metrics


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
