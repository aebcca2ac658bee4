"""Command line of the converter: ``python -m usfm_jax.convert {to-torch,from-torch} ...``."""

from __future__ import annotations

import argparse
import logging
import sys

from usfm_jax.checkpoint import CheckpointError
from usfm_jax.cli import exit_on_ctrl_c, incomplete
from usfm_jax.convert import (
    FROM_TORCH,
    TO_TORCH,
    ConversionError,
    checkpoint_to_torch,
    torch_to_export,
)
from usfm_jax.export import EMA_CHOICES
from usfm_jax.reporting import quiet_library_logs


def _image_size(text: str) -> tuple[int, int]:
    try:
        sizes = [int(x) for x in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or HxW, e.g. 512") from None
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or HxW, e.g. 512")
    return (sizes[0], sizes[-1])


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m usfm_jax.convert",
        description="Convert usfm_jax checkpoints to PyTorch weights (timm, USFM) and back.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--image-size", type=_image_size, help="resample position tables for N or HxW inputs"
    )
    common.add_argument("--in-chans", type=int, choices=(1, 3), help="fold the patch embedding")
    common.add_argument(
        "--normalization",
        help="input normalisation of the result: imagenet | clip | inception | MEAN/STD "
        "(per channel, comma-separated); the patch embedding is re-expressed, exact for gray "
        "images",
    )

    to = sub.add_parser(
        "to-torch", parents=[common], help="checkpoint or export -> PyTorch state dict + card"
    )
    to.add_argument("--checkpoint", required=True, help="workdir, step directory or export")
    to.add_argument("--step", type=int, help="step to convert (default: the newest)")
    to.add_argument(
        "--ema",
        choices=tuple(EMA_CHOICES),
        default="auto",
        help="convert the EMA weights: auto (default: if the run kept them), yes, no",
    )
    to.add_argument("--format", required=True, choices=TO_TORCH)
    to.add_argument("--out", required=True, help="new FILE.safetensors (or .pth); card FILE.json")

    back = sub.add_parser(
        "from-torch", parents=[common], help="PyTorch state dict -> export directory"
    )
    back.add_argument("--weights", required=True, help=".safetensors, .pth, .pt or .bin file")
    back.add_argument(
        "--format", default="auto", choices=(*FROM_TORCH, "auto"), help="default: auto (detected)"
    )
    back.add_argument("--out", required=True, help="new export directory")
    back.add_argument(
        "--num-heads", type=int, help="heads of a plain ViT, if no card says (default: width's)"
    )
    back.add_argument(
        "--source-image-size",
        type=_image_size,
        help="N or HxW the weights were made for, if no card says (default: a square grid)",
    )
    back.add_argument(
        "--input-normalization",
        help="the weights' own input normalisation if no card says it (default: the format's)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_library_logs(logging.ERROR)
    options = dict(
        image_size=args.image_size, in_chans=args.in_chans, normalization=args.normalization
    )
    try:
        if args.command == "to-torch":
            card = checkpoint_to_torch(
                args.checkpoint,
                args.format,
                args.out,
                step=args.step,
                weights=EMA_CHOICES[args.ema],
                **options,
            )
            arch = card["architecture"]
            print(
                f"wrote {args.out} ({args.format}: {arch['variant']} {arch['width']}x"
                f"{arch['depth']}, {card['image_size'][0]}x{card['image_size'][1]}, "
                f"{card['in_chans']} channel(s)) and its card"
            )
            lines = card["adapted"] + [f"not converted: {', '.join(card['not_converted'])}"]
        else:
            info = torch_to_export(
                args.weights,
                args.format,
                args.out,
                num_heads=args.num_heads,
                source_image_size=args.source_image_size,
                input_normalization=args.input_normalization,
                **options,
            )
            print(f"wrote {args.out}: {info['num_params']:,} parameters ({info['format']})")
            lines = info["notes"]
    except (ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in lines:
        print(f"  - {line}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_ctrl_c(main, lambda: incomplete("--out")))
