"""Adapting encoder weights to another input: image size, channel count, normalisation.

Ultrasound images are gray. A 3-channel model sees the gray image replicated; a 1-channel model
sees it once. The patch embedding is linear in the pixels, so a model trained with one channel
count and normalisation can be re-expressed exactly for another, for gray inputs: the folded
weights give the same embeddings as the originals on every gray image. Position tables are
resampled when the grid of patches changes (an absolute embedding bicubically, as timm does; a
relative table by BEiT's geometric interpolation); that is an approximation by nature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from scipy.interpolate import RectBivariateSpline

from usfm_jax.convert.formats import Architecture, flatten, unflatten


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` applied to [0, 1] pixels before the model."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"normalization: mean {self.mean} and std {self.std} differ in length")
        if min(self.std) <= 0:
            raise ValueError(f"normalization: std must be > 0, got {self.std}")

    def for_channels(self, channels: int) -> Normalization:
        """This normalisation for ``channels`` channels (a single value is broadcast)."""
        if len(self.mean) == channels:
            return self
        if len(self.mean) == 1:
            return Normalization(self.mean * channels, self.std * channels)
        raise ValueError(f"normalization {self} has {len(self.mean)} channels, not {channels}")

    @property
    def is_uniform(self) -> bool:
        """The same mean and std on every channel (expressible as one scalar pair)."""
        return len(set(self.mean)) == 1 and len(set(self.std)) == 1

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, d: dict) -> Normalization:
        return cls(_floats(d["mean"]), _floats(d["std"]))


def _floats(value: float | Sequence[float]) -> tuple[float, ...]:
    return tuple(float(x) for x in (value if isinstance(value, Sequence) else [value]))


PRESETS = {
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": Normalization(
        (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ),
    "inception": Normalization((0.5,), (0.5,)),
}


def parse_normalization(text: str) -> Normalization:
    """A preset name (imagenet, clip, inception) or ``MEAN/STD`` with comma-separated values
    per channel, e.g. ``0.5/0.25`` or ``0.485,0.456,0.406/0.229,0.224,0.225``."""
    if text in PRESETS:
        return PRESETS[text]
    try:
        mean, std = text.split("/")
        return Normalization(
            tuple(float(x) for x in mean.split(",")), tuple(float(x) for x in std.split(","))
        )
    except ValueError as e:
        raise ValueError(
            f"normalization {text!r}: expected one of {sorted(PRESETS)} or MEAN/STD "
            f"(comma-separated per channel, e.g. 0.5/0.25) ({e})"
        ) from None


def fold_patch_embedding(
    kernel: np.ndarray,
    bias: np.ndarray,
    source: Normalization,
    target: Normalization,
    channels: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Patch-embedding weights (Flax layout: kernel [kh, kw, C_src, D], bias [D]) re-expressed
    for ``channels`` input channels normalised by ``target``, exact on gray inputs.

    For a gray pixel x the source computes sum_c W_c (x - m_c) / s_c + b. Its slope
    A = sum_c W_c / s_c is spread evenly over the target channels (W'_c = A s'_c / C'), and the
    bias absorbs the difference of the constant terms. Computed in float64."""
    c_src = kernel.shape[2]
    source, target = source.for_channels(c_src), target.for_channels(channels)
    w = kernel.astype(np.float64)
    m_s, s_s = np.asarray(source.mean), np.asarray(source.std)
    m_t, s_t = np.asarray(target.mean), np.asarray(target.std)
    slope = np.sum(w / s_s[:, None], axis=2)  # [kh, kw, D]
    new_kernel = slope[:, :, None, :] * (s_t[:, None] / channels)  # [kh, kw, C', D]
    offset_src = np.einsum("hwcd,c->d", w, m_s / s_s)
    offset_dst = np.einsum("hwcd,c->d", new_kernel, m_t / s_t)
    new_bias = bias.astype(np.float64) - offset_src + offset_dst
    return new_kernel.astype(kernel.dtype), new_bias.astype(bias.dtype)


