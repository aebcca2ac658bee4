"""Frequency-domain masking for masked image modeling (USFM band-stop, MFM low/high-pass).

USFM's spatial-frequency dual MIM corrupts the input image in the frequency domain before
the encoder sees it. This module implements that corruption on device, inside a jitted
train step, with every geometric quantity precomputed on the host (static).

Band-stop (official USFM code, re-implemented from its description):

* Work on the centred (``fftshift``-ed) spectrum of an ``n x n`` image; the centre is
  ``(n // 2, n // 2)``.
* Ring radii: ``r0 = center_protect``, ``r1 = base_bw``,
  ``r(k+1) = r(k) + min(floor(r(k) * increase_factor), max_increase)``; a radius is only
  appended while it does not exceed ``n / 2``.
* Ring ``k`` covers frequencies at Euclidean distance ``d`` from the centre with
  ``r(k) < d <= r(k+1)``. The disk ``d <= center_protect`` (DC and the lowest frequencies)
  and the corners beyond the last radius are never masked.
* Per image, ``int(ratio * num_rings)`` distinct rings are drawn uniformly at random and
  zeroed (same mask for every channel); the inverse FFT is taken and, as in the official
  code, its magnitude kept (``output="abs"``; ``"real"`` keeps the real part instead).

Worked example: ``n=224, center_protect=5, base_bw=10, increase_factor=0.5,
max_increase=20`` gives radii ``(5, 10, 15, 22, 33, 49, 69, 89, 109)``, i.e. 8 rings.

Non-square images (``H != W``) are a generalisation of ours: the centre is
``(H // 2, W // 2)``, distances are measured in index units (frequency bins) along each
axis, and the radius stopping bound is ``min(H, W) / 2``.

Low/high-pass (MFM, "Masked Frequency Modeling for Self-Supervised Visual Pre-Training",
Xie et al. 2023), kept as an ablation: one circle of radius ``r`` on the centred spectrum;
per image, with probability ``p_low`` a low-pass filter (keep ``d < r``) otherwise a
high-pass filter (keep ``d >= r``); the real part of the inverse FFT, clipped to [0, 1].

All masks live in the *unshifted* ``np.fft.fft2`` layout, so the device never runs
``fftshift``: a mask built on the centred spectrum is ``ifftshift``-ed once on the host.
The device work runs in small ``jax.jit``-ed helpers keyed only on shapes and ints (the
static masks are passed as arrays), so eager calls are cheap and compiles are shared
between maskers; under an outer jit they simply inline.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from usfm_jax.masking.sampling import exact_count_mask
from usfm_jax.parallel import per_batch_shard

__all__ = [
    "BandStop",
    "LowHighPass",
    "apply_frequency_mask",
    "ring_map",
    "ring_radii",
]

_OUTPUTS = ("abs", "real")


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """Normalise an image size to ``(H, W)`` and check it is positive."""
    if isinstance(size, int | np.integer):
        hw = (int(size), int(size))
    else:
        hw = tuple(int(s) for s in size)
        if len(hw) != 2:
            raise ValueError(f"size must be an int or a (H, W) pair, got size={size!r}")
    if hw[0] < 1 or hw[1] < 1:
        raise ValueError(f"size must be positive, got size={size!r}")
    return hw  # type: ignore[return-value]


def _check_output(output: str) -> None:
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}, got output={output!r}")


def _check_int(name: str, value: float) -> int:
    if int(value) != value:
        raise ValueError(f"{name} must be an integer, got {name}={value!r}")
    return int(value)


def _sq_distance(size: tuple[int, int]) -> np.ndarray:
    """Squared distance (in frequency bins) to the spectrum centre, unshifted layout.

    ``np.fft.fftfreq(n) * n`` is the signed frequency index of each unshifted bin; after
    ``fftshift`` it is exactly ``i - n // 2`` for shifted index ``i``, so this equals the
    squared distance to ``(H // 2, W // 2)`` on the centred spectrum, moved back by
    ``ifftshift``.
    """
    h, w = size
    fy = np.rint(np.fft.fftfreq(h) * h).astype(np.int64)  # [H]
    fx = np.rint(np.fft.fftfreq(w) * w).astype(np.int64)  # [W]
    return fy[:, None] ** 2 + fx[None, :] ** 2  # [H, W]


def ring_radii(
    size: int | tuple[int, int],
    *,
    center_protect: int,
    base_bw: int,
    increase_factor: float,
    max_increase: int,
) -> tuple[int, ...]:
    """Band-stop ring radii ``(r0, r1, ..., rK)`` for ``K`` rings (host-side, static).

    ``r0 = center_protect``, ``r1 = base_bw``, then
    ``r(k+1) = r(k) + min(floor(r(k) * increase_factor), max_increase)`` while the new
    radius does not exceed ``min(H, W) / 2``. Raises ``ValueError`` on settings that never
    terminate or give no ring.
    """
    h, w = _as_size(size)
    bound = min(h, w) / 2
    center_protect = _check_int("center_protect", center_protect)
    base_bw = _check_int("base_bw", base_bw)
    max_increase = _check_int("max_increase", max_increase)
    if center_protect < 0:
        raise ValueError(f"center_protect must be >= 0, got center_protect={center_protect}")
    if max_increase < 1:
        raise ValueError(
            f"max_increase must be >= 1 (else the radii never grow), got "
            f"max_increase={max_increase}"
        )
    if not (math.isfinite(increase_factor) and increase_factor > 0):
        raise ValueError(
            f"increase_factor must be a positive finite number, got "
            f"increase_factor={increase_factor}"
        )
    step = math.floor(base_bw * increase_factor)
    if step < 1:
        # floor(r * f) is non-decreasing in r, so step >= 1 here guarantees termination.
        raise ValueError(
            f"floor(base_bw * increase_factor) must be >= 1 or the ring construction never "
            f"terminates, got base_bw={base_bw}, increase_factor={increase_factor} "
            f"(floor = {step})"
        )
    if base_bw <= center_protect:
        raise ValueError(
            f"base_bw must exceed center_protect to give a first ring, got base_bw={base_bw}, "
            f"center_protect={center_protect}"
        )
    if base_bw > bound:
        raise ValueError(
            f"base_bw must be <= min(H, W) / 2 = {bound} to give at least one ring, got "
            f"base_bw={base_bw} for size {(h, w)}"
        )
    radii = [center_protect, base_bw]
    while True:
        r = radii[-1]
        nxt = r + min(math.floor(r * increase_factor), max_increase)
        if nxt > bound:
            break
        radii.append(nxt)
    return tuple(radii)


def ring_map(size: int | tuple[int, int], radii: Sequence[int]) -> np.ndarray:
    """Ring id of every frequency bin, ``-1`` where never masked (unshifted layout).

    Ring ``k`` holds bins with ``radii[k] < d <= radii[k + 1]``; ``d <= radii[0]`` and
    ``d > radii[-1]`` get ``-1``. The map is in ``np.fft.fft2`` order (DC at ``[0, 0]``) so
    it can be applied on device without ``fftshift``. Returns int32 ``[H, W]``.
    """
    hw = _as_size(size)
    radii = [_check_int("radii", r) for r in radii]
    if len(radii) < 2 or radii[0] < 0 or any(b <= a for a, b in itertools.pairwise(radii)):
        raise ValueError(
            f"radii must be >= 2 strictly increasing non-negative ints, got radii={radii}"
        )
    d2 = _sq_distance(hw)  # [H, W], exact integer arithmetic
    r2 = np.asarray(radii, np.int64) ** 2  # [K + 1]
    # Number of radii strictly below d: k + 1 for r(k) < d <= r(k+1).
    ids = np.searchsorted(r2, d2, side="left") - 1  # [H, W]
    ids = np.where((d2 <= r2[0]) | (d2 > r2[-1]), -1, ids)
    return ids.astype(np.int32)


def apply_frequency_mask(images: jax.Array, removed: jax.Array, output: str) -> jax.Array:
    """Zero the ``removed`` frequencies of every channel and go back to image space.

    ``images`` [B, H, W, C], ``removed`` bool [B, H, W] (unshifted layout, same for all
    channels). The FFT runs in float32/complex64 whatever the input dtype (bf16 FFTs are
    not supported and would be too lossy); the result is ``abs`` or ``real`` of the inverse
    FFT, cast back to the input dtype.
    """
    _check_output(output)
    if images.ndim != 4 or removed.shape != images.shape[:3]:
        raise ValueError(
            f"expected images [B, H, W, C] and removed [B, H, W], got {images.shape} and "
            f"{removed.shape}"
        )
    return _filter(images, removed, output=output, clip=False)


@functools.partial(jax.jit, static_argnames=("output", "clip"))
def _filter(images: jax.Array, removed: jax.Array, *, output: str, clip: bool) -> jax.Array:
    """Jitted body of :func:`apply_frequency_mask`, optionally clipping to [0, 1]."""
    x = images.astype(jnp.float32)  # [B, H, W, C]
    spec = jnp.fft.fft2(x, axes=(1, 2))  # [B, H, W, C] complex64
    keep = jnp.logical_not(removed)[..., None]  # [B, H, W, 1]
    spec = jnp.where(keep, spec, jnp.zeros((), spec.dtype))
    y = jnp.fft.ifft2(spec, axes=(1, 2))  # [B, H, W, C]
    out = jnp.abs(y) if output == "abs" else jnp.real(y)  # [B, H, W, C] float32
    if clip:
        out = jnp.clip(out, 0.0, 1.0)
    return out.astype(images.dtype)


def _sharded_filter(images: jax.Array, removed: jax.Array, *, output: str, clip: bool):
    """``_filter`` on each device's share of the batch (XLA would gather it for the FFT)."""
    return per_batch_shard(functools.partial(_filter, output=output, clip=clip))(images, removed)


@functools.partial(jax.jit, static_argnames=("batch", "num_rings", "num_drop"))
def _sample_rings(
    key: jax.Array, gather: jax.Array, *, batch: int, num_rings: int, num_drop: int
) -> jax.Array:
    """Removed mask [B, H, W] for ``num_drop`` distinct random rings out of ``num_rings``.

    ``gather`` [H, W] is the ring id per bin with never-masked bins set to ``num_rings``.
    """
    drop = exact_count_mask(key, batch, num_rings, num_drop)  # [B, K]
    # Extra always-False column K for the never-masked bins.
    drop = jnp.pad(drop, ((0, 0), (0, 1)), constant_values=False)  # [B, K + 1]
    return jnp.take(drop, gather, axis=1)  # [B, H, W]


@functools.partial(jax.jit, static_argnames="batch")
def _sample_low_high(key: jax.Array, high: jax.Array, p_low: jax.Array, *, batch: int):
    """Removed mask [B, H, W]: ``high`` [H, W] w.p. ``p_low`` (low-pass), else ``~high``."""
    is_low = jax.random.bernoulli(key, p_low, (batch,))  # [B]
    return jnp.where(is_low[:, None, None], high[None], jnp.logical_not(high)[None])


def _check_images(images: jax.Array, size: tuple[int, int]) -> None:
    if images.ndim != 4 or tuple(images.shape[1:3]) != size:
        raise ValueError(f"expected images [B, {size[0]}, {size[1]}, C], got {images.shape}")


@dataclasses.dataclass(frozen=True, eq=False)
class BandStop:
    """USFM band-stop frequency masking: zero ``num_drop`` random rings per image.

    Static (hashable by value) so it can be closed over in, or passed statically to,
    ``jax.jit``. Build with :meth:`create`, which validates the parameters.
    """

    ring_ids: np.ndarray  # int32 [H, W] ring id, -1 = never masked (unshifted layout)
    num_rings: int
    num_drop: int  # int(ratio * num_rings)
    output: str = "abs"  # "abs" (official) | "real"

    def __post_init__(self) -> None:
        ids = np.array(self.ring_ids, dtype=np.int32)  # private read-only copy
        ids.setflags(write=False)
        object.__setattr__(self, "ring_ids", ids)
        if ids.ndim != 2:
            raise ValueError(f"ring_ids must be [H, W], got shape {ids.shape}")
        if self.num_rings < 1 or ids.min() < -1 or ids.max() >= self.num_rings:
            raise ValueError(
                f"ring_ids must lie in [-1, num_rings), got num_rings={self.num_rings}, "
                f"range [{ids.min()}, {ids.max()}]"
            )
        if not 1 <= self.num_drop <= self.num_rings:
            raise ValueError(
                f"num_drop must be in [1, num_rings={self.num_rings}], got num_drop={self.num_drop}"
            )
        _check_output(self.output)

    @classmethod
    def create(
        cls,
        size: int | tuple[int, int],
        *,
        ratio: float,
        center_protect: int,
        base_bw: int,
        increase_factor: float,
        max_increase: int,
        output: str = "abs",
    ) -> BandStop:
        """Validate the USFM parameters and precompute the static ring map."""
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got ratio={ratio}")
        _check_output(output)
        radii = ring_radii(
            size,
            center_protect=center_protect,
            base_bw=base_bw,
            increase_factor=increase_factor,
            max_increase=max_increase,
        )
        num_rings = len(radii) - 1
        num_drop = int(ratio * num_rings)  # truncation, as in the official code
        if num_drop == 0:
            raise ValueError(
                f"int(ratio * num_rings) must be >= 1, got ratio={ratio} with "
                f"num_rings={num_rings} (radii {radii})"
            )
        return cls(ring_map(size, radii), num_rings, num_drop, output)

    @property
    def size(self) -> tuple[int, int]:
        """Image size ``(H, W)``."""
        return self.ring_ids.shape  # type: ignore[return-value]

    @functools.cached_property
    def _key(self) -> tuple:
        ids = self.ring_ids
        return (ids.shape, ids.tobytes(), self.num_rings, self.num_drop, self.output)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BandStop):
            return NotImplemented
        return self._key == other._key

    def sample(self, key: jax.Array, batch: int) -> jax.Array:
        """Draw ``num_drop`` distinct rings per image; bool [B, H, W], True = removed."""
        gather = np.where(self.ring_ids < 0, self.num_rings, self.ring_ids)  # [H, W]
        return _sample_rings(
            key, gather, batch=batch, num_rings=self.num_rings, num_drop=self.num_drop
        )

    def __call__(self, images: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Filter ``images`` [B, H, W, C] -> (filtered [B, H, W, C], removed [B, H, W])."""
        _check_images(images, self.size)
        removed = self.sample(key, images.shape[0])  # [B, H, W]
        return _sharded_filter(images, removed, output=self.output, clip=False), removed


@dataclasses.dataclass(frozen=True)
class LowHighPass:
    """MFM low-pass / high-pass frequency masking (ablation).

    Per image, with probability ``p_low`` keep only ``d < radius`` (low-pass), otherwise
    keep only ``d >= radius`` (high-pass); ``d`` is the distance to the centred spectrum's
    centre ``(H // 2, W // 2)`` in frequency bins. ``size`` may be an int (square).
    """

    size: tuple[int, int]
    radius: float = 16
    p_low: float = 0.5
    output: str = "real"
    clip: bool = True  # clip the result to [0, 1] as MFM does

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _as_size(self.size))
        if not self.radius > 0:
            raise ValueError(f"radius must be > 0, got radius={self.radius}")
        farthest = float(np.sqrt(_sq_distance(self.size).max()))
        if not self.radius <= farthest:  # else low-pass keeps and high-pass removes everything
            raise ValueError(
                f"radius={self.radius} is beyond the {self.size[0]}x{self.size[1]} spectrum's "
                f"farthest frequency ({farthest:.1f} bins from its centre): expected <= that"
            )
        if not 0.0 <= self.p_low <= 1.0:
            raise ValueError(f"p_low must be in [0, 1], got p_low={self.p_low}")
        _check_output(self.output)

    def sample(self, key: jax.Array, batch: int) -> jax.Array:
        """Draw low/high-pass per image; bool [B, H, W], True = removed (unshifted layout)."""
        high = np.sqrt(_sq_distance(self.size)) >= self.radius  # [H, W] removed by low-pass
        return _sample_low_high(key, high, np.float32(self.p_low), batch=batch)

    def __call__(self, images: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Filter ``images`` [B, H, W, C] -> (filtered [B, H, W, C], removed [B, H, W])."""
        _check_images(images, self.size)
        removed = self.sample(key, images.shape[0])  # [B, H, W]
        return _sharded_filter(images, removed, output=self.output, clip=self.clip), removed
