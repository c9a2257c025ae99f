"""Evaluation: FID (float64 Fréchet distance), IS, KID, precision/recall and MNIST accuracy of sample sets,
reference statistics, eval cards, sweep result tables and the in-training FID proxy."""

from flexdit_train.evaluation.card import CARD_KEYS, write_card
from flexdit_train.evaluation.features import (
    INCEPTION,
    INCEPTION_WEIGHTS_FILE,
    Extractor,
    extract_features,
    resolve_extractor,
    resolve_inception_weights,
)
from flexdit_train.evaluation.frechet import RunningStats, feature_statistics, fid_label, frechet_distance
from flexdit_train.evaluation.metrics import compute_metrics
from flexdit_train.evaluation.reference import Reference, load_reference
from flexdit_train.evaluation.report import record_result, table_row

__all__ = [
    "CARD_KEYS",
    "INCEPTION",
    "INCEPTION_WEIGHTS_FILE",
    "Extractor",
    "Reference",
    "RunningStats",
    "compute_metrics",
    "extract_features",
    "feature_statistics",
    "fid_label",
    "frechet_distance",
    "load_reference",
    "record_result",
    "resolve_extractor",
    "resolve_inception_weights",
    "table_row",
    "write_card",
]
