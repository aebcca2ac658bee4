"""USFM's spatial-frequency dual masked image modeling objective.

Two corrupted views of a clean image are reconstructed by the same model:

* spatial: mask-patches corrupted by noise (``masking.spatial``); loss on the masked pixels (or
  all pixels);
* frequency: frequency bands removed from the 2-D FFT (``masking.frequency``); loss in pixel
  space over the whole image and/or MFM's spectral loss.

``combine`` says how a batch feeds the branches: ``both`` (every image gives one view of each
branch: 2B model inputs), ``split`` (alternate images go to alternate branches: B inputs) or
``alternate`` (the whole batch goes to one branch, switching every step). Branch losses are means
over that branch's views; the total is their weighted sum.

All of this runs on device inside the jitted step; the object itself is static configuration.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from usfm_jax.masking.frequency import BandStop, LowHighPass
from usfm_jax.masking.spatial import SpatialMasking
from usfm_jax.objectives.frequency import fft_loss
from usfm_jax.objectives.pixel import DISTANCES, normalize_patches, patch_loss
from usfm_jax.patches import patchify, unpatchify

SPATIAL, FREQUENCY = 0, 1
BRANCHES = ("spatial", "frequency")
COMBINE_MODES = ("both", "split", "alternate")


class Views(NamedTuple):
    """The model inputs of one step and what their losses compare against."""

    inputs: jax.Array  # [V, H, W, C] corrupted, normalised
    token_mask: jax.Array  # [V, N] bool: patches the encoder replaces by the mask token
    target: jax.Array  # [V, H, W, C] clean, normalised
    patch_weight: jax.Array  # [V, N] pixel-loss weight per patch
    freq_weight: jax.Array  # [V, H, W] spectral-loss weight per frequency (unshifted layout)
    branch: jax.Array  # [V] int32, SPATIAL or FREQUENCY


@dataclasses.dataclass(frozen=True, eq=False)
class DualMIM:
    """Static description of the objective; ``views`` and ``loss`` are traced in the step."""

    patch_size: int
    spatial: SpatialMasking | None
    frequency: BandStop | LowHighPass | None
    combine: str = "both"
    spatial_weight: float = 1.0
    frequency_weight: float = 1.0
    distance: str = "l1"
    spatial_loss_on: str = "masked"
    norm_pix: bool = False
    frequency_pixel_weight: float = 1.0
    frequency_fft_weight: float = 0.0
    fft_loss_on: str = "removed"
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self):
        if self.spatial is None and self.frequency is None:
            raise ValueError("at least one of the spatial and frequency branches must be enabled")
        checks = {
            "combine": (self.combine, COMBINE_MODES),
            "pixel_loss": (self.distance, DISTANCES),
            "spatial_loss_on": (self.spatial_loss_on, ("masked", "all")),
            "fft_loss_on": (self.fft_loss_on, ("removed", "all")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {allowed}")
        if self.norm_pix and self.frequency_fft_weight:
            raise ValueError(
                "norm_pix targets cannot be compared in frequency space: "
                "set frequency_fft_weight=0 or norm_pix=False"
            )
        if self.std <= 0:
            raise ValueError(f"normalization std must be > 0, got {self.std}")
        if self.combine != "both" and len(self.branches) == 1:
            raise ValueError(
                f"combine={self.combine!r} shares the batch between the spatial and the "
                f"frequency branch; only {self.branches[0]} is enabled (use 'both', or enable "
                "the other branch)"
            )

    @property
    def branches(self) -> tuple[str, ...]:
        """Names of the enabled branches."""
        return tuple(
            name
            for name, b in zip(BRANCHES, (self.spatial, self.frequency), strict=True)
            if b is not None
        )

    def num_views(self, batch: int) -> int:
        return 2 * batch if len(self.branches) == 2 and self.combine == "both" else batch

    def normalize(self, images: jax.Array) -> jax.Array:
        return (images - self.mean) / self.std

    def denormalize(self, images: jax.Array) -> jax.Array:
        return images * self.std + self.mean

    def spatial_view(self, images: jax.Array, key: jax.Array) -> Views:
        corrupted, mask = self.spatial(images, key)  # [B, H, W, C], [B, N]
        b, h, w, _ = images.shape
        weight = mask if self.spatial_loss_on == "masked" else jnp.ones_like(mask)
        token_mask = mask if self.spatial.rule == "mask_token" else jnp.zeros_like(mask)
        return Views(
            inputs=self.normalize(corrupted),
            token_mask=token_mask,
            target=self.normalize(images),
            patch_weight=weight.astype(jnp.float32),
            freq_weight=jnp.zeros((b, h, w), jnp.float32),
            branch=jnp.full((b,), SPATIAL, jnp.int32),
        )

    def frequency_view(self, images: jax.Array, key: jax.Array) -> Views:
        filtered, removed = self.frequency(images, key)  # [B, H, W, C], [B, H, W]
        b, h, w, _ = images.shape
        n = (h // self.patch_size) * (w // self.patch_size)
        freq_weight = removed if self.fft_loss_on == "removed" else jnp.ones_like(removed)
        return Views(
            inputs=self.normalize(filtered),
            token_mask=jnp.zeros((b, n), bool),
            target=self.normalize(images),
            patch_weight=jnp.ones((b, n), jnp.float32),
            freq_weight=freq_weight.astype(jnp.float32),
            branch=jnp.full((b,), FREQUENCY, jnp.int32),
        )

    def views(self, images: jax.Array, key: jax.Array, step: jax.Array) -> Views:
        """Clean images [B, H, W, C] in [0, 1] -> the step's model inputs and targets.

        With two branches, views alternate spatial / frequency along the batch axis (``both``:
        both views of image i at 2i and 2i + 1; ``split``: image i gets branch i % 2). The
        interleaving keeps each device's views on that device: no cross-device shuffle.
        """
        k_spatial, k_frequency = jax.random.split(key)
        if self.frequency is None:
            return self.spatial_view(images, k_spatial)
        if self.spatial is None:
            return self.frequency_view(images, k_frequency)
        if self.combine == "alternate":  # one branch per step: only that one is computed
            return jax.lax.cond(
                step % 2 == 0,
                lambda: self.spatial_view(images, k_spatial),
                lambda: self.frequency_view(images, k_frequency),
            )
        if self.combine == "both":
            spatial = self.spatial_view(images, k_spatial)
            frequency = self.frequency_view(images, k_frequency)
        else:  # split: even images to the spatial branch, odd ones to the frequency branch
            pairs = images.reshape(-1, 2, *images.shape[1:])  # [B / 2, 2, H, W, C]
            spatial = self.spatial_view(pairs[:, 0], k_spatial)
            frequency = self.frequency_view(pairs[:, 1], k_frequency)
        return jax.tree.map(
            lambda a, b: jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:]), spatial, frequency
        )

    def branch_counts(self, views: Views) -> jax.Array:
        """[2] number of views per branch (spatial, frequency)."""
        return jnp.stack([(views.branch == i).sum() for i in (SPATIAL, FREQUENCY)])

    def loss(
        self, pred: jax.Array, views: Views, counts: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Total loss and per-branch sums for predicted patches ``pred`` [V, N, P].

        ``counts`` are the branch sizes of the whole step (not of this micro-batch), so that the
        losses of micro-batches add up to the loss of the full batch.
        """
        target = patchify(views.target, self.patch_size)  # [V, N, P]
        if self.norm_pix:
            target = normalize_patches(target)
        per_view = patch_loss(pred, target, views.patch_weight, self.distance)  # [V]
        is_frequency = views.branch == FREQUENCY
        if self.frequency is not None:
            per_view = jnp.where(is_frequency, self.frequency_pixel_weight * per_view, per_view)
            if self.frequency_fft_weight:
                grid = (
                    views.target.shape[1] // self.patch_size,
                    views.target.shape[2] // self.patch_size,
                )
                # against the clean image (norm_pix targets are rejected with a spectral loss)
                spectral = fft_loss(
                    unpatchify(pred, self.patch_size, grid), views.target, views.freq_weight
                )
                per_view = per_view + jnp.where(
                    is_frequency, self.frequency_fft_weight * spectral, 0
                )
        weights = jnp.array([self.spatial_weight, self.frequency_weight])
        sums = jnp.stack([jnp.where(views.branch == i, per_view, 0).sum() for i in (0, 1)])
        total = (weights * sums / jnp.maximum(counts, 1)).sum()
        metrics = {f"loss_{name}": sums[i] for i, name in enumerate(BRANCHES)}
        return total, metrics


