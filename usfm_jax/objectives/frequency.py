"""Frequency-space reconstruction loss of Masked Frequency Modeling (Xie et al., 2023)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from usfm_jax.parallel import per_batch_shard


@per_batch_shard  # XLA does not split FFTs over the batch by itself
def fft_loss(pred: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean spectral distance per example.

    pred, target: [B, H, W, C] images; weight: [B, H, W] (1 for the frequencies that count, in the
    unshifted np.fft layout). The distance is |FFT(pred) - FFT(target)| with the orthonormal FFT,
    averaged over channels and the weighted frequencies. Returns [B].
    """
    axes = (1, 2)
    diff = jnp.fft.fft2(pred.astype(jnp.float32), axes=axes, norm="ortho") - jnp.fft.fft2(
        target.astype(jnp.float32), axes=axes, norm="ortho"
    )
    dist = jnp.abs(diff).mean(axis=-1)  # [B, H, W]
    return (dist * weight).sum((1, 2)) / jnp.maximum(weight.sum((1, 2)), 1.0)
