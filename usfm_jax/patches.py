"""Conversions between images and per-patch pixel vectors (the pixel head's output layout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, N, patch * patch * C], patches in row-major grid order."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return jnp.transpose(x, (0, 1, 3, 2, 4, 5)).reshape(b, (h // patch) * (w // patch), -1)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int]) -> jax.Array:
    """[B, N, patch * patch * C] -> [B, H, W, C]; the inverse of ``patchify``."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, -1)
    return jnp.transpose(x, (0, 1, 3, 2, 4, 5)).reshape(b, gh * patch, gw * patch, -1)
