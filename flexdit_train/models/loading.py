"""Load pretrained DiT weights from every checkpoint layout in use, and export them back.

Reads the official plain state dicts (``DiT-XL-2-256x256.pt``), DiT ``train.py`` dicts
(``{"model", "ema", "opt", "args"}``), safetensors files and this project's Lightning checkpoints
(``model.``/``ema.`` keys plus a ``"flexdit"`` block). When no model config is stored the architecture is
inferred from tensor shapes. The stored ``arch`` (:mod:`flexdit_train.models.arch`; absent = "dit") picks
the class, so video and text DiTs load like image ones. Loading is strict, and every failure is one
``CheckpointError`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import math
import os
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from flexdit_train.diffusion import process_differences
from flexdit_train.models.arch import Arch, arch_of, get_arch
from flexdit_train.models.dit import DIT_SIZES, DiT, DiT_models
from flexdit_train.runtime.atomic import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# ImageNet DiT files without a null row have exactly this many label rows (class_dropout_prob = 0).
IMAGENET_CLASSES = 1000
# Not stored in weights; DiT's training default, used when a null row shows that dropout was on.
DEFAULT_CLASS_DROPOUT = 0.1
# Prefixes added by DDP / DataParallel / AveragedModel (``module.``) and torch.compile (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Path segments that wrappers insert anywhere (regional compile, activation checkpointing, FSDP1);
# no real DiT submodule carries these names, so dropping them is always safe.
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})
# The tensors whose shapes determine a DiT architecture.
SHAPE_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "blocks.0.mlp.fc1.weight",
    "final_layer.linear.weight",
)
HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in DIT_SIZES.values()}
DIT_ARGS = frozenset(inspect.signature(DiT.__init__).parameters) - {"self"}
# safetensors caps its JSON header at 100 MB; anything claiming more is not a safetensors file.
SAFETENSORS_MAX_HEADER = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the problem and the fix."""


#################################################################################
#                                    Loading                                    #
#################################################################################


