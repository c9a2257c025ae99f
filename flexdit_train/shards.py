"""Write and check WebDataset shards: ``python -m flexdit_train.shards {imagefolder,video,latents,text-embeddings,mnist,verify}``.

Examples::

    python -m flexdit_train.shards imagefolder /data/imagenet/train /data/wds/imagenet --prefix train
    python -m flexdit_train.shards imagefolder /data/imagenet/val.csv /data/wds/imagenet --prefix val \\
        --classes /data/wds/imagenet/train.json
    python -m flexdit_train.shards video /data/ucf101/train.csv /data/wds/ucf --frame-stride 2 --size 128
    python -m flexdit_train.shards latents /data/wds/imagenet/train.json /data/wds/in256-latents \\
        --vae /models/sd-vae-ft-ema --image-size 256 --workers 8 --device cuda
    python -m flexdit_train.shards imagefolder /data/sam/captions.csv /data/wds/sam --prefix train
    python -m flexdit_train.shards text-embeddings /data/wds/sam/train.json /data/wds/sam-t5 \\
        --encoder /models/t5-v1_1-xxl-encoder --max-length 120 --device cuda
    python -m flexdit_train.shards mnist /data/wds/mnist
    python -m flexdit_train.shards verify /data/wds/imagenet/train.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from flexdit_train.runtime.errors import exit_on_user_error


def _common(parser: argparse.ArgumentParser, maxcount: int) -> None:
    parser.add_argument("--prefix", default="train", help="shard names OUT/{prefix}-000000.tar and index OUT/{prefix}.json")
    parser.add_argument("--maxcount", type=int, default=maxcount, help="samples per shard at most")
    parser.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle before writing")
    parser.add_argument("--classes", default=None,
                        help="class names -> ids from this index JSON or names file (e.g. val with train's ids)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flexdit_train.shards",
        description="Write and check WebDataset shards.",
        epilog=__doc__[__doc__.index("Examples"):],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an input error too")
    commands = parser.add_subparsers(dest="command", required=True)

    images = commands.add_parser("imagefolder", help="class-per-folder tree or CSV list (path,label|caption) -> image shards")
    images.add_argument("src", help="SRC/<class>/<image> tree, or a CSV/TSV file with 'path' and 'label' and/or 'caption'")
    images.add_argument("out", help="output directory")
    _common(images, 1000)

    video = commands.add_parser("video", help="class-per-folder tree or CSV list (path,label|caption) -> mp4 shards")
    video.add_argument("src", help="SRC/<class>/<video> tree, or a CSV/TSV file with 'path' and 'label' and/or 'caption'")
    video.add_argument("out", help="output directory")
    _common(video, 100)
    video.add_argument("--frame-stride", type=int, default=1, help="keep every k-th frame (re-encodes)")
    video.add_argument("--max-frames", type=int, default=None, help="keep at most this many frames (re-encodes)")
    video.add_argument("--size", type=int, default=None, help="resize the short side to this many pixels (re-encodes)")

    latents = commands.add_parser("latents", help="image shards -> VAE moment shards (resumable)")
    latents.add_argument("shards", nargs="+", help="image shard set: index JSON, brace/glob pattern, or .tar paths")
    latents.add_argument("out", help="output directory (rerun to resume)")
    latents.add_argument("--vae", required=True,
                         help="local AutoencoderKL directory, weights file (diffusers keys) or config JSON (random weights)")
    latents.add_argument("--vae-config", default=None, help="architecture for a weights file (default: the SD-VAE config)")
    latents.add_argument("--image-size", type=int, default=256, help="ADM center crop size before encoding")
    latents.add_argument("--batch-size", type=int, default=32, help="images per VAE call (x2 with the flips)")
    latents.add_argument("--workers", type=int, default=1, help="processes, one VAE each; shards are spread over them")
    latents.add_argument("--device", default="cpu", help="cpu or cuda (workers round-robin over the visible GPUs)")
    latents.add_argument("--scale-factor", type=float, default=None, help="override the VAE config's scaling_factor")
    latents.add_argument("--prefix", default=None, help="index name OUT/{prefix}.json (default: the input's prefix)")
    latents.add_argument("--std-tolerance", type=float, default=0.3, help="warn when |scaled latent std - 1| exceeds this")

    text = commands.add_parser("text-embeddings", help="caption shards -> the same shards + text-encoder states (resumable)")
    text.add_argument("shards", nargs="+",
                      help="caption shard set (images, latents or videos with txt): index JSON, brace/glob pattern, or .tar paths")
    text.add_argument("out", help="output directory (rerun to resume)")
    text.add_argument("--encoder", required=True,
                      help="local transformers encoder directory with its tokenizer (save_pretrained), e.g. a T5 encoder")
    text.add_argument("--max-length", type=int, default=120, help="tokens per caption: padded or truncated (PixArt: 120)")
    text.add_argument("--batch-size", type=int, default=64, help="captions per encoder call")
    text.add_argument("--device", default="cpu", help="cpu or cuda")
    text.add_argument("--prefix", default=None, help="index name OUT/{prefix}.json (default: the input's prefix)")

    mnist = commands.add_parser("mnist", help="the bundled MNIST digits -> OUT/train-*.tar, OUT/val-*.tar")
    mnist.add_argument("out", help="output directory")

    verify = commands.add_parser("verify", help="count samples; find truncated shards, duplicate or split keys")
    verify.add_argument("shards", nargs="+",
                        help="shard set: index JSON, brace/glob pattern, or .tar paths (e.g. the shell's out/*.tar)")
    verify.add_argument("--json", default=None, help="also write the report to this JSON file")
    return parser


def _describe(index: dict) -> str:
    classes = f", {index['num_classes']} classes" if index.get("num_classes") else ""
    return f"wrote {index['total']} samples in {len(index['shards'])} shards{classes}"


def shard_spec(paths: list[str]) -> str | list[str]:
    """One argument stays a spec (index JSON or pattern); several are the shard paths themselves."""
    return paths[0] if len(paths) == 1 else paths


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (verify: 1 when the set is damaged). Input errors are one line
    on stderr and exit code 2 (``--verbose`` adds the traceback)."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["FLEXDIT_VERBOSE"] = "1"
    try:
        return run(args)
    except Exception as err:
        exit_on_user_error(err, show_traceback="--verbose")
        raise


def run(args: argparse.Namespace) -> int:
    if args.command == "imagefolder":
        from flexdit_train.data.writers import write_image_shards

        index = write_image_shards(args.src, args.out, prefix=args.prefix, maxcount=args.maxcount,
                                   maxsize=args.maxsize, seed=args.seed, classes=args.classes)
        print(f"{_describe(index)} to {args.out}/{args.prefix}.json")
    elif args.command == "video":
        from flexdit_train.data.writers import write_video_shards

        index = write_video_shards(args.src, args.out, prefix=args.prefix, maxcount=args.maxcount, maxsize=args.maxsize,
                                   seed=args.seed, frame_stride=args.frame_stride, max_frames=args.max_frames, size=args.size,
                                   classes=args.classes)
        print(f"{_describe(index)} to {args.out}/{args.prefix}.json")
    elif args.command == "latents":
        from flexdit_train.data.encode import encode_latent_shards

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *a, **k: print(f"WARNING: {message}", file=sys.stderr)
            index = encode_latent_shards(
                shard_spec(args.shards), args.out, vae=args.vae, vae_config=args.vae_config, image_size=args.image_size,
                batch_size=args.batch_size, workers=args.workers, device=args.device, scale_factor=args.scale_factor,
                prefix=args.prefix, std_tolerance=args.std_tolerance,
            )
        print(f"{_describe(index)} of {index['latent_shape']} latents to {args.out}/{index['prefix']}.json")
    elif args.command == "text-embeddings":
        from flexdit_train.data.text import encode_text_shards

        index = encode_text_shards(shard_spec(args.shards), args.out, encoder=args.encoder, max_length=args.max_length,
                                   batch_size=args.batch_size, device=args.device, prefix=args.prefix)
        print(f"{_describe(index)} with {index['text_len']}x{index['text_channels']} caption embeddings "
              f"to {args.out}/{index['prefix']}.json")
    elif args.command == "mnist":
        from flexdit_train.data.mnist import write_mnist_shards

        for name, index in write_mnist_shards(args.out).items():
            print(f"{name}: {_describe(index)} to {args.out}/{name}.json")
    else:
        from flexdit_train.data.verify import verify_shards

        report = verify_shards(shard_spec(args.shards))
        print(report.summary())
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"ok": report.ok, "samples": report.samples, "problems": report.problems,
                           "shards": [{"url": s.url, "samples": s.samples, "problems": s.problems} for s in report.shards]},
                          fh, indent=1)
        return 0 if report.ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
