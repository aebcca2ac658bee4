"""Task models: a ViT encoder (pre-trained or not) and a head per downstream task.

Every model takes gray images in [0, 1], [B, H, W, 1], and normalises them itself with the
encoder's input normalisation (a 3-channel encoder gets the gray image replicated first), so a
checkpoint's normalisation travels with it.

* ``Classifier``: mean-pooled (or cls) tokens -> LayerNorm -> linear; logits [B, C].
* ``Segmenter``: ``UperNetDecoder`` (BEiT's recipe: four blocks' features rescaled to 1/4,
  1/8, 1/16, 1/32 of the input, a pyramid pooling module and an FPN) or ``LinearDecoder`` (a
  per-patch linear classifier, upsampled); logits [B, H, W, C].
* ``Enhancer``: a pixel head per patch (as in pre-training) and a small convolutional
  refinement at full resolution, added to the input (residual); an image [B, H, W, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from usfm_jax.convert.adapt import Normalization
from usfm_jax.models.heads import LinearPixelHead
from usfm_jax.models.vit import VisionTransformer, dense, layer_norm
from usfm_jax.patches import unpatchify

POOL_SCALES = (1, 2, 3, 6)  # PSPNet's pyramid pooling


class Normalize(nnx.Module):
    """[0, 1] gray images -> the encoder's normalised input channels."""

    def __init__(self, normalization: Normalization, in_chans: int):
        norm = normalization.for_channels(in_chans)
        self.in_chans = in_chans
        self.mean = tuple(norm.mean)
        self.std = tuple(norm.std)

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.shape[-1] == 1 and self.in_chans == 3:
            images = jnp.repeat(images, 3, axis=-1)
        return (images - jnp.asarray(self.mean)) / jnp.asarray(self.std)


def _tokens_to_map(tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Patch tokens [B, 1 + N, D] (cls first) -> feature map [B, h, w, D]."""
    return tokens[:, 1:].reshape(tokens.shape[0], *grid, tokens.shape[-1])


def resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of [B, h, w, C] to ``size`` (half-pixel centres, as align_corners=False)."""
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "linear")


def adaptive_pool_matrix(n: int, s: int) -> np.ndarray:
    """[s, n] averaging weights of PyTorch's adaptive average pooling from n to s cells."""
    m = np.zeros((s, n), np.float32)
    for i in range(s):
        lo, hi = (i * n) // s, -(-((i + 1) * n) // s)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