def from_pretrained(
    path: str | os.PathLike | Mapping,
    model: str | nn.Module | None = None,
    *,
    prefer_ema: bool = True,
    map_location="cpu",
    **overrides,
) -> nn.Module:
    """Build a DiT (or flexible DiT) from a checkpoint file or an already-loaded checkpoint dict.

    ``model`` is an official name (``"DiT-XL/2"``) whose preset must agree with the weights, or a module to
    load into in place. ``overrides`` replace DiT constructor args (e.g. ``input_size=(32, 64)``). EMA
    weights win when present unless ``prefer_ema=False``. A built model is returned in eval mode on the
    device the weights were read to; tensors of a passed-in dict are used without copying.
    """
    if isinstance(model, str):
        preset_of(model)  # fail on an unknown name before reading gigabytes
    if isinstance(model, nn.Module) and overrides:
        raise ValueError(f"overrides {sorted(overrides)} only apply when from_pretrained builds the model")
    source = str(path) if not isinstance(path, Mapping) else "<in-memory checkpoint>"
    raw, meta = (path, None) if isinstance(path, Mapping) else read_checkpoint(path, map_location)
    state_dict, meta = select_weights(raw, source, prefer_ema, meta)
    model_config, flex_config = meta.get("model_config"), meta.get("flex_config")
    arch = stored_arch(meta, source)

    if isinstance(model, nn.Module):
        load_strict(unwrap(model), state_dict, source)
        unwrap(model).diffusion_process = meta.get("diffusion")
        return model
    if not arch.official_layout:
        if model is not None:
            raise CheckpointError(
                f"checkpoint {source} holds a {arch.name} with its stored config; model names are DiT presets, "
                "pass model=None"
            )
        config = {**model_config, **overrides}
    elif flex_config is not None:
        config = {**apply_preset(dict(model_config), model, source), **overrides}
    else:
        config = resolve_config(state_dict, model_config, model, overrides, source)
    if flex_config is not None:
        net = build_model_of(arch, config, source, flex_config)
        load_strict(net, state_dict, source)
        if isinstance(map_location, str | torch.device):
            net.to(map_location)
        net.diffusion_process = meta.get("diffusion")
        return net.eval()

    # Built on the meta device and filled by assignment: no random init of weights about to be replaced.
    with torch.device("meta"):
        net = build_model_of(arch, config, source)
    load_strict(net, state_dict, source, assign=True)
    # Anything the state dict does not carry (a non-persistent buffer) would still be an empty meta tensor.
    left = [name for name, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{arch.name} tensors {left} are not in its state dict; loading cannot fill them")
    # The diffusion the weights were trained for (noise schedule, prediction; None = DiT's), for samplers.
    net.diffusion_process = meta.get("diffusion")
    return net.eval()


def stored_arch(meta: Mapping, source: str) -> Arch:
    """The arch a checkpoint records; files without one (official, DiT train.py, older ours) are DiTs."""
    try:
        return get_arch(meta.get("arch") or "dit")
    except ValueError as err:
        raise CheckpointError(
            f"checkpoint {source}: {err}; it was written by a newer flexdit_train, use that release"
        ) from None


def infer_config(state_dict: Mapping[str, torch.Tensor], model: str | None = None, **overrides) -> dict:
    """DiT constructor args inferred from a state dict's shapes (meta tensors work), as ``DiT.config``."""
    if model is not None:
        preset_of(model)
    return resolve_config(normalize_keys(state_dict, "<state dict>"), None, model, overrides, "<state dict>")


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[object, dict | None]:
    """Read a .pt/.pth/.bin or safetensors file (sniffed by content) -> (object, flexdit meta or None)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; check the path (or download the file first)"
        )
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the weights file inside it")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if size < 16:
        raise corrupt(path, f"only {size} bytes")
    # safetensors first: its 8-byte header length is arbitrary, so its first byte can be 0x80 like a pickle's;
    # a pickle's first 8 bytes read as a length are far beyond any real header.
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{" and header_len <= min(SAFETENSORS_MAX_HEADER, size - 8):
        return safetensors_load(path, map_location)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        return torch_load(path, map_location), None
    kind = "a text file" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "of an unknown format"
    raise CheckpointError(
        f"{path} is not a DiT checkpoint: it is {kind}, neither a PyTorch nor a safetensors file; "
        "pass the .pt or .safetensors weights file"
    )


def torch_load(path: Path, map_location) -> object:
    """torch.load with weights_only=True, allowing the argparse.Namespace that DiT's train.py pickles."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's weights-only unpickler refused an object: the file is readable, its content is unsafe.
        if "weights only load failed" not in str(err).lower():
            raise corrupt(path, err) from None
        refused = re.search(r"(?:unsupported global: global|unsupported global) ([\w.]+)", str(err), re.IGNORECASE)
        what = f"a {refused.group(1)} object" if refused else "an object other than tensors and plain containers"
        raise CheckpointError(
            f"checkpoint {path} is unsafe: it pickles {what}, and unpickling it could run code, so it was not "
            "loaded; if you trust its source, load it with torch.load(path, weights_only=False) and pass the dict "
            "to from_pretrained"
        ) from None
    except Exception as err:  # torch reports truncation as EOFError, RuntimeError, ... depending on where
        raise corrupt(path, err) from None


def safetensors_load(path: Path, map_location) -> tuple[dict, dict | None]:
    """Tensors of a safetensors file and the flexdit meta stored in its metadata (if any)."""
    from safetensors import safe_open

    device = str(map_location) if isinstance(map_location, str | torch.device) else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:
        raise corrupt(path, err) from None
    if "flexdit_model_config" not in metadata:
        return tensors, None
    try:
        flex = metadata.get("flexdit_flex_config")
        meta = {
            "format_version": int(metadata.get("flexdit_format_version", FORMAT_VERSION)),
            "arch": metadata.get("flexdit_arch", "dit"),
            "model_config": json.loads(metadata["flexdit_model_config"]),
            "flex_config": json.loads(flex) if flex is not None else None,
            "diffusion": json.loads(metadata["flexdit_diffusion"]) if "flexdit_diffusion" in metadata else None,
        }
    except ValueError as err:
        raise corrupt(path, f"unreadable flexdit metadata: {err}") from None
    return tensors, meta


def select_weights(raw: object, source: str, prefer_ema: bool, meta: dict | None) -> tuple[dict, dict]:
    """Pick the state dict to load (EMA first by default) out of any supported layout -> (weights, meta)."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"checkpoint {source} holds a {type(raw).__name__}, not a state dict; save model.state_dict()"
        )
    meta = meta if meta is not None else raw.get("flexdit")
    meta = dict(meta) if isinstance(meta, Mapping) else {}
    if meta and meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {source} has flexdit format_version {meta.get('format_version')!r} but this "
            f"flexdit_train reads version {FORMAT_VERSION}; use the flexdit_train release that wrote it"
        )

    if isinstance(raw.get("ema"), Mapping) or isinstance(raw.get("model"), Mapping):  # DiT train.py
        branches = {name: raw.get(name) or {} for name in ("ema", "model")}
    else:  # Lightning ("model."/"ema." keys under "state_dict") or a plain, possibly flattened, state dict
        flat = raw["state_dict"] if isinstance(raw.get("state_dict"), Mapping) else raw
        flat = normalize_keys(flat, source)
        branches = {name: sub_dict(flat, name + ".") for name in ("ema", "model")}
        if not any(branches.values()):
            branches = {"weights": flat}

    order = ("ema", "model") if prefer_ema else ("model", "ema")
    name = next((n for n in (*order, "weights") if branches.get(n)), None)
    if name is None:
        raise CheckpointError(f"checkpoint {source} holds no weights; it may be an optimizer-only file")
    if name != order[0] and order[0] in branches:
        log.info("checkpoint %s has no %r weights; loading %r", source, order[0], name)
    state_dict = normalize_keys(branches[name], source)
    # AveragedModel's step counter is bookkeeping, not a weight.
    state_dict.pop("n_averaged", None)
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint {source} is not a DiT checkpoint: entries {short(not_tensors)} are not tensors; "
            "pass a state dict, a DiT train.py checkpoint or a flexdit_train checkpoint"
        )
    return state_dict, meta


def normalize_keys(state_dict: Mapping, source: str) -> dict:
    """Drop wrapper prefixes (``module.``, ``_orig_mod.``, any number and order) and wrapper segments."""
    out = {}
    for key, value in state_dict.items():
        clean = str(key)
        while clean.startswith(WRAPPER_PREFIXES):
            clean = clean.split(".", 1)[1]
        clean = ".".join(part for part in clean.split(".") if part not in WRAPPER_SEGMENTS)
        if clean in out:
            raise CheckpointError(
                f"checkpoint {source} has two tensors named {clean!r} once wrapper prefixes are removed; "
                "save the unwrapped model's state dict"
            )
        out[clean] = value
    return out


def sub_dict(state_dict: Mapping, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def preset_of(name: str) -> dict:
    """Architecture fixed by an official name such as ``"DiT-XL/2"``."""
    if name not in DiT_models:
        raise CheckpointError(f"unknown model {name!r}; choose one of {', '.join(DiT_models)}")
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden, heads = DIT_SIZES[size]
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))


def apply_preset(config: dict, name: str | None, source: str) -> dict:
    """Check a named preset against the config and fill in what it fixes (the heads, for bare weights)."""
    if name is None:
        return config
    preset = preset_of(name)
    disagree = [f"{k} {config[k]} vs {v}" for k, v in preset.items() if k in config and config[k] != v]
    if disagree:
        raise CheckpointError(
            f"checkpoint {source} is not a {name}: {', '.join(disagree)} (checkpoint vs preset); "
            "pass the matching name or model=None to infer the architecture"
        )
    return {**config, **preset}


def resolve_config(
    state_dict: Mapping, stored: Mapping | None, name: str | None, overrides: Mapping, source: str
) -> dict:
    """Constructor args: the stored config (else shapes), checked against ``name``, then ``overrides``."""
    unknown = sorted(set(overrides) - DIT_ARGS)
    if unknown:
        raise CheckpointError(
            f"unknown DiT argument(s) {unknown}; valid overrides: {', '.join(sorted(DIT_ARGS))}"
        )
    config = dict(stored) if stored else infer_shapes(state_dict, overrides, source)
    config = apply_preset(config, name, source)
    if "num_heads" not in config and "num_heads" not in overrides:
        width = config["hidden_size"]
        if width not in HEADS_BY_WIDTH:
            raise CheckpointError(
                f"checkpoint {source} has width {width}, which no official DiT size uses, and attention "
                "heads are not stored in weights; pass model='DiT-<size>/<patch>' or num_heads=N"
            )
        config["num_heads"] = HEADS_BY_WIDTH[width]
    return {**config, **overrides}


def infer_shapes(state_dict: Mapping, overrides: Mapping, source: str) -> dict:
    """Every DiT constructor arg except the heads, read off tensor shapes (overrides settle ambiguities)."""
    absent = [k for k in SHAPE_KEYS if k not in state_dict]
    if len(absent) == len(SHAPE_KEYS):
        raise CheckpointError(
            f"checkpoint {source} is not a DiT checkpoint: none of its {len(state_dict)} keys "
            f"({short(list(state_dict), 4)}) is a DiT key such as x_embedder.proj.weight; "
            "pass DiT weights (official .pt, train.py, safetensors or a flexdit_train checkpoint)"
        )
    if absent:
        raise CheckpointError(
            f"checkpoint {source} is an incomplete DiT state dict: missing {short(absent)}; "
            "re-export it with export_official"
        )
    shape = {k: tuple(state_dict[k].shape) for k in SHAPE_KEYS}
    width, in_channels, patch, patch_w = shape["x_embedder.proj.weight"]
    if patch != patch_w or shape["pos_embed"][-1] != width:
        raise CheckpointError(
            f"checkpoint {source} has an unexpected patch embedding {shape['x_embedder.proj.weight']} or "
            f"pos_embed {shape['pos_embed']}; it is not a DiT checkpoint"
        )
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))

    fc1 = shape["blocks.0.mlp.fc1.weight"][0]
    mlp_ratio = fc1 / width
    if int(width * mlp_ratio) != fc1:  # DiT builds fc1 with int(width * ratio); guard float rounding
        mlp_ratio = (fc1 + 0.5) / width

    out = shape["final_layer.linear.weight"][0]
    if out not in (patch * patch * in_channels, 2 * patch * patch * in_channels):
        raise CheckpointError(
            f"checkpoint {source} has a final layer of {out} outputs, neither p*p*C ({patch * patch * in_channels})"
            f" nor p*p*2C; it is not a DiT checkpoint"
        )
    learn_sigma = out == 2 * patch * patch * in_channels

    num_classes, class_dropout = infer_classes(shape["y_embedder.embedding_table.weight"][0], overrides)

    if "input_size" in overrides:
        input_size = overrides["input_size"]
    else:
        tokens = shape["pos_embed"][-2]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise CheckpointError(
                f"checkpoint {source} has {tokens} position tokens, not a square grid; "
                "pass input_size=(H, W) in latent pixels"
            )
        input_size = [side * patch, side * patch]
    return dict(
        input_size=input_size,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=width,
        depth=depth,
        mlp_ratio=mlp_ratio,
        class_dropout_prob=class_dropout,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
    )


def infer_classes(rows: int, overrides: Mapping) -> tuple[int, float]:
    """(num_classes, class_dropout_prob) from the label-table rows: a null row exists iff dropout > 0."""
    num_classes, dropout = overrides.get("num_classes"), overrides.get("class_dropout_prob")
    if num_classes is not None:
        has_null = rows == num_classes + 1
    elif dropout is not None:
        has_null = dropout > 0
    else:
        # Shapes alone are ambiguous; DiT trains with a null row, and 1000 rows is ImageNet without one.
        has_null = rows != IMAGENET_CLASSES
    if num_classes is None:
        num_classes = rows - int(has_null)
    if dropout is None:
        dropout = DEFAULT_CLASS_DROPOUT if has_null else 0.0
    return num_classes, dropout


def build_model_of(arch: Arch, config: dict, source: str, flex_config: Mapping | None = None) -> nn.Module:
    """The static network of ``arch`` from ``config`` (or its flexible one with ``flex_config``)."""
    try:
        if flex_config is None:
            return arch.static(**config)
        return arch.flexible.from_config(config, dict(flex_config))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot build {arch.name} from checkpoint {source}: {one_line(err)}") from None


def load_strict(net: nn.Module, state_dict: Mapping, source: str, assign: bool = False) -> None:
    """load_state_dict(strict=True), reporting missing, unexpected and mis-shaped keys in one error."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"checkpoint {source} does not match {describe(net)}: missing {short(missing)}, "
            f"unexpected {short(unexpected)}, shape mismatches (checkpoint vs model) {short(mismatched)}; "
            "pass the model name or overrides that match the checkpoint"
        )
    if assign:
        # Assignment adopts the checkpoint's dtype; keep the model's (fp32) even from half-precision files.
        state_dict = {
            k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()
        }
    net.load_state_dict(state_dict, strict=True, assign=assign)


