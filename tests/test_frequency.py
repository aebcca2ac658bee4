"""Tests for usfm_jax.masking.frequency against an independent numpy reference.

The reference below is written from the USFM / MFM algorithm description (plain loops,
``np.fft.fftshift``-centred spectra) and does not call the module under test.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from usfm_jax.masking.frequency import (
    BandStop,
    LowHighPass,
    apply_frequency_mask,
    ring_map,
    ring_radii,
)

# ----------------------------------------------------------------------------------------
# Independent numpy reference
# ----------------------------------------------------------------------------------------


def ref_radii(h: int, w: int, cp: int, bw: int, f: float, mi: int) -> list[int]:
    """Radii per the description: r0=cp, r1=bw, r+=min(floor(r*f), mi) while <= min(h,w)/2."""
    radii = [cp, bw]
    limit = min(h, w) / 2
    while True:
        inc = math.floor(radii[-1] * f)
        if inc > mi:
            inc = mi
        nxt = radii[-1] + inc
        if nxt > limit:
            return radii
        radii.append(nxt)


def ref_distance_shifted(h: int, w: int) -> np.ndarray:
    """Euclidean distance of every bin of the centred spectrum to (h//2, w//2)."""
    d = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            d[i, j] = math.hypot(i - h // 2, j - w // 2)
    return d  # [H, W]


def ref_ring_map_shifted(h: int, w: int, radii: list[int]) -> np.ndarray:
    """Ring id per bin on the centred spectrum; -1 outside every ring."""
    d = ref_distance_shifted(h, w)
    out = np.full((h, w), -1)
    for k in range(len(radii) - 1):
        out[(d > radii[k]) & (d <= radii[k + 1])] = k
    return out  # [H, W]


def ref_filter(img: np.ndarray, removed_shifted: np.ndarray, output: str) -> np.ndarray:
    """FFT one [H, W, C] image, zero the (centred-layout) removed bins, inverse FFT."""
    spec = np.fft.fftshift(np.fft.fft2(img.astype(np.float64), axes=(0, 1)), axes=(0, 1))
    spec[removed_shifted] = 0
    y = np.fft.ifft2(np.fft.ifftshift(spec, axes=(0, 1)), axes=(0, 1))
    return np.abs(y) if output == "abs" else np.real(y)


def shifted(mask: jax.Array | np.ndarray) -> np.ndarray:
    """Unshifted [.., H, W] layout -> centred layout."""
    return np.fft.fftshift(np.asarray(mask), axes=(-2, -1))


# (size, center_protect, base_bw, increase_factor, max_increase)
PARAMS = [
    ((224, 224), 5, 10, 0.5, 20),  # USFM worked example
    ((64, 64), 2, 4, 0.5, 3),  # capping from the 3rd ring on
    ((96, 96), 0, 3, 1.0, 8),  # no protected disk beyond DC itself, doubling then capped
    ((128, 128), 3, 8, 0.25, 5),
    ((224, 224), 4, 16, 0.7, 12),
    ((65, 65), 1, 5, 0.4, 4),  # odd size: bound 32.5
    ((64, 96), 2, 6, 0.5, 6),  # non-square: bound min(H, W) / 2 = 32
    ((64, 64), 2, 4, 1.0, 8),  # last radius lands exactly on the bound n / 2 = 32
]


def _kw(cp, bw, f, mi):
    return dict(center_protect=cp, base_bw=bw, increase_factor=f, max_increase=mi)


def _images(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """Uniform [0, 1) float32 test images (numpy RNG: no per-shape XLA compile)."""
    return jnp.asarray(np.random.default_rng(seed).random(shape, dtype=np.float32))


# ----------------------------------------------------------------------------------------
# Ring geometry
# ----------------------------------------------------------------------------------------


def test_worked_example_radii():
    radii = ring_radii(224, center_protect=5, base_bw=10, increase_factor=0.5, max_increase=20)
    assert radii == (5, 10, 15, 22, 33, 49, 69, 89, 109)
    bs = BandStop.create(
        224, ratio=0.5, center_protect=5, base_bw=10, increase_factor=0.5, max_increase=20
    )
    assert bs.num_rings == 8 and bs.num_drop == 4
    # On-axis integer distances covered by each ring, from the description.
    row = shifted(bs.ring_ids)[112, 112:]  # distances 0..111 along +x
    spans = [(6, 10), (11, 15), (16, 22), (23, 33), (34, 49), (50, 69), (70, 89), (90, 109)]
    for k, (lo, hi) in enumerate(spans):
        assert np.all(row[lo : hi + 1] == k)
    assert np.all(row[:6] == -1) and np.all(row[110:] == -1)


@pytest.mark.parametrize(("size", "cp", "bw", "f", "mi"), PARAMS)
def test_radii_and_ring_map_match_reference(size, cp, bw, f, mi):
    h, w = size
    expected = ref_radii(h, w, cp, bw, f, mi)
    radii = ring_radii(size, **_kw(cp, bw, f, mi))
    assert list(radii) == expected
    assert len(expected) >= 3
    got = ring_map(size, radii)
    assert got.shape == (h, w) and got.dtype == np.int32
    np.testing.assert_array_equal(shifted(got), ref_ring_map_shifted(h, w, expected))
    # DC sits at [0, 0] in the unshifted layout.
    assert got[0, 0] == -1


def test_last_radius_may_equal_half_size():
    radii = ring_radii(64, center_protect=2, base_bw=4, increase_factor=1.0, max_increase=8)
    assert radii[-1] == 32  # "does not exceed n/2": equality is kept
    assert ring_map(64, radii)[32, 0] == len(radii) - 2  # Nyquist row bin, d = 32


def test_max_increase_caps_growth():
    radii = ring_radii(128, center_protect=3, base_bw=8, increase_factor=0.25, max_increase=5)
    steps = np.diff(radii[1:])
    assert steps.max() == 5 and np.sum(steps == 5) >= 5  # capped repeatedly


def test_square_int_size_equals_tuple():
    kw = _kw(5, 10, 0.5, 20)
    assert ring_radii(96, **kw) == ring_radii((96, 96), **kw)


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "cp", "bw", "f", "mi", "ratio"),
    [
        ((64, 64), 2, 4, 0.5, 3, 0.5),
        ((96, 96), 0, 3, 1.0, 8, 0.3),
        ((64, 96), 2, 6, 0.5, 6, 0.75),
        ((128, 128), 3, 8, 0.25, 5, 1.0),
    ],
)
def test_sample_drops_exactly_num_drop_distinct_rings(size, cp, bw, f, mi, ratio):
    h, w = size
    radii = ref_radii(h, w, cp, bw, f, mi)
    n_rings = len(radii) - 1
    want = int(ratio * n_rings)
    ref_map = ref_ring_map_shifted(h, w, radii)
    bs = BandStop.create(size, ratio=ratio, **_kw(cp, bw, f, mi))
    assert (bs.num_rings, bs.num_drop) == (n_rings, want)

    removed = shifted(bs.sample(jax.random.key(0), 64))  # [B, H, W] centred
    assert removed.shape == (64, h, w) and removed.dtype == bool
    subsets = set()
    for b in range(64):
        ids = np.unique(ref_map[removed[b]])
        assert -1 not in ids
        assert len(ids) == want
        # The removed set is exactly the union of those rings.
        np.testing.assert_array_equal(removed[b], np.isin(ref_map, ids))
        subsets.add(tuple(ids))
    if want < n_rings:
        assert len(subsets) > 10  # images get different ring subsets
    else:
        assert len(subsets) == 1


def test_protected_disk_and_corners_never_masked():
    size, cp, bw, f, mi = (64, 64), 3, 6, 0.5, 4
    radii = ref_radii(*size, cp, bw, f, mi)
    bs = BandStop.create(size, ratio=0.5, **_kw(cp, bw, f, mi))
    ever = np.zeros(size, bool)
    for seed in range(8):
        ever |= shifted(bs.sample(jax.random.key(seed), 128)).any(axis=0)
    d = ref_distance_shifted(*size)
    assert not ever[d <= cp].any()
    assert not ever[d > radii[-1]].any()
    assert (d > radii[-1]).any()  # the corners exist for this geometry
    # ... and every ring bin is removed at least once.
    assert ever[(d > cp) & (d <= radii[-1])].all()


def test_ring_selection_is_uniform():
    bs = BandStop.create(64, ratio=0.5, **_kw(2, 4, 0.5, 3))
    ref_map = ref_ring_map_shifted(64, 64, ref_radii(64, 64, 2, 4, 0.5, 3))
    removed = shifted(bs.sample(jax.random.key(3), 2000))  # [B, H, W]
    counts = np.array([removed[:, ref_map == k].any(axis=1).mean() for k in range(bs.num_rings)])
    np.testing.assert_allclose(counts, bs.num_drop / bs.num_rings, atol=0.05)


def test_different_keys_give_different_masks():
    bs = BandStop.create(64, ratio=0.5, **_kw(2, 4, 0.5, 3))
    a = bs.sample(jax.random.key(0), 8)
    b = bs.sample(jax.random.key(1), 8)
    assert not np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------
# Filtering
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (33, 40)])
def test_all_pass_returns_input(size):
    x = _images(0, (2, *size, 3))  # non-negative, in [0, 1)
    keep_all = jnp.zeros((2, *size), bool)
    for output in ("real", "abs"):
        y = apply_frequency_mask(x, keep_all, output)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(jnp.max(jnp.abs(y - x))) < 1e-5
    # Signed input: "real" is still the identity.
    xs = x - 0.5
    assert float(jnp.max(jnp.abs(apply_frequency_mask(xs, keep_all, "real") - xs))) < 1e-5


