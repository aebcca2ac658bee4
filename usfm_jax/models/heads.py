"""Pixel-reconstruction heads: encoder tokens -> the pixels of each patch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from usfm_jax.models.vit import Block, dense, layer_norm, trunc_normal


class LinearPixelHead(nnx.Module):
    """SimMIM's head: one linear map from each token to its patch's pixels."""

    def __init__(
        self, dim: int, patch_size: int, out_chans: int, *, dtype: DTypeLike, rngs: nnx.Rngs
    ):
        self.proj = dense(dim, patch_size * patch_size * out_chans, dtype, rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, N, D] -> [B, N, P]
        return self.proj(tokens)


class TransformerPixelHead(nnx.Module):
    """A light transformer decoder (plain ViT blocks with their own position embedding)."""

    def __init__(
        self,
        dim: int,
        patch_size: int,
        out_chans: int,
        *,
        num_patches: int,
        width: int,
        depth: int,
        num_heads: int,
        dtype: DTypeLike,
        rngs: nnx.Rngs,
    ):
        self.embed = dense(dim, width, dtype, rngs)
        self.pos_embed = nnx.Param(trunc_normal(rngs.params(), (1, num_patches, width)))
        self.blocks = nnx.List(
            [Block(width, num_heads, variant="vit", dtype=dtype, rngs=rngs) for _ in range(depth)]
        )
        self.norm = layer_norm(width, dtype, rngs)
        self.proj = dense(width, patch_size * patch_size * out_chans, dtype, rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, N, D] -> [B, N, P]
        x = self.embed(tokens) + self.pos_embed[...].astype(tokens.dtype)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x))


class MaskedImageModel(nnx.Module):
    """Encoder + pixel head: (corrupted) images -> predicted pixels of every patch [B, N, P]."""

    def __init__(self, encoder: nnx.Module, head: nnx.Module):
        self.encoder = encoder
        self.head = head

    def __call__(
        self,
        images: jax.Array,
        mask: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        tokens = self.encoder(images, mask, dropout_key=dropout_key)
        return self.head(tokens[:, 1:]).astype(jnp.float32)