def _resize_grid(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of [h, w, C] to [*shape, C], in float32 (jax.image, on the host CPU)."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        out = jax.image.resize(values.astype(np.float32), (*shape, values.shape[-1]), "bicubic")
    return np.asarray(out, values.dtype)


def resample_pos_embed(
    pos_embed: np.ndarray, grid: tuple[int, int], new_grid: tuple[int, int]
) -> np.ndarray:
    """Absolute position embedding [1, 1 + N, D] for another grid of patches (cls kept)."""
    if tuple(grid) == tuple(new_grid):
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[0, 1:]
    patches = _resize_grid(patches.reshape(*grid, -1), new_grid).reshape(1, -1, pos_embed.shape[-1])
    return np.concatenate([cls, patches], axis=1)


def resample_rel_pos_table(
    table: np.ndarray, grid: tuple[int, int], new_grid: tuple[int, int]
) -> np.ndarray:
    """BEiT relative position table [(2gh-1)(2gw-1) + 3, heads] for another grid; the three
    cls rows are kept.

    An offset counts patches, which are as large at any image size, so offsets both grids
    have keep their meaning. For a smaller grid the table is cropped to its offsets; for a
    larger one, BEiT's (and SimMIM's) geometric interpolation: offsets 0 and +-1 stay where
    they are, the further ones are spread over the new range with geometrically growing steps,
    and an interpolating bicubic spline gives the new offsets between them."""
    if tuple(grid) == tuple(new_grid):
        return table
    (gh, gw), (nh, nw) = grid, new_grid
    offsets = table[:-3].reshape(2 * gh - 1, 2 * gw - 1, -1).astype(np.float64)
    ys, xs = _geometric_positions(gh, nh), _geometric_positions(gw, nw)
    new_ys, new_xs = (np.arange(1 - n, n, dtype=np.float64) for n in (nh, nw))
    new_ys, new_xs = np.clip(new_ys, ys[0], ys[-1]), np.clip(new_xs, xs[0], xs[-1])
    kx, ky = min(3, len(ys) - 1), min(3, len(xs) - 1)  # a 2-patch axis has 3 offsets
    resized = np.stack(
        [
            RectBivariateSpline(ys, xs, offsets[..., head], kx=kx, ky=ky, s=0)(new_ys, new_xs)
            for head in range(offsets.shape[-1])
        ],
        axis=-1,
    )  # [2nh - 1, 2nw - 1, heads]
    resized = resized.reshape(-1, table.shape[-1]).astype(table.dtype)
    return np.concatenate([resized, table[-3:]], axis=0)


def _geometric_positions(size: int, new_size: int) -> np.ndarray:
    """Where the offsets -(size-1) .. size-1 of a ``size``-patch axis sit among those of a
    ``new_size`` one (BEiT): 0, +-1, +-(1 + q), +-(1 + q + q^2), ..., with q >= 1 such that
    the last lands on new_size - 1 (q = 1, the offsets themselves, when the axis shrinks, or
    when it has 2 patches: offsets 0 and +-1 alone, whose values the farther new ones take)."""
    n, reach = size - 1, new_size - 1

    def last(q: float) -> float:  # 1 + q + ... + q^(n-1)
        return float(np.sum(q ** np.arange(n)))

    low, high = 1.0, 2.0
    if reach > n > 1:
        while last(high) < reach:
            high *= 2
        for _ in range(100):  # bisection of a monotone function, to float precision
            mid = (low + high) / 2
            low, high = (low, mid) if last(mid) > reach else (mid, high)
    steps = np.cumsum(low ** np.arange(n))  # [n]: 1, 1 + q, ...
    return np.concatenate([-steps[::-1], [0.0], steps])


def adapt_encoder(
    params: dict[str, Any],
    arch: Architecture,
    *,
    source: Normalization,
    target: Normalization | None = None,
    in_chans: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> tuple[dict[str, Any], Architecture, list[str]]:
    """Encoder parameters (nested) for another channel count / normalisation / image size.
    Returns the parameters, their architecture and a note per change (empty: unchanged)."""
    in_chans = in_chans or arch.in_chans
    image_size = image_size or arch.image_size
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    size = (image_size,) * 2 if not isinstance(image_size, tuple | list) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(n, int) and n > 0 for n in size):
        raise ValueError(f"image size {image_size!r}: expected a positive int or (height, width)")
    image_size = size
    if image_size[0] % arch.patch_size or image_size[1] % arch.patch_size:
        raise ValueError(
            f"image size {image_size} is not a multiple of the patch size {arch.patch_size}"
        )
    source = source.for_channels(arch.in_chans)
    target = (target or source).for_channels(in_chans)
    new = arch.replace(in_chans=in_chans, image_size=image_size)
    flat = dict(flatten(params))
    notes = []
    if in_chans != arch.in_chans or target != source:
        kernel, bias = "patch_embed.proj.kernel", "patch_embed.proj.bias"
        flat[kernel], flat[bias] = fold_patch_embedding(
            flat[kernel], flat[bias], source, target, in_chans
        )
        notes.append(
            f"patch embedding re-expressed from {arch.in_chans} channels normalised by "
            f"{source.to_json()} to {in_chans} normalised by {target.to_json()}: exact for gray "
            "images (replicated over the channels)"
        )
    if new.grid != arch.grid:
        for name in flat:
            if name == "pos_embed":
                flat[name] = resample_pos_embed(flat[name], arch.grid, new.grid)
            elif name.endswith("relative_position_bias_table"):
                flat[name] = resample_rel_pos_table(flat[name], arch.grid, new.grid)
        how = (
            "embedding resampled (bicubic)"
            if arch.variant == "vit"
            else "tables resampled (BEiT's geometric interpolation)"
        )
        notes.append(
            f"position {how} from {arch.image_size[0]}x{arch.image_size[1]} to "
            f"{image_size[0]}x{image_size[1]}"
        )
    return unflatten(flat), new, notes