@pytest.mark.parametrize("output", ["abs", "real"])
def test_apply_frequency_mask_matches_numpy(output):
    h, w = 64, 96
    x = _images(1, (3, h, w, 2))
    removed = jnp.asarray(np.random.default_rng(2).random((3, h, w)) < 0.4)
    y = np.asarray(apply_frequency_mask(x, removed, output))
    xs, rs = np.asarray(x), shifted(removed)
    for b in range(3):
        np.testing.assert_allclose(y[b], ref_filter(xs[b], rs[b], output), atol=1e-4)


@pytest.mark.parametrize(("size", "cp", "bw", "f", "mi"), [PARAMS[0], PARAMS[6]])
def test_band_stop_matches_reference(size, cp, bw, f, mi):
    h, w = size
    radii = ref_radii(h, w, cp, bw, f, mi)
    ref_map = ref_ring_map_shifted(h, w, radii)
    bs = BandStop.create(size, ratio=0.5, **_kw(cp, bw, f, mi))
    x = _images(4, (2, h, w, 3))
    y, removed = bs(x, jax.random.key(5))
    assert y.shape == x.shape and y.dtype == jnp.float32
    xs, rs = np.asarray(x), shifted(removed)
    for b in range(2):
        ids = np.unique(ref_map[rs[b]])
        assert len(ids) == int(0.5 * (len(radii) - 1)) and -1 not in ids
        ref_removed = np.isin(ref_map, ids)
        np.testing.assert_array_equal(rs[b], ref_removed)
        np.testing.assert_allclose(
            np.asarray(y[b]), ref_filter(xs[b], ref_removed, "abs"), atol=1e-4
        )
        # The filter actually changed the image.
        assert np.abs(np.asarray(y[b]) - xs[b]).max() > 1e-2


