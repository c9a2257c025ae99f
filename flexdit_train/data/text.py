"""Caption embeddings: a local ``transformers`` text encoder, shard encoding, and prompts for sampling.

``python -m flexdit_train.shards text-embeddings SHARDS OUT --encoder PATH`` copies every sample of a
caption set (images, latents or videos with a ``txt`` caption) and adds ``text_emb.npy`` (float16
(L, D) last hidden states) and ``text_mask.npy`` (bool (L,), False = padding), captions padded or cut
to L = ``--max-length`` tokens. One output shard per input shard, resumable like the latents command.
The encoder is only ever read from a local directory (``save_pretrained`` of a model and its tokenizer,
e.g. T5-XXL's encoder for PixArt); nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from itertools import chain, islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from flexdit_train.data.encode import finish_shard, output_shards, progress_path
from flexdit_train.data.index import resolve_shards, write_index
from flexdit_train.data.media import TEXT_EMB_FIELD, TEXT_MASK_FIELD
from flexdit_train.data.stream import WorkerStats, read_shards

# Reader bookkeeping that webdataset adds to samples; never written back.
READER_KEYS = ("__url__", "__local_path__")


class TextEncoder:
    """A local transformers encoder and its tokenizer: captions -> float32 (N, L, D) states, bool (N, L) mask."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"text encoder {path} has no config.json: pass a local directory written by save_pretrained "
                "(the encoder model and its tokenizer)"
            )
        import transformers

        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        # The saved class (e.g. T5EncoderModel) loads exactly the stored weights; AutoModel would add a decoder.
        model_class = getattr(transformers, (config.architectures or ["AutoModel"])[0], transformers.AutoModel)
        model = model_class.from_pretrained(path, local_files_only=True)
        if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"text encoder {path} has no usable tokenizer ({' '.join(str(err).split())[:120]}): save it next "
                "to the model with tokenizer.save_pretrained(PATH)"
            ) from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.name = path.name

    @torch.no_grad()
    def encode(self, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions padded or truncated to ``max_length`` tokens -> (N, L, D) float32, (N, L) bool on CPU."""
        tokens = self.tokenizer(
            list(captions), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        mask = tokens["attention_mask"].bool()  # (N, L)
        empty = [c for c, m in zip(captions, mask) if not m.any()]
        if empty:  # the model's attention over no caption token would be NaN
            raise ValueError(f"caption {empty[0]!r} encodes to no tokens: drop empty captions before encoding")
        ids = tokens["input_ids"].to(self.device)  # (N, L)
        states = self.model(input_ids=ids, attention_mask=mask.to(self.device)).last_hidden_state  # (N, L, D)
        return states.float().cpu(), mask


def caption_of(sample: dict, url: str) -> str:
    """The ``txt`` caption of a raw sample; one-line error naming the fix when it has none."""
    if "txt" not in sample:
        raise ValueError(
            f"sample {sample.get('__key__')} of {url} has no caption (txt member): write the shards from a list "
            "file with a 'caption' column (python -m flexdit_train.shards imagefolder|video)"
        )
    return sample["txt"].decode("utf-8")


def encode_text_shard(url: str, out: str, encoder: TextEncoder, max_length: int, batch_size: int) -> dict:
    """Copy one shard into ``out`` with caption embeddings added; return its progress record."""
    stats = WorkerStats()
    tmp = f"{out}.tmp{os.getpid()}"
    written, channels = 0, None
    samples = read_shards([dict(url=url)], stats)
    with wds.TarWriter(tmp, mtime=0) as writer:  # an int mtime avoids a PAX header per member
        batch: list[dict] = []
        for sample in chain(samples, [None]):  # None flushes the last partial batch
            if sample is not None:
                batch.append({k: v for k, v in sample.items() if k not in READER_KEYS})
            if batch and (sample is None or len(batch) == batch_size):
                emb, mask = encoder.encode([caption_of(s, url) for s in batch], max_length)  # (B, L, D), (B, L)
                channels = emb.shape[-1]
                for s, e, m in zip(batch, emb.half().numpy(), mask.numpy()):
                    writer.write({**s, TEXT_EMB_FIELD: e, TEXT_MASK_FIELD: m})
                written += len(batch)
                batch = []
    if written == 0:
        os.remove(tmp)
        raise ValueError(f"{url} has no readable samples: run `python -m flexdit_train.shards verify` on it")
    record = {"url": url, "out": out, "count": written, "skipped": dict(stats.lost), "encoder": encoder.name,
              "text_len": max_length, "text_channels": channels}
    finish_shard(tmp, out, record)
    return record


def encode_text_shards(
    shards: str | list,
    out: str | Path,
    *,
    encoder: str | os.PathLike,
    max_length: int = 120,
    batch_size: int = 64,
    device: str = "cpu",
    prefix: str | None = None,
    log=print,
) -> dict:
    """Add caption embeddings to every shard of ``shards`` into ``OUT`` (skipping finished ones); return the index."""
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"--max-length and --batch-size must be >= 1, got {max_length} and {batch_size}")
    source, outs = output_shards(shards, out)
    out = Path(out)
    prefix = prefix or source.meta.get("prefix") or "captions"
    records, todo = {}, []
    for url, target in zip(source.urls, outs):
        progress = progress_path(target)
        if progress.exists() and os.path.exists(target):
            records[url] = json_record(progress, Path(encoder).name, max_length, out)
        else:
            todo.append((url, target))
    log(f"encoding captions of {len(todo)} of {len(outs)} shards ({len(outs) - len(todo)} already done) into {out}")
    if todo:
        text_encoder = TextEncoder(encoder, device)  # loaded only when there is work left
        for url, target in todo:
            records[url] = encode_text_shard(url, target, text_encoder, max_length, batch_size)
            log(f"  {Path(target).name}: {records[url]['count']} samples")
    ordered = [records[u] for u in source.urls]
    # Re-encoding an embedded set (another encoder or length) replaces its text fields, never duplicates them.
    replaced = ("total", "prefix", "text_encoder", "text_len", "text_channels")
    inherited = {k: v for k, v in source.meta.items() if k not in replaced}
    return write_index(
        out / f"{prefix}.json", [(r["out"], r["count"]) for r in ordered], **inherited, prefix=prefix,
        text_encoder=ordered[0]["encoder"], text_len=max_length, text_channels=ordered[0]["text_channels"],
    )


def json_record(progress: Path, encoder_name: str, max_length: int, out: Path) -> dict:
    """A finished shard's record; one-line error when it was encoded with another encoder or token length
    (a resumed set must not mix embeddings of two encoders)."""
    record = json.loads(progress.read_text())
    if (record["encoder"], record["text_len"]) != (encoder_name, max_length):
        raise ValueError(
            f"{out} holds shards encoded with encoder {record['encoder']!r} and --max-length {record['text_len']}: "
            "rerun with those, or write into a new OUT"
        )
    return record


#################################################################################
#                              Prompts for sampling                             #
#################################################################################


def encode_prompts(
    prompts: Sequence[str], encoder: str | os.PathLike, max_length: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (P, L, D) float32 embeddings and (P, L) bool masks with the training captions' encoder."""
    if not prompts:
        raise ValueError("prompts is empty: give at least one caption string")
    return TextEncoder(encoder, device).encode(list(prompts), max_length)


def shard_prompts(shards: str | list, count: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``count`` samples' stored embeddings (float32 (P, L, D)), masks (P, L) and captions."""
    source = resolve_shards(shards)
    rows = list(islice(_embedded(read_shards([dict(url=u) for u in source.urls], WorkerStats())), count))
    if not rows:
        raise ValueError(
            f"{shards} holds no caption embeddings: run `python -m flexdit_train.shards text-embeddings` on it"
        )
    emb = torch.from_numpy(np.stack([r[0] for r in rows])).float()  # (P, L, D)
    mask = torch.from_numpy(np.stack([r[1] for r in rows]))  # (P, L)
    return emb, mask, [r[2] for r in rows]


def _embedded(samples) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    for sample in samples:
        if TEXT_EMB_FIELD in sample:
            caption = sample["txt"].decode("utf-8") if "txt" in sample else ""
            yield np.load(io.BytesIO(sample[TEXT_EMB_FIELD])), np.load(io.BytesIO(sample[TEXT_MASK_FIELD])), caption