#################################################################################
#                                    Export                                     #
#################################################################################


def export_official(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a plain state dict in the official DiT layout (static model, no prefixes, cpu tensors)."""
    net = unwrap(model)
    differences = process_differences(getattr(net, "diffusion_process", None), None)
    if differences:
        log.warning(
            "the official layout cannot record that this model was trained with %s (DiT: %s): sample it with "
            "those settings, or export with export_safetensors, which keeps them",
            ", ".join(f"{k}={a}" for k, (a, _) in differences.items()),
            ", ".join(f"{k}={b}" for k, (_, b) in differences.items()),
        )
    if hasattr(net, "export_native"):  # a flexible model: the official layout holds its native DiT
        net = net.export_native()
    state_dict = plain_state_dict(net)
    return atomic_write(path, lambda tmp: torch.save(state_dict, tmp))


def export_safetensors(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write safetensors weights with the model (and flex) config as JSON metadata, so loading needs no guess."""
    from safetensors.torch import save_file

    net = unwrap(model)
    config = getattr(net, "config", None)
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{type(net).__name__} has no .config dict to store; export a DiT or FlexDiT")
    metadata = {
        "flexdit_format_version": str(FORMAT_VERSION),
        "flexdit_arch": arch_of(net).name,
        "flexdit_model_config": json.dumps(dict(config)),
    }
    flex_config = getattr(net, "flex_config", None)
    if flex_config is not None:
        if dataclasses.is_dataclass(flex_config):
            flex_config = dataclasses.asdict(flex_config)
        metadata["flexdit_flex_config"] = json.dumps(flex_config)
    if getattr(net, "diffusion_process", None) is not None:
        metadata["flexdit_diffusion"] = json.dumps(dict(net.diffusion_process))
    state_dict = plain_state_dict(net)
    return atomic_write(path, lambda tmp: save_file(state_dict, tmp, metadata=metadata))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DataParallel / AveragedModel / torch.compile wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel, torch.optim.swa_utils.AveragedModel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def plain_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous cpu tensors under clean keys, each owning exactly its own storage."""
    out = {}
    for key, value in normalize_keys(net.state_dict(), type(net).__name__).items():
        value = value.detach().cpu()
        # torch.save writes a view's whole storage and safetensors rejects shared storage: copy views.
        owns_storage = value.untyped_storage().nbytes() == value.numel() * value.element_size()
        if not value.is_contiguous() or value.storage_offset() or not owns_storage:
            value = value.clone(memory_format=torch.contiguous_format)
        out[key] = value
    return out


#################################################################################
#                                 Error helpers                                 #
#################################################################################


def corrupt(path: Path, reason: object) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is truncated or corrupt ({one_line(reason)}); re-download or re-copy it"
    )


def one_line(reason: object, limit: int = 160) -> str:
    """An exception (or text) squeezed onto one short line, type name included when the text is empty."""
    text = " ".join(str(reason).split())
    if isinstance(reason, BaseException):
        text = f"{type(reason).__name__}: {text}" if text else type(reason).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}, ... (+{len(items) - limit} more)]" if len(items) > limit else f"[{shown}]"


def describe(net: nn.Module) -> str:
    config = getattr(net, "config", None)
    if not isinstance(config, Mapping):
        return type(net).__name__
    return f"{type(net).__name__}({', '.join(f'{k}={v}' for k, v in config.items())})"
