"""Time the encoder's forward and backward for several kernel choices and tilings, in one process.

The quick way to pick the Pallas kernels' tilings on a GPU: an encoder of ``--depth`` blocks
(ViT-B/16 at 224 px by default, bf16, the views of one train step's batch) compiles in seconds,
where a ``train_step.py`` line takes ~1 min. Each ``--case`` is ATTENTION[/MLP[/NORM]] and,
after a space, tilings by kernel family:

    python benchmarks/kernel_sweep.py --case cudnn --case pallas/pallas/pallas \\
        --case "pallas attention:block_q=128,warps=8" --case "cudnn/pallas mlp:block_n=256"
    python benchmarks/kernel_sweep.py --cases benchmarks/kernel_cases/gpu_vitb16.txt

Prints per case the median milliseconds of the encoder's forward + backward (every parameter's
gradient of a fixed random projection of its tokens) and that figure per block. A case that
fails to compile or run prints its error and the sweep goes on. Whole-step figures, for the
record, come from ``train_step.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.kernel_parity import build_encoder, implementation_triple, require_whole_patches
from benchmarks.train_step import (
    install_tilings,
    mlp_tiling,
    norm_tiling,
    pallas_tiling,
    require_positive,
    variant_lines,
)
from usfm_jax.models.vit import PALLAS_IMPLEMENTATIONS, SIZES

# a case's tiling prefix -> (the train_step.py option it stands for, its parser)
TILING_FAMILIES = {
    "attention": ("pallas_tiling", pallas_tiling),
    "mlp": ("mlp_tiling", mlp_tiling),
    "norm": ("norm_tiling", norm_tiling),
}


def default_tilings() -> types.SimpleNamespace:
    """No tiling given: each Pallas family at its default (for ``install_tilings``)."""
    return types.SimpleNamespace(pallas_tiling=None, mlp_tiling=None, norm_tiling=None)


def parse_case(text: str) -> tuple[tuple[str, str, str], types.SimpleNamespace]:
    """'ATTENTION[/MLP[/NORM]] [FAMILY:name=value,...]...' -> (implementations, tilings by the
    names ``train_step.install_tilings`` reads). A family's tiling applies where its kernels
    are Pallas: named "pallas" (or "pallas_backward"), or a LayerNorm "auto" (Pallas on a GPU)."""
    if not text.split():
        raise ValueError("an empty case: expected ATTENTION[/MLP[/NORM]] [FAMILY:name=value,...]")
    first, *rest = text.split()
    implementations = implementation_triple(first)
    tilings = default_tilings()
    for item in rest:
        family, sep, values = item.partition(":")
        if not sep or family not in TILING_FAMILIES:
            raise ValueError(
                f"{item!r}: a tiling is FAMILY:name=value,... with FAMILY one of "
                f"{tuple(TILING_FAMILIES)}"
            )
        name, parse = TILING_FAMILIES[family]
        kernels = implementations[tuple(TILING_FAMILIES).index(family)]
        if kernels not in PALLAS_IMPLEMENTATIONS and not (family == "norm" and kernels == "auto"):
            raise ValueError(f"{item!r}: the {family} kernels of {first!r} are not Pallas")
        if getattr(tilings, name) is not None:
            raise ValueError(f"{item!r}: a second {family} tiling in one case")
        setattr(tilings, name, parse(values))
    return implementations, tilings


def case_type(text: str) -> tuple[str, tuple[str, str, str], types.SimpleNamespace]:
    try:
        return (" ".join(text.split()), *parse_case(text))
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def time_case(model: nnx.Module, images: jax.Array, steps: int, warmup: int) -> float:
    """Median ms of one jitted forward + backward of ``model`` on ``images``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    direction = jax.random.normal(
        jax.random.key(3), jax.eval_shape(lambda m, x: m(x), model, images).shape
    )

    def loss(params, images):  # a fixed random projection: gradients that do not cancel
        tokens = nnx.merge(graphdef, params, rest)(images)
        return jnp.sum(tokens.astype(jnp.float32) * direction)

    grad = jax.jit(jax.grad(loss))
    for _ in range(warmup):
        jax.block_until_ready(grad(params, images))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(grad(params, images))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", metavar="FILE", help="a file of cases, one a line (# comments)")
    ap.add_argument(
        "--case",
        type=case_type,
        action="append",
        default=[],
        help="ATTENTION[/MLP[/NORM]] [FAMILY:name=value,...]... (repeatable)",
    )
    ap.add_argument("--size", choices=tuple(SIZES), default="base")
    ap.add_argument("--depth", type=int, default=4, help="blocks of the timed encoder")
    ap.add_argument("--batch", type=int, default=256, help="images (a dual step's views)")
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--variant", choices=("beit", "vit"), default="beit")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    if args.cases:
        try:
            args.case += [case_type(line) for line in variant_lines(args.cases)]
        except (OSError, argparse.ArgumentTypeError) as error:
            ap.error(f"--cases {args.cases}: {error}")
    if not args.case:
        ap.error("give --case or --cases")
    require_positive(ap, args, ("depth", "batch", "image", "steps"))
    require_whole_patches(ap, args.image)
    images = jax.random.uniform(jax.random.key(2), (args.batch, args.image, args.image, 3))
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}: ViT-{args.size} {args.variant} "
        f"{args.image} px, {args.depth} blocks, batch {args.batch}, bf16; forward + backward, "
        f"median of {args.steps}"
    )
    print("| case | ms | ms / block |\n|---|---|---|")
    try:
        for label, (attention, mlp, norm), tilings in args.case:
            install_tilings(tilings)
            try:
                model = build_encoder(
                    args.size, args.variant, args.image, attention, mlp, norm, jnp.bfloat16,
                    args.depth,
                )  # fmt: skip
                ms = time_case(model, images, args.steps, args.warmup)
            except Exception as error:  # a failed case is reported; the sweep goes on
                why = (str(error).strip().splitlines() or [""])[0][:160].replace("|", "/")
                print(f"| {label} | failed: {type(error).__name__}: {why} | |", flush=True)
                continue
            print(f"| {label} | {ms:.2f} | {ms / args.depth:.2f} |", flush=True)
    finally:  # the kernels' default tilings again
        install_tilings(default_tilings())


if __name__ == "__main__":
    main()
