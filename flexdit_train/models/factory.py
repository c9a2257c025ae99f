"""Hydra-facing model factory: a registry preset, explicit sizes, or a pretrained checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

from flexdit_train.models.dit import DiT, create_model, to_2tuple

PRESET_KEYS = ("input_size", "num_classes", "in_channels", "learn_sigma", "class_dropout_prob")


def build_model(
    name: str | None = None,
    pretrained: str | None = None,
    grad_checkpointing: bool = False,
    **kwargs,
) -> DiT:
    """Build the network described by a model config.

    ``pretrained`` loads a checkpoint (its shapes win) and checks them against the data-derived
    ``input_size`` / ``in_channels`` / ``num_classes``; ``name`` picks an official preset; otherwise the
    explicit sizes in ``kwargs`` build a custom DiT.
    """
    if pretrained:
        from flexdit_train.models.loading import from_pretrained

        model = from_pretrained(pretrained, model=name)
        check_matches_data(model, pretrained, **{k: kwargs[k] for k in PRESET_KEYS[:3] if k in kwargs})
    elif name:
        model = create_model(name, **{k: v for k, v in kwargs.items() if k in PRESET_KEYS})
    else:
        model = DiT(**kwargs)
    model.grad_checkpointing = grad_checkpointing
    return model


def check_matches_data(
    model: DiT,
    source: str,
    input_size: int | Sequence[int] | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
) -> None:
    """One-line error when a pretrained model does not fit the configured data."""
    expected = {"input_size": None if input_size is None else list(to_2tuple(input_size)),
                "num_classes": num_classes, "in_channels": in_channels}
    actual = {"input_size": list(model.input_size), "num_classes": model.num_classes,
              "in_channels": model.in_channels}
    wrong = [f"{k}={actual[k]} (data has {v})" for k, v in expected.items() if v is not None and actual[k] != v]
    if wrong:
        raise ValueError(
            f"checkpoint {source} does not fit the data config: {', '.join(wrong)}; "
            "pick a matching data config or checkpoint"
        )
