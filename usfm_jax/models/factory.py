"""Builds models from the ``config.model`` section."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from usfm_jax.models.heads import LinearPixelHead, MaskedImageModel, TransformerPixelHead
from usfm_jax.models.vit import MLP_RATIOS, SIZES, VisionTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def encoder_dims(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(width, depth, heads) from ``cfg.size``, with any explicit override applied."""
    if cfg.size not in SIZES:
        raise ValueError(f"config.model.size={cfg.size!r}: expected one of {sorted(SIZES)}")
    width, depth, heads = SIZES[cfg.size]
    overrides = (cfg.get("width"), cfg.get("depth"), cfg.get("num_heads"))
    return tuple(  # type: ignore[return-value]
        default if value is None else value
        for value, default in zip(overrides, (width, depth, heads), strict=True)
    )


def create_encoder(
    cfg: ml_collections.ConfigDict, image_size: tuple[int, int], rngs: nnx.Rngs
) -> VisionTransformer:
    width, depth, heads = encoder_dims(cfg)
    return VisionTransformer(
        variant=cfg.variant,
        image_size=tuple(image_size),
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=MLP_RATIOS.get(cfg.size, 4.0),
        rel_pos=cfg.rel_pos,
        layer_scale_init=cfg.layer_scale_init,
        drop_path_rate=cfg.drop_path_rate,
        remat=cfg.remat,
        scan=cfg.scan_layers,
        attention=cfg.attention,
        dtype=DTYPES[cfg.dtype],
        rngs=rngs,
    )


def create_mim_model(
    cfg: ml_collections.ConfigDict, image_size: tuple[int, int], rngs: nnx.Rngs
) -> MaskedImageModel:
    """Encoder + the pixel head named by ``cfg.head`` ('linear' or 'transformer')."""
    encoder = create_encoder(cfg, image_size, rngs)
    common = dict(dtype=DTYPES[cfg.dtype], rngs=rngs)
    if cfg.head == "linear":
        head = LinearPixelHead(encoder.width, cfg.patch_size, cfg.out_chans, **common)
    elif cfg.head == "transformer":
        dec = cfg.decoder
        head = TransformerPixelHead(
            encoder.width,
            cfg.patch_size,
            cfg.out_chans,
            num_patches=encoder.grid[0] * encoder.grid[1],
            width=dec.width,
            depth=dec.depth,
            num_heads=dec.num_heads,
            **common,
        )
    else:
        raise ValueError(f"config.model.head={cfg.head!r}: expected 'linear' or 'transformer'")
    return MaskedImageModel(encoder, head)