def test_band_stop_real_output_and_same_mask_all_channels():
    bs = BandStop.create(64, ratio=0.5, output="real", **_kw(2, 4, 0.5, 3))
    x1 = _images(6, (2, 64, 64, 1))
    x = jnp.concatenate([x1, 2.0 * x1, -x1], axis=-1)  # [B, H, W, 3]
    y, removed = bs(x, jax.random.key(7))
    y = np.asarray(y)
    # Linear filter + same mask per channel => channels scale like the input.
    np.testing.assert_allclose(y[..., 1], 2.0 * y[..., 0], atol=1e-5)
    np.testing.assert_allclose(y[..., 2], -y[..., 0], atol=1e-5)
    ref = ref_filter(np.asarray(x[0]), shifted(removed[0]), "real")
    np.testing.assert_allclose(y[0], ref, atol=1e-4)


def test_bf16_input_keeps_dtype():
    bs = BandStop.create(64, ratio=0.5, **_kw(2, 4, 0.5, 3))
    x = _images(8, (2, 64, 64, 3))
    y32, r32 = bs(x, jax.random.key(9))
    y16, r16 = bs(x.astype(jnp.bfloat16), jax.random.key(9))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(r16), np.asarray(r32))
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), atol=2e-2)


def test_works_under_jit_and_is_hashable():
    make = lambda: BandStop.create(32, ratio=0.5, **_kw(2, 4, 0.5, 3))
    bs = make()
    x = _images(10, (2, 32, 32, 3))
    key = jax.random.key(11)
    # Closed over in a jitted function.
    y_c, r_c = jax.jit(lambda im, k: bs(im, k))(x, key)
    ref = ref_filter(np.asarray(x[1]), shifted(r_c[1]), "abs")
    np.testing.assert_allclose(np.asarray(y_c[1]), ref, atol=1e-4)

    # Passed as a static argument: equal-by-value instances hash alike, so no retrace.
    other = make()
    assert other is not bs and other == bs and hash(other) == hash(bs)
    different = BandStop.create(32, ratio=0.75, **_kw(2, 4, 0.5, 3))
    assert different != bs
    traces = []

    def step(m, im, k):
        traces.append(m)
        return m(im, k)

    jstep = jax.jit(step, static_argnums=0)
    y_s, r_s = jstep(bs, x, key)
    np.testing.assert_array_equal(np.asarray(r_s), np.asarray(r_c))
    np.testing.assert_allclose(np.asarray(y_s), np.asarray(y_c), atol=1e-5)
    jstep(other, x, key)
    assert len(traces) == 1
    jstep(different, x, key)
    assert len(traces) == 2


