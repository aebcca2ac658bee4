"""The fused kernels (cuDNN and Pallas attention, the Pallas MLP and LayerNorm) against XLA's in
the encoder, forward and gradient, on a GPU (elsewhere the Pallas kernels run in Pallas'
interpreter, slowly: use a small --size and --batch).

    python benchmarks/kernel_parity.py [--size base] [--batch 8] [--variant beit|vit]
        [--implementations xla,cudnn,pallas,xla/pallas,cudnn/xla/pallas,pallas/pallas/pallas]
        [--pallas-tiling bias_grad=dkv,...] [--mlp-tiling ...] [--norm-tiling ...]

Encoders with the same weights: XLA attention, MLP and LayerNorm in float32 (the reference), and
each of ``--implementations`` (ATTENTION[/MLP[/NORM]], MLP and NORM "xla" if not given) in
bfloat16. For each bf16 one, prints the relative difference (||a - ref|| / ||ref||) of the
output tokens and the largest over the parameter gradients of a fixed random projection of the
tokens. A fused path is right if it is as close to the reference as XLA's bf16 is.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.train_step import add_tiling_arguments, install_tilings, require_positive
from usfm_jax.models.vit import (
    ATTENTION_IMPLEMENTATIONS,
    MLP_IMPLEMENTATIONS,
    NORM_IMPLEMENTATIONS,
    SIZES,
    VisionTransformer,
    mlp_ratio_of,
)

PATCH_SIZE = 16  # the encoders' patch (--image must be a multiple)


def rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def implementation_triple(text: str) -> tuple[str, str, str]:
    """'ATTENTION[/MLP[/NORM]]' -> (attention, mlp, norm), MLP and NORM "xla" if not given."""
    attention, mlp, norm, *rest = [*text.split("/"), "xla", "xla"]
    if (
        rest[2:]
        or attention not in ATTENTION_IMPLEMENTATIONS
        or mlp not in MLP_IMPLEMENTATIONS
        or norm not in NORM_IMPLEMENTATIONS
    ):
        raise ValueError(
            f"{text!r} is not ATTENTION[/MLP[/NORM]] with ATTENTION from "
            f"{ATTENTION_IMPLEMENTATIONS}, MLP from {MLP_IMPLEMENTATIONS} and NORM from "
            f"{NORM_IMPLEMENTATIONS}"
        )
    return attention, mlp, norm


def build_encoder(
    size: str,
    variant: str,
    image: int,
    attention: str,
    mlp: str,
    norm: str,
    dtype,
    depth: int | None = None,
) -> VisionTransformer:
    """A ViT of a named size (``depth`` blocks if given) with the same weights for any kernels;
    the shared position-bias table non-zero, so that the bias path is exercised."""
    width, size_depth, heads = SIZES[size]
    model = VisionTransformer(
        width=width,
        depth=depth or size_depth,
        num_heads=heads,
        patch_size=PATCH_SIZE,
        mlp_ratio=mlp_ratio_of(size),
        variant=variant,
        image_size=(image, image),
        attention=attention,
        mlp=mlp,
        norm=norm,
        dtype=dtype,
        rngs=nnx.Rngs(0),
    )
    if model.rel_pos_bias is not None:
        table = model.rel_pos_bias.relative_position_bias_table
        table[...] = jax.random.normal(jax.random.key(1), table.shape)
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--variant", choices=("beit", "vit"), default="beit")
    ap.add_argument(
        "--implementations",
        default="xla,cudnn,pallas,xla/pallas,cudnn/xla/pallas,pallas/pallas/pallas",
        help="comma-separated ATTENTION[/MLP[/NORM]]",
    )
    add_tiling_arguments(ap)  # the tilings of the Pallas kernels (each family's default if not)
    args = ap.parse_args(argv)
    try:
        args.implementations = [
            implementation_triple(item) for item in args.implementations.split(",")
        ]
    except ValueError as error:
        ap.error(f"--implementations: {error}")
    require_positive(ap, args, ("batch", "image"))
    require_whole_patches(ap, args.image)
    return args


def require_whole_patches(ap: argparse.ArgumentParser, image: int) -> None:
    """Stops the benchmark with a usage error if ``--image`` is not a whole number of patches."""
    if image % PATCH_SIZE:
        ap.error(f"--image {image}: must be a multiple of the patch size {PATCH_SIZE}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    install_tilings(args)

    def build(attention: str, mlp: str, norm: str, dtype) -> VisionTransformer:
        return build_encoder(args.size, args.variant, args.image, attention, mlp, norm, dtype)

    images = jax.random.uniform(jax.random.key(2), (args.batch, args.image, args.image, 3))

    tokens_shape = jax.eval_shape(
        lambda m, x: m(x), build("xla", "xla", "xla", jnp.float32), images
    ).shape
    direction = jax.random.normal(jax.random.key(3), tokens_shape)

    def loss(model, images):  # a fixed random projection: gradients that do not cancel
        return jnp.sum(model(images).astype(jnp.float32) * direction)

    def run(model):
        tokens = nnx.jit(lambda m, x: m(x))(model, images)
        grads = jax.tree_util.tree_flatten_with_path(nnx.jit(nnx.grad(loss))(model, images))[0]
        return tokens, grads

    ref_tokens, ref_grads = run(build("xla", "xla", "xla", jnp.float32))
    print(
        f"device: {jax.devices()[0].device_kind}, ViT-{args.size} {args.variant} {args.image} px, "
        f"batch {args.batch}; relative difference to XLA in float32:"
    )
    for attention, mlp, norm in args.implementations:
        tokens, grads = run(build(attention, mlp, norm, jnp.bfloat16))
        worst = max(
            (rel(g, r), jax.tree_util.keystr(path))
            for (path, r), (_, g) in zip(ref_grads, grads, strict=True)
        )
        print(
            f"  attention {attention:6s} mlp {mlp:6s} norm {norm:6s} bf16: "
            f"tokens {rel(tokens, ref_tokens):.2e}, worst gradient {worst[0]:.2e} {worst[1]}"
        )


if __name__ == "__main__":
    main()
