"""Pixel-space reconstruction losses, per example."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DISTANCES = ("l1", "l2")


NORM_EPS = 1e-6


def _patch_stats(patches: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-patch mean and std: [B, N, P] -> ([B, N, 1], [B, N, 1])."""
    mean = patches.mean(axis=-1, keepdims=True)
    return mean, jnp.sqrt(patches.var(axis=-1, keepdims=True) + NORM_EPS)


def normalize_patches(patches: jax.Array) -> jax.Array:
    """Per-patch standardised targets (MAE's norm_pix_loss): [B, N, P] -> [B, N, P]."""
    mean, std = _patch_stats(patches)
    return (patches - mean) / std


def denormalize_patches(normalized: jax.Array, reference: jax.Array) -> jax.Array:
    """Inverse of ``normalize_patches`` with the statistics of ``reference`` (for display)."""
    mean, std = _patch_stats(reference)
    return normalized * std + mean


def patch_loss(pred: jax.Array, target: jax.Array, weight: jax.Array, distance: str) -> jax.Array:
    """Weighted mean distance over patches, per example.

    pred, target: [B, N, P]; weight: [B, N] (1 for patches that count). Returns [B]; an example
    with no weighted patch gets 0.
    """
    diff = pred - target
    per_patch = jnp.abs(diff) if distance == "l1" else jnp.square(diff)
    per_patch = per_patch.mean(axis=-1)  # [B, N]
    return (per_patch * weight).sum(-1) / jnp.maximum(weight.sum(-1), 1.0)