def test_wrong_image_shape_raises():
    bs = BandStop.create(64, ratio=0.5, **_kw(2, 4, 0.5, 3))
    with pytest.raises(ValueError, match="images"):
        bs(jnp.zeros((2, 64, 32, 3)), jax.random.key(0))


# ----------------------------------------------------------------------------------------
# MFM low/high-pass
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "radius"), [((64, 64), 16.0), ((64, 96), 10.5)])
def test_low_high_pass_masks(size, radius):
    h, w = size
    lh = LowHighPass(size, radius=radius, p_low=0.5)
    d = ref_distance_shifted(h, w)
    removed = shifted(lh.sample(jax.random.key(0), 64))  # [B, H, W]
    n_low = 0
    for b in range(64):
        is_low = not removed[b, h // 2, w // 2]  # DC kept <=> low-pass
        n_low += is_low
        expected = (d >= radius) if is_low else (d < radius)
        np.testing.assert_array_equal(removed[b], expected)
    assert 0 < n_low < 64


def test_low_high_pass_radius_must_reach_into_the_spectrum():
    corner = float(np.hypot(16, 16))  # 32 x 32: the farthest bin from the centre
    LowHighPass(32, radius=corner)  # the corner itself is high-pass
    with pytest.raises(ValueError, match=r"beyond the 32x32 spectrum's farthest frequency"):
        LowHighPass(32, radius=corner + 0.01)


@pytest.mark.parametrize("p_low", [0.0, 0.3, 1.0])
def test_low_pass_fraction(p_low):
    lh = LowHighPass(32, radius=8, p_low=p_low)
    removed = np.asarray(lh.sample(jax.random.key(1), 4000))
    frac_low = 1.0 - removed[:, 0, 0].mean()  # DC is at [0, 0] unshifted
    assert abs(frac_low - p_low) < 0.04


def test_low_high_pass_filter_matches_reference():
    lh = LowHighPass((64, 96), radius=16)
    assert lh.output == "real" and lh.clip
    x = _images(12, (4, 64, 96, 3))
    y, removed = jax.jit(lambda im, k: lh(im, k))(x, jax.random.key(13))
    y = np.asarray(y)
    assert y.min() >= 0.0 and y.max() <= 1.0
    xs, rs = np.asarray(x), shifted(removed)
    for b in range(4):
        ref = np.clip(ref_filter(xs[b], rs[b], "real"), 0.0, 1.0)
        np.testing.assert_allclose(y[b], ref, atol=1e-4)
    # Without clipping, the high-pass output goes negative.
    raw, r2 = LowHighPass((64, 96), radius=16, p_low=0.0, clip=False)(x, jax.random.key(0))
    assert float(raw.min()) < 0.0
    np.testing.assert_allclose(
        np.asarray(raw[0]), ref_filter(xs[0], shifted(r2[0]), "real"), atol=1e-4
    )


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------

GOOD = dict(ratio=0.5, center_protect=5, base_bw=10, increase_factor=0.5, max_increase=20)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (dict(base_bw=2, increase_factor=0.4), r"base_bw=2.*increase_factor=0\.4"),
        (dict(increase_factor=0.05), r"base_bw=10.*increase_factor=0\.05"),
        (dict(increase_factor=-0.5), r"increase_factor=-0\.5"),
        (dict(increase_factor=float("nan")), r"increase_factor=nan"),
        (dict(base_bw=40), r"base_bw=40"),  # > 64 / 2: zero rings
        (dict(base_bw=5), r"base_bw=5.*center_protect=5"),
        (dict(base_bw=4), r"base_bw=4.*center_protect=5"),
        (dict(ratio=0.1), r"ratio=0\.1.*num_rings=3"),  # int(0.1 * 3) == 0
        (dict(ratio=0.0), r"ratio=0\.0"),
        (dict(ratio=1.5), r"ratio=1\.5"),
        (dict(ratio=-0.2), r"ratio=-0\.2"),
        (dict(max_increase=0), r"max_increase=0"),
        (dict(center_protect=-1), r"center_protect=-1"),
        (dict(output="imag"), r"output='imag'"),
    ],
)
def test_band_stop_invalid_settings_raise(override, match):
    # With size 64 the GOOD setting has 3 rings (next radius 33 > 32).
    assert ref_radii(64, 64, 5, 10, 0.5, 20) == [5, 10, 15, 22]
    BandStop.create(64, **GOOD)  # the base setting is valid
    with pytest.raises(ValueError, match=match):
        BandStop.create(64, **{**GOOD, **override})


def test_ring_radii_invalid_settings_raise():
    with pytest.raises(ValueError, match=r"base_bw=1.*increase_factor=0\.5"):
        ring_radii(64, center_protect=0, base_bw=1, increase_factor=0.5, max_increase=4)
    with pytest.raises(ValueError, match="base_bw=33"):
        ring_radii((64, 96), center_protect=0, base_bw=33, increase_factor=0.5, max_increase=4)
    with pytest.raises(ValueError, match="radii"):
        ring_map(64, [5])
    with pytest.raises(ValueError, match="radii"):
        ring_map(64, [5, 5, 10])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(radius=0.0), "radius=0.0"),
        (dict(p_low=1.5), r"p_low=1\.5"),
        (dict(p_low=-0.1), r"p_low=-0\.1"),
        (dict(output="phase"), "output='phase'"),
    ],
)
def test_low_high_pass_invalid_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowHighPass(64, **kwargs)


def test_apply_frequency_mask_invalid_output_raises():
    with pytest.raises(ValueError, match="output='bogus'"):
        apply_frequency_mask(jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8), bool), "bogus")