class ConvNormAct(nnx.Module):
    """Convolution (no bias), LayerNorm over channels, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, dtype: DTypeLike, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), padding="SAME", use_bias=False,
                             dtype=dtype, rngs=rngs)  # fmt: skip
        self.norm = nnx.LayerNorm(cout, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.norm(self.conv(x)))


def upsample2x(dim: int, dtype: DTypeLike, rngs: nnx.Rngs) -> nnx.ConvTranspose:
    """A stride-2 transposed convolution (BEiT's feature-pyramid upsampling)."""
    return nnx.ConvTranspose(dim, dim, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype,
                             rngs=rngs)  # fmt: skip


class UperNetDecoder(nnx.Module):
    """Four feature maps of the ViT's grid [B, h, w, D] -> logits [B, 4h, 4w, C]."""

    def __init__(
        self, dim: int, channels: int, num_classes: int, *, dtype: DTypeLike, rngs: nnx.Rngs
    ):
        # Multi-scale neck: x4 (two deconvs), x2, x1, x1/2 (max pooling).
        self.up4 = nnx.List([upsample2x(dim, dtype, rngs), upsample2x(dim, dtype, rngs)])
        self.up4_norm = layer_norm(dim, dtype, rngs)
        self.up2 = upsample2x(dim, dtype, rngs)
        self.ppm = nnx.List([ConvNormAct(dim, channels, 1, dtype, rngs) for _ in POOL_SCALES])
        self.bottleneck = ConvNormAct(dim + len(POOL_SCALES) * channels, channels, 3, dtype, rngs)
        self.lateral = nnx.List([ConvNormAct(dim, channels, 1, dtype, rngs) for _ in range(3)])
        self.fpn = nnx.List([ConvNormAct(channels, channels, 3, dtype, rngs) for _ in range(3)])
        self.fuse = ConvNormAct(4 * channels, channels, 3, dtype, rngs)
        self.classifier = nnx.Conv(channels, num_classes, (1, 1), dtype=dtype, rngs=rngs)

    def _pyramid_pooling(self, x: jax.Array) -> jax.Array:
        h, w = x.shape[1:3]
        branches = [x]
        for scale, conv in zip(POOL_SCALES, self.ppm, strict=True):
            ph, pw = adaptive_pool_matrix(h, scale), adaptive_pool_matrix(w, scale)
            pooled = jnp.einsum("ih,jw,bhwc->bijc", ph, pw, x)  # [B, s, s, D]
            branches.append(resize(conv(pooled), (h, w)))
        return self.bottleneck(jnp.concatenate(branches, axis=-1))

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        f1, f2, f3, f4 = features
        f1 = self.up4[1](jax.nn.gelu(self.up4_norm(self.up4[0](f1))))  # [B, 4h, 4w, D]
        f2 = self.up2(f2)  # [B, 2h, 2w, D]
        b, h, w, d = f4.shape
        f4 = f4[:, : h - h % 2, : w - w % 2].reshape(b, h // 2, 2, w // 2, 2, d).max((2, 4))
        levels = [conv(f) for conv, f in zip(self.lateral, (f1, f2, f3), strict=True)]
        levels.append(self._pyramid_pooling(f4))
        for i in range(len(levels) - 1, 0, -1):  # top-down pathway
            levels[i - 1] = levels[i - 1] + resize(levels[i], levels[i - 1].shape[1:3])
        outs = [conv(x) for conv, x in zip(self.fpn, levels[:-1], strict=True)] + [levels[-1]]
        size = outs[0].shape[1:3]
        fused = self.fuse(jnp.concatenate([resize(x, size) for x in outs], axis=-1))
        return self.classifier(fused)


class LinearDecoder(nnx.Module):
    """The light option: LayerNorm + a linear classifier per patch (SETR-naive)."""

    def __init__(self, dim: int, num_classes: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
        self.norm = layer_norm(dim, dtype, rngs)
        self.classifier = dense(dim, num_classes, dtype, rngs)

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        return self.classifier(self.norm(features[-1]))


def feature_layers(depth: int) -> tuple[int, ...]:
    """The four blocks a UPerNet reads (0-based): BEiT's and USFM's, the ends of the first
    third, half, two thirds and the whole encoder (blocks 4, 6, 8, 12 of ViT-B; 8, 12, 16, 24
    of ViT-L), where they are four distinct blocks; else the ends of its four quarters."""
    if depth % 6 == 0:
        return (depth // 3 - 1, depth // 2 - 1, 2 * depth // 3 - 1, depth - 1)
    return tuple(sorted({max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)}))


class TaskModel(nnx.Module):
    """Shared by the task models: input normalisation, the encoder, freezing it."""

    def __init__(self, encoder: VisionTransformer, normalize: Normalize, frozen: bool):
        self.encoder = encoder
        self.normalize = normalize
        self.frozen = frozen

    def _encoder_key(self, key: jax.Array | None) -> jax.Array | None:
        return None if self.frozen else key  # a frozen encoder runs deterministically

    def _frozen(self, x: jax.Array) -> jax.Array:
        return jax.lax.stop_gradient(x) if self.frozen else x


class Classifier(TaskModel):
    def __init__(self, encoder: VisionTransformer, normalize: Normalize, num_classes: int, *,
                 pool: str = "mean", frozen: bool = False, rngs: nnx.Rngs):  # fmt: skip
        super().__init__(encoder, normalize, frozen)
        if pool not in ("mean", "cls"):
            raise ValueError(f"config.head.pool={pool!r}: expected 'mean' or 'cls'")
        self.pool = pool
        self.fc_norm = layer_norm(encoder.width, jnp.float32, rngs)
        self.head = dense(encoder.width, num_classes, jnp.float32, rngs)

    def __call__(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        tokens = self.encoder(self.normalize(images), dropout_key=self._encoder_key(dropout_key))
        tokens = self._frozen(tokens).astype(jnp.float32)  # [B, 1 + N, D]
        pooled = tokens[:, 1:].mean(1) if self.pool == "mean" else tokens[:, 0]
        return self.head(self.fc_norm(pooled))  # [B, C]


class Segmenter(TaskModel):
    def __init__(self, encoder: VisionTransformer, normalize: Normalize, num_classes: int, *,
                 decoder: str = "upernet", channels: int = 256, frozen: bool = False,
                 rngs: nnx.Rngs):  # fmt: skip
        super().__init__(encoder, normalize, frozen)
        dtype = encoder.dtype
        if decoder == "upernet":
            self.layers = feature_layers(len(encoder.blocks))
            if len(self.layers) != 4:
                raise ValueError("a UPerNet decoder needs an encoder of at least 4 blocks")
            self.decoder = UperNetDecoder(encoder.width, channels, num_classes, dtype=dtype,
                                          rngs=rngs)  # fmt: skip
        elif decoder == "linear":
            self.layers = (len(encoder.blocks) - 1,)
            self.decoder = LinearDecoder(encoder.width, num_classes, dtype=dtype, rngs=rngs)
        else:
            raise ValueError(f"config.head.decoder={decoder!r}: expected 'upernet' or 'linear'")

    def __call__(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        key = self._encoder_key(dropout_key)
        outputs = self.encoder.intermediates(self.normalize(images), self.layers, dropout_key=key)
        grid = self.encoder.grid
        features = [_tokens_to_map(self._frozen(x), grid) for x in outputs]
        logits = self.decoder(features)  # [B, h', w', C]
        return resize(logits.astype(jnp.float32), images.shape[1:3])  # [B, H, W, C]


class Enhancer(TaskModel):
    def __init__(self, encoder: VisionTransformer, normalize: Normalize, *, refine_width: int = 32,
                 frozen: bool = False, rngs: nnx.Rngs):  # fmt: skip
        super().__init__(encoder, normalize, frozen)
        dtype = encoder.dtype
        self.head = LinearPixelHead(encoder.width, encoder.patch_size, 1, dtype=dtype, rngs=rngs)
        self.refine_in = nnx.Conv(2, refine_width, (3, 3), padding="SAME", rngs=rngs)
        self.refine_out = nnx.Conv(refine_width, 1, (3, 3), padding="SAME",
                                   kernel_init=nnx.initializers.zeros, rngs=rngs)  # fmt: skip

    def __call__(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        tokens = self.encoder(self.normalize(images), dropout_key=self._encoder_key(dropout_key))
        coarse = self.head(self._frozen(tokens)[:, 1:]).astype(jnp.float32)  # [B, N, p*p]
        coarse = unpatchify(coarse, self.encoder.patch_size, self.encoder.grid)  # [B, H, W, 1]
        x = jax.nn.gelu(self.refine_in(jnp.concatenate([images, coarse], axis=-1)))
        return images + self.refine_out(x)  # starts as the identity (zero-initialised output)
