"""The frozen teacher of representation-based MIM (URFM): BiomedCLIP's image encoder or any
timm ViT, loaded from PyTorch weights with ``usfm_jax.convert``.

The teacher sees the clean gray image through its own preprocessing (resize to its image size,
replication to its channels, its own per-channel normalisation: CLIP's for BiomedCLIP), never
the student's. Its weights are data of the step, not trained parameters: no gradient reaches
them and no optimizer state exists for them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from usfm_jax.convert import ConversionError, Normalization, read_torch_weights
from usfm_jax.convert.formats import Architecture
from usfm_jax.models.factory import DTYPES
from usfm_jax.models.vit import VisionTransformer

# Which features are the targets: the last block's tokens, the same after the final norm, or
# those projected by the CLIP head (BiomedCLIP: 768 -> 512) applied to every token.
TARGET_LAYERS = ("last_block", "final_norm", "projection")
# A teacher is an open_clip visual tower (BiomedCLIP's) or a plain timm ViT.
FORMATS = ("open-clip-visual", "timm-vit")


class Teacher(nnx.Module):
    """Frozen encoder (+ projection): clean gray images [B, H, W, 1] in [0, 1] -> patch-token
    features [B, N, E] of ``layer``."""

    def __init__(
        self,
        encoder: VisionTransformer,
        projection: nnx.Linear | None,
        normalization: Normalization,
        layer: str,
    ):
        if layer not in TARGET_LAYERS:
            raise ValueError(f"teacher layer must be one of {TARGET_LAYERS}, got {layer!r}")
        if layer == "projection" and projection is None:
            raise ValueError("teacher layer 'projection' needs weights with a projection head")
        self.encoder = encoder
        self.projection = projection
        norm = normalization.for_channels(encoder.in_chans)
        self.mean, self.std = norm.mean, norm.std  # static tuples, per channel
        self.layer = layer

    @property
    def image_size(self) -> tuple[int, int]:
        p = self.encoder.patch_size
        return (self.encoder.grid[0] * p, self.encoder.grid[1] * p)

    @property
    def features(self) -> int:
        """Width E of the target features."""
        return self.projection.out_features if self.layer == "projection" else self.encoder.width

    def preprocess(self, gray: jax.Array) -> jax.Array:
        """[B, H, W, 1] in [0, 1] -> the teacher's input [B, h, w, C], its own normalisation."""
        b, h, w, _ = gray.shape
        if (h, w) != self.image_size:
            gray = jax.image.resize(gray, (b, *self.image_size, 1), "bicubic")
        x = jnp.repeat(gray.astype(jnp.float32), self.encoder.in_chans, axis=-1)
        return (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)

    def __call__(self, gray: jax.Array) -> jax.Array:
        tokens = self.encoder(self.preprocess(gray), final_norm=self.layer != "last_block")
        if self.layer == "projection":
            tokens = self.projection(tokens)
        return jax.lax.stop_gradient(tokens[:, 1:].astype(jnp.float32))  # [B, N, E]


class LoadedTeacher(NamedTuple):
    graphdef: nnx.GraphDef
    params: nnx.State  # the weights, to pass to the step as data
    arch: Architecture
    normalization: Normalization
    notes: list[str]


def load_teacher(
    path: str,
    *,
    fmt: str = "auto",
    layer: str = "final_norm",
    normalization: str | None = None,
    num_heads: int | None = None,
    dtype: Any = jnp.float32,
    attention: str = "auto",
    norm: str = "auto",
) -> LoadedTeacher:
    """A teacher from PyTorch weights: an open_clip checkpoint (its visual trunk and
    projection) or a timm ViT state dict. Weights are taken as they are (no folding); a key
    that is missing or of the wrong shape is an error naming it."""
    try:
        params, arch, expected, _, _, notes = read_torch_weights(
            path, fmt, num_heads=num_heads, normalization=normalization, formats=FORMATS
        )
    except ConversionError as e:  # say that the file is the teacher's, and which
        raise ConversionError(
            f"teacher {e}" if str(e).startswith(str(path)) else f"teacher {path}: {e}"
        ) from None
    if layer == "projection" and "projection" not in params:
        raise ConversionError(
            f"teacher {path} has no projection (visual.head.proj.weight): target layer "
            "'projection' is not available; use 'final_norm' or 'last_block'"
        )
    encoder = arch.build(dtype=dtype, attention=attention, norm=norm)
    projection = None
    if layer == "projection":
        width, out = params["projection"]["kernel"].shape
        projection = nnx.Linear(width, out, use_bias=False, dtype=dtype, rngs=nnx.Rngs(0))
    try:
        teacher = Teacher(encoder, projection, expected, layer)
    except ValueError as e:
        raise ConversionError(f"teacher {path}: {e}") from None
    graphdef, state = nnx.split(teacher)
    weights = {"encoder": params["encoder"]}
    if projection is not None:
        weights["projection"] = params["projection"]
    nnx.replace_by_pure_dict(state, weights)
    return LoadedTeacher(graphdef, state, arch, expected, notes)


def grid_mismatch(config: Any, teacher: Architecture) -> str | None:
    """Why ``teacher``'s features cannot be the targets of ``config``'s student (its patch grid
    is another: the tokens would not line up), or None."""
    grid = teacher.grid
    student = tuple(s // config.model.patch_size for s in config.image_size)
    if grid == student:
        return None
    return (
        f"teacher {config.teacher.path} has a {grid[0]}x{grid[1]} grid of patches "
        f"({teacher.image_size[0]} px, patch {teacher.patch_size}); the student's is "
        f"{student[0]}x{student[1]}: choose config.image_size / model.patch_size to match"
    )


def teacher_from_config(config: Any) -> LoadedTeacher:
    """The teacher a run's ``config.teacher`` names, in ``teacher.dtype`` (default the
    model's) and the model's attention and LayerNorm implementations."""
    t = config.teacher
    return load_teacher(
        t.path,
        fmt=t.format,
        layer=t.layer,
        normalization=t.normalization or None,
        num_heads=t.get("num_heads"),
        dtype=DTYPES[t.dtype or config.model.dtype],
        attention=config.model.attention,
        norm=config.model.norm,
    )
