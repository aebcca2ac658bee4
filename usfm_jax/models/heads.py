"""Heads of the pre-training model: encoder tokens -> the pixels of each patch (USFM), or ->
a teacher's features of each patch (URFM), from all tokens (SimMIM) or from the visible ones
through a decoder with mask tokens (MAE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from usfm_jax.models.vit import Block, dense, layer_norm, trunc_normal


def plain_blocks(width: int, depth: int, num_heads: int, dtype: DTypeLike, rngs: nnx.Rngs):
    """``depth`` plain ViT blocks: the body of the decoders below."""
    return nnx.List(
        [Block(width, num_heads, variant="vit", dtype=dtype, rngs=rngs) for _ in range(depth)]
    )


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
        self.blocks = plain_blocks(width, depth, num_heads, dtype, rngs)
        self.norm = layer_norm(width, dtype, rngs)
        self.proj = dense(width, patch_size * patch_size * out_chans, dtype, rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, N, D] -> [B, N, P]
        x = self.embed(tokens) + self.pos_embed[...].astype(tokens.dtype)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x))


class FeatureDecoder(nnx.Module):
    """MAE's decoder: the encoder's visible tokens, scattered among mask tokens at their
    positions, through plain ViT blocks -> features of every patch [B, N, E]."""

    def __init__(
        self,
        dim: int,
        features: int,
        *,
        num_patches: int,
        width: int,
        depth: int,
        num_heads: int,
        dtype: DTypeLike,
        rngs: nnx.Rngs,
    ):
        self.embed = dense(dim, width, dtype, rngs)
        self.mask_token = nnx.Param(trunc_normal(rngs.params(), (1, 1, width)))
        self.pos_embed = nnx.Param(trunc_normal(rngs.params(), (1, 1 + num_patches, width)))
        self.blocks = plain_blocks(width, depth, num_heads, dtype, rngs)
        self.norm = layer_norm(width, dtype, rngs)
        self.proj = dense(width, features, dtype, rngs)

    def __call__(self, tokens: jax.Array, keep: jax.Array) -> jax.Array:
        """tokens [B, 1 + K, D] (cls, then the patches ``keep`` [B, K]) -> [B, N, E]."""
        x = self.embed(tokens)  # [B, 1 + K, W]
        b, n = x.shape[0], self.pos_embed.shape[1] - 1
        full = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, n, x.shape[-1]))
        full = full.at[jnp.arange(b)[:, None], keep].set(x[:, 1:])  # [B, N, W]
        x = jnp.concatenate([x[:, :1], full], axis=1) + self.pos_embed[...].astype(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x)[:, 1:])


class MaskedImageModel(nnx.Module):
    """Encoder + the heads its objectives need: ``head`` predicts pixels (USFM's branches),
    ``feature_head`` a teacher's features (URFM): a ``FeatureDecoder`` (MAE) or a linear map
    (SimMIM). Either may be None."""

    def __init__(
        self, encoder: nnx.Module, head: nnx.Module | None, feature_head: nnx.Module | None = None
    ):
        self.encoder = encoder
        self.head = head
        self.feature_head = feature_head

    def __call__(
        self,
        images: jax.Array,
        mask: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Predicted pixels of every patch [B, N, P]."""
        tokens = self.encoder(images, mask, dropout_key=dropout_key)
        return self.head(tokens[:, 1:]).astype(jnp.float32)

    def features(
        self,
        images: jax.Array,
        mask: jax.Array | None = None,
        keep: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Predicted teacher features of every patch [B, N, E]: MAE-style from the patches
        ``keep`` alone, or SimMIM-style from all patches with ``mask`` ones replaced."""
        if keep is not None:
            tokens = self.encoder(images, keep=keep, dropout_key=dropout_key)
            return self.feature_head(tokens, keep).astype(jnp.float32)
        tokens = self.encoder(images, mask, dropout_key=dropout_key)
        return self.feature_head(tokens[:, 1:]).astype(jnp.float32)
