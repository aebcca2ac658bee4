"""Pixel-space reconstruction losses, per example."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DISTANCES = ("l1", "l2")


def normalize_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per-patch standardised targets (MAE's norm_pix_loss): [B, N, P] -> [B, N, P]."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True)
    return (patches - mean) / jnp.sqrt(var + eps)


def patch_loss(pred: jax.Array, target: jax.Array, weight: jax.Array, distance: str) -> jax.Array:
    """Weighted mean distance over patches, per example.

    pred, target: [B, N, P]; weight: [B, N] (1 for patches that count). Returns [B]; an example
    with no weighted patch gets 0.
    """
    diff = pred - target
    per_patch = jnp.abs(diff) if distance == "l1" else jnp.square(diff)
    per_patch = per_patch.mean(axis=-1)  # [B, N]
    return (per_patch * weight).sum(-1) / jnp.maximum(weight.sum(-1), 1.0)
