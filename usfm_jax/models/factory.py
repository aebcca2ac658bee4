"""Builds models from the ``config.model`` section."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from usfm_jax.models.heads import (
    FeatureDecoder,
    LinearPixelHead,
    MaskedImageModel,
    TransformerPixelHead,
)
from usfm_jax.models.vit import SIZES, VisionTransformer, dense, mlp_ratio_of

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
        mlp_ratio=mlp_ratio_of(cfg.size),
        rel_pos=cfg.rel_pos,
        layer_scale_init=cfg.layer_scale_init,
        drop_path_rate=cfg.drop_path_rate,
        remat=cfg.remat,
        scan=cfg.scan_layers,
        attention=cfg.attention,
        mlp=cfg.mlp,
        norm=cfg.norm,
        dtype=DTYPES[cfg.dtype],
        rngs=rngs,
    )


def create_pixel_head(
    cfg: ml_collections.ConfigDict, encoder: VisionTransformer, rngs: nnx.Rngs
) -> nnx.Module:
    """The pixel head named by ``cfg.head`` ('linear' or 'transformer')."""
    common = dict(dtype=DTYPES[cfg.dtype], rngs=rngs)
    if cfg.head == "linear":
        return LinearPixelHead(encoder.width, cfg.patch_size, cfg.out_chans, **common)
    if cfg.head == "transformer":
        dec = cfg.decoder
        return TransformerPixelHead(
            encoder.width,
            cfg.patch_size,
            cfg.out_chans,
            num_patches=encoder.grid[0] * encoder.grid[1],
            width=dec.width,
            depth=dec.depth,
            num_heads=dec.num_heads,
            **common,
        )
    raise ValueError(f"config.model.head={cfg.head!r}: expected 'linear' or 'transformer'")


def create_mim_model(
    cfg: ml_collections.ConfigDict, image_size: tuple[int, int], rngs: nnx.Rngs
) -> MaskedImageModel:
    """Encoder + the pixel head named by ``cfg.head`` ('linear' or 'transformer')."""
    encoder = create_encoder(cfg, image_size, rngs)
    return MaskedImageModel(encoder, create_pixel_head(cfg, encoder, rngs))


def create_pretrain_model(
    config: ml_collections.ConfigDict, rngs: nnx.Rngs, features: int | None = None
) -> MaskedImageModel:
    """The model a run trains: encoder, pixel head if a pixel branch (spatial, frequency) is
    on, and a feature head predicting ``features``-wide teacher features if
    ``config.representation`` is on (MAE decoder or SimMIM's linear map)."""
    encoder = create_encoder(config.model, tuple(config.image_size), rngs)
    pixel = config.spatial.enabled or config.frequency.enabled
    head = create_pixel_head(config.model, encoder, rngs) if pixel else None
    feature_head = None
    r = config.get("representation")
    if r is not None and r.enabled:
        if features is None:
            raise ValueError("the representation objective needs the teacher's feature width")
        dtype = DTYPES[config.model.dtype]
        if r.student == "mae":
            feature_head = FeatureDecoder(
                encoder.width,
                features,
                num_patches=encoder.grid[0] * encoder.grid[1],
                width=r.decoder.width,
                depth=r.decoder.depth,
                num_heads=r.decoder.num_heads,
                dtype=dtype,
                rngs=rngs,
            )
        else:
            feature_head = dense(encoder.width, features, dtype, rngs)
    return MaskedImageModel(encoder, head, feature_head)
