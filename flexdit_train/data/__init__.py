"""Data: shard writers, WebDataset readers as LightningDataModules, skip monitoring.

Every batch is ``{"x": float32 (N, C, H, W) or video (N, C, F, H, W) in model space, "y": int64 (N,),
"key": list[str]}``; caption-embedding batches carry ``text_emb``/``text_mask`` instead of ``y``.
Configs live in ``conf/data/``; the CLI is ``python -m flexdit_train.shards``. Names are imported
lazily, so writers, ``verify`` and VAE helpers do not pay for importing Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "CaptionEmbeddingsWdsDataModule": "captions",
    "DataSkipMonitor": "monitor",
    "ImageWdsDataModule": "images",
    "LatentsWdsDataModule": "latents",
    "MNISTDataModule": "mnist",
    "ShardSet": "index",
    "StreamDataModule": "base",
    "SyntheticDataModule": "synthetic",
    "VideoWdsDataModule": "video",
    "WdsDataModule": "base",
    "adm_center_crop": "media",
    "encode_latent_shards": "encode",
    "encode_text_shards": "text",
    "ensure_mnist_shards": "mnist",
    "resolve_shards": "index",
    "verify_shards": "verify",
    "write_image_shards": "writers",
    "write_mnist_shards": "mnist",
    "write_video_shards": "writers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
