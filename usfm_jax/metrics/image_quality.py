"""Image-quality metrics for enhancement, in JAX (they run on device, batched): PSNR and SSIM.

Images are [B, H, W] or [B, H, W, 1] in [0, ``data_range``]. SSIM is Wang et al.'s with a
Gaussian window (sigma 1.5, truncated at 3.5 sigma: 11 x 11), population statistics, edges
reflected and a border of the window's radius left out of the mean: scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SIGMA, TRUNCATE, K1, K2 = 1.5, 3.5, 0.01, 0.03


def _as_bhw(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x[..., 0] if x.ndim == 4 else x


def psnr(predicted: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Per image [B], in dB."""
    p, t = _as_bhw(predicted), _as_bhw(target)
    mse = jnp.mean(jnp.square(p - t), axis=(1, 2))
    return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_window() -> np.ndarray:
    radius = int(TRUNCATE * SIGMA + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / SIGMA) ** 2)
    return (w / w.sum()).astype(np.float32)


def _blur(x: jax.Array) -> jax.Array:
    """Separable Gaussian filter of [B, H, W] with reflected edges (scipy's 'reflect')."""
    w = jnp.asarray(_gaussian_window())
    r = (w.shape[0] - 1) // 2
    x = jnp.pad(x, ((0, 0), (r, r), (r, r)), mode="symmetric")
    x = jax.vmap(lambda img: jax.scipy.signal.convolve2d(img, w[:, None], mode="valid"))(x)
    return jax.vmap(lambda img: jax.scipy.signal.convolve2d(img, w[None, :], mode="valid"))(x)


def ssim(predicted: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Per image [B], the mean structural similarity."""
    x, y = _as_bhw(predicted), _as_bhw(target)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mx, my = _blur(x), _blur(y)
    vx = _blur(x * x) - mx * mx
    vy = _blur(y * y) - my * my
    cov = _blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    r = (_gaussian_window().shape[0] - 1) // 2
    return s[:, r:-r, r:-r].mean(axis=(1, 2))
