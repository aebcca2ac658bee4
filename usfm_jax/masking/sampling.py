"""Random subsets of exact size, drawn on device: the shared core of every mask generator."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def exact_count_mask(key: jax.Array, batch: int, n: int, count: int) -> jax.Array:
    """bool [B, n] with exactly ``count`` True entries per row, a uniformly random subset.

    The entries whose random scores rank below ``count`` are chosen.
    """
    scores = jax.random.uniform(key, (batch, n))  # [B, n]
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)  # [B, n]
    return ranks < count
