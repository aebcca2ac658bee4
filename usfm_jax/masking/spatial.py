"""Spatial masking for USFM's noise addition-recovery branch, generated on device.

A random subset of mask-patches (squares whose side is a multiple of the model's patch size, 32 px
by default as in SimMIM) is chosen per image, exactly ``ceil(ratio * num_mask_patches)`` of them
(SimMIM's count). The masked regions are corrupted by one rule:

* ``gaussian``: additive Gaussian noise of std ``sigma`` (the noise-addition of USFM);
* ``speckle``: multiplicative noise, x * (1 + sigma * n), the statistics of ultrasound speckle;
* ``replace``: replaced by uniform noise in [0, 1];
* ``mean``: filled with the image mean (the fill of the block-wise generator USFM's code
  keeps; here on the same random mask-patches, not BEiT's random rectangles);
* ``mask_token``: pixels untouched; the encoder swaps masked patch embeddings for a learned
  mask token (the SimMIM ablation).

Images are intensities in [0, 1]; the model input is normalised after corruption.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from usfm_jax.masking.sampling import exact_count_mask

RULES = ("gaussian", "speckle", "replace", "mean", "mask_token")


@dataclasses.dataclass(frozen=True)
class SpatialMasking:
    image_size: tuple[int, int]
    patch_size: int
    mask_patch_size: int = 32
    ratio: float = 0.6
    rule: str = "gaussian"
    sigma: float = 0.5

    def __post_init__(self):
        h, w = self.image_size
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {self.ratio}")
        if self.mask_patch_size % self.patch_size:
            raise ValueError(
                f"mask_patch_size {self.mask_patch_size} must be a multiple of the model "
                f"patch size {self.patch_size}"
            )
        if h % self.mask_patch_size or w % self.mask_patch_size:
            raise ValueError(
                f"image size {self.image_size} is not a multiple of mask_patch_size "
                f"{self.mask_patch_size}"
            )
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    @property
    def grid(self) -> tuple[int, int]:
        """Mask-patch grid (rows, cols)."""
        return self.image_size[0] // self.mask_patch_size, self.image_size[
            1
        ] // self.mask_patch_size

    @property
    def num_masked(self) -> int:
        return math.ceil(self.ratio * self.grid[0] * self.grid[1])

    def sample(self, key: jax.Array, batch: int) -> jax.Array:
        """bool [B, gh, gw] over mask-patches, exactly ``num_masked`` True per image."""
        gh, gw = self.grid
        return exact_count_mask(key, batch, gh * gw, self.num_masked).reshape(batch, gh, gw)

    def token_mask(self, mask: jax.Array) -> jax.Array:
        """Mask-patch mask [B, gh, gw] -> model-patch mask [B, N]."""
        s = self.mask_patch_size // self.patch_size
        up = jnp.repeat(jnp.repeat(mask, s, axis=1), s, axis=2)
        return up.reshape(mask.shape[0], -1)

    def pixel_mask(self, mask: jax.Array) -> jax.Array:
        """Mask-patch mask [B, gh, gw] -> pixel mask [B, H, W, 1]."""
        s = self.mask_patch_size
        return jnp.repeat(jnp.repeat(mask, s, axis=1), s, axis=2)[..., None]

    def corrupt(self, images: jax.Array, mask: jax.Array, key: jax.Array) -> jax.Array:
        """Applies the rule inside the masked regions; pixels outside them are returned as is."""
        if self.rule == "mask_token":
            return images
        noise_shape = images.shape
        if self.rule == "gaussian":
            corrupted = images + self.sigma * jax.random.normal(key, noise_shape, images.dtype)
        elif self.rule == "speckle":
            corrupted = images * (
                1 + self.sigma * jax.random.normal(key, noise_shape, images.dtype)
            )
        elif self.rule == "replace":
            corrupted = jax.random.uniform(key, noise_shape, images.dtype)
        else:  # mean
            corrupted = jnp.broadcast_to(images.mean(axis=(1, 2, 3), keepdims=True), noise_shape)
        return jnp.where(self.pixel_mask(mask), corrupted, images)

    def __call__(self, images: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, C] -> (corrupted images, model-patch mask [B, N] bool)."""
        k_mask, k_noise = jax.random.split(key)
        mask = self.sample(k_mask, images.shape[0])
        return self.corrupt(images, mask, k_noise), self.token_mask(mask)
