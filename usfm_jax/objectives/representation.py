"""URFM's representation-based masked image modeling: predict a frozen teacher's features.

The student sees the image with patches masked and predicts, for every patch (or the masked
ones), the teacher's feature of that patch computed on the clean image. Two students:

* ``mae``: the encoder sees the visible patches only (exactly ``ceil(ratio x units)`` mask
  units masked, each (mask_patch_size / patch_size)^2 patches, so shapes are static); a decoder
  with mask tokens predicts every position (URFM's release).
* ``simmim``: the encoder sees every patch, the masked ones as the mask token; a linear head.

Masks are drawn per mask-unit of ``mask_patch_size`` pixels: the model patch (random) or larger
squares (block-wise). Targets are normalised per token (LayerNorm without affine, L2 or none);
the loss is smooth-L1 (with ``beta``), cosine distance or MSE per token, averaged over the
weighted tokens of each image, then over the images.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from usfm_jax.masking.spatial import SpatialMasking

STUDENTS = ("mae", "simmim")
TARGET_NORMS = ("layernorm", "l2", "none")
LOSSES = ("smooth_l1", "cosine", "mse")


class RepresentationViews(NamedTuple):
    """The student's inputs of one step and the weight of each token in the loss."""

    inputs: jax.Array  # [B, H, W, C] the clean image, with the student's normalisation
    token_mask: jax.Array  # [B, N] bool: patches the encoder replaces by the mask token
    keep: jax.Array | None  # [B, K] int32 visible patches (mae), or None (simmim)
    weight: jax.Array  # [B, N] float32 loss weight per token


@dataclasses.dataclass(frozen=True)
class RepresentationMIM:
    """Static description of the objective; ``views`` and ``loss`` are traced in the step."""

    masking: SpatialMasking
    student: str = "mae"
    target_norm: str = "layernorm"
    loss_fn: str = "smooth_l1"
    beta: float = 2.0
    loss_on: str = "masked"
    weight: float = 1.0
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self):
        checks = {
            "student": (self.student, STUDENTS),
            "target_norm": (self.target_norm, TARGET_NORMS),
            "loss": (self.loss_fn, LOSSES),
            "loss_on": (self.loss_on, ("masked", "all")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"representation.{name}={value!r}: expected one of {allowed}")
        if self.beta <= 0:
            raise ValueError(f"representation.beta={self.beta}: expected > 0")
        if not 0 < self.masking.ratio < 1:
            raise ValueError(f"representation.ratio={self.masking.ratio}: expected in (0, 1)")

    def views(self, images: jax.Array, key: jax.Array) -> RepresentationViews:
        """Clean images [B, H, W, C] in [0, 1] -> the student's inputs and token weights."""
        mask = self.masking.token_mask(self.masking.sample(key, images.shape[0]))  # [B, N]
        keep = None
        if self.student == "mae":  # the visible patches, in order: a fixed count per image
            visible = mask.shape[1] - self.num_masked_tokens
            keep = jnp.argsort(mask, axis=1, stable=True)[:, :visible].astype(jnp.int32)
        weight = mask if self.loss_on == "masked" else jnp.ones_like(mask)
        return RepresentationViews(
            inputs=(images - self.mean) / self.std,
            token_mask=mask if self.student == "simmim" else jnp.zeros_like(mask),
            keep=keep,
            weight=weight.astype(jnp.float32),
        )

    @property
    def num_masked_tokens(self) -> int:
        unit = (self.masking.mask_patch_size // self.masking.patch_size) ** 2
        return self.masking.num_masked * unit

    def targets(self, features: jax.Array) -> jax.Array:
        """Teacher features [B, N, E] -> the regression targets (normalised per token)."""
        features = features.astype(jnp.float32)
        if self.target_norm == "layernorm":  # without affine parameters
            mean = features.mean(-1, keepdims=True)
            var = features.var(-1, keepdims=True)
            return (features - mean) * jax.lax.rsqrt(var + 1e-6)
        if self.target_norm == "l2":
            return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-6)
        return features

    def loss(self, pred: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
        """Per image [B]: the weighted mean over tokens of the per-token loss (the step
        averages over the batch)."""
        if self.loss_fn == "smooth_l1":  # PyTorch's SmoothL1Loss(beta) = Huber(beta) / beta
            per_token = optax.losses.huber_loss(pred, target, delta=self.beta).mean(-1) / self.beta
        elif self.loss_fn == "cosine":
            per_token = optax.losses.cosine_distance(pred, target, epsilon=1e-6)
        else:
            per_token = optax.losses.squared_error(pred, target).mean(-1)
        return (per_token * weight).sum(-1) / jnp.maximum(weight.sum(-1), 1.0)  # [B]


def create_representation(config: ml_collections.ConfigDict) -> RepresentationMIM | None:
    """The objective from ``config.representation``, or None when it is disabled."""
    r = config.representation
    if not r.enabled:
        return None
    return RepresentationMIM(
        masking=SpatialMasking(
            image_size=tuple(config.image_size),
            patch_size=config.model.patch_size,
            mask_patch_size=r.mask_patch_size,
            ratio=r.ratio,
            rule="mask_token",
        ),
        student=r.student,
        target_norm=r.target_norm,
        loss_fn=r.loss,
        beta=r.beta,
        loss_on=r.loss_on,
        weight=r.weight,
        mean=config.normalization.mean,
        std=config.normalization.std,
    )