def create_spatial(config: ml_collections.ConfigDict) -> SpatialMasking | None:
    """The spatial branch's masking, or None when ``config.spatial.enabled`` is False."""
    s = config.spatial
    if not s.enabled:
        return None
    return SpatialMasking(
        image_size=tuple(config.image_size),
        patch_size=config.model.patch_size,
        mask_patch_size=s.mask_patch_size,
        ratio=s.ratio,
        rule=s.rule,
        sigma=s.sigma,
    )


def create_frequency(config: ml_collections.ConfigDict) -> BandStop | LowHighPass | None:
    """The frequency branch's masking, or None when ``config.frequency.enabled`` is False."""
    f = config.frequency
    if not f.enabled:
        return None
    image_size = tuple(config.image_size)
    if f.kind == "band_stop":
        return BandStop.create(
            image_size,
            ratio=f.ratio,
            center_protect=f.center_protect,
            base_bw=f.base_bw,
            increase_factor=f.increase_factor,
            max_increase=f.max_increase,
            output=f.output,
        )
    if f.kind == "low_high_pass":
        return LowHighPass(
            size=image_size, radius=f.radius, p_low=f.p_low, output=f.output, clip=f.clip
        )
    raise ValueError(f"kind={f.kind!r}: expected 'band_stop' or 'low_high_pass'")


def create_objective(
    config: ml_collections.ConfigDict,
    spatial: SpatialMasking | None = None,
    frequency: BandStop | LowHighPass | None = None,
) -> DualMIM:
    """Builds the objective from a run config (sections spatial, frequency, objective)."""
    o = config.objective
    return DualMIM(
        patch_size=config.model.patch_size,
        spatial=spatial if spatial is not None else create_spatial(config),
        frequency=frequency if frequency is not None else create_frequency(config),
        combine=o.combine,
        spatial_weight=o.spatial_weight,
        frequency_weight=o.frequency_weight,
        distance=o.pixel_loss,
        spatial_loss_on=o.spatial_loss_on,
        norm_pix=o.norm_pix,
        frequency_pixel_weight=o.frequency_pixel_weight,
        frequency_fft_weight=o.frequency_fft_weight,
        fft_loss_on=o.fft_loss_on,
        mean=config.normalization.mean,
        std=config.normalization.std,
    )
