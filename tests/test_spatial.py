"""Spatial masking: exact ratio per image, corruption confined to masked regions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from usfm_jax.masking.sampling import exact_count_mask
from usfm_jax.masking.spatial import RULES, SpatialMasking


def _masking(**kw) -> SpatialMasking:
    args = dict(image_size=(64, 96), patch_size=16, mask_patch_size=32, ratio=0.6, rule="gaussian")
    return SpatialMasking(**{**args, **kw})


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.6, 0.75, 0.99])
def test_mask_ratio_is_exact_per_image(ratio):
    m = _masking(ratio=ratio, mask_patch_size=16)
    mask = np.asarray(m.sample(jax.random.key(0), 64))  # [B, 4, 6]
    expected = math.ceil(ratio * 24)
    np.testing.assert_array_equal(mask.reshape(64, -1).sum(-1), expected)


def test_masks_differ_between_images_and_cover_all_positions():
    mask = np.asarray(exact_count_mask(jax.random.key(1), 256, 12, 5))
    assert len({row.tobytes() for row in mask}) > 200
    frequency = mask.mean(0)  # every position is masked about 5/12 of the time
    np.testing.assert_allclose(frequency, 5 / 12, atol=0.1)


def test_token_and_pixel_masks_agree_with_mask_patches():
    m = _masking()
    mask = m.sample(jax.random.key(2), 3)  # [3, 2, 3]
    tokens = np.asarray(m.token_mask(mask)).reshape(3, 4, 6)
    pixels = np.asarray(m.pixel_mask(mask))[..., 0]  # [3, 64, 96]
    mask = np.asarray(mask)
    for b in range(3):
        np.testing.assert_array_equal(tokens[b], np.kron(mask[b], np.ones((2, 2))).astype(bool))
        np.testing.assert_array_equal(pixels[b], np.kron(mask[b], np.ones((32, 32))).astype(bool))


@pytest.mark.parametrize("rule", RULES)
def test_corruption_touches_only_masked_pixels(rule):
    m = _masking(rule=rule, sigma=0.3)
    images = jax.random.uniform(jax.random.key(3), (4, 64, 96, 1))
    mask = m.sample(jax.random.key(4), 4)
    out = np.asarray(m.corrupt(images, mask, jax.random.key(5)))
    pixels = np.asarray(m.pixel_mask(mask))
    images = np.asarray(images)
    np.testing.assert_array_equal(out[~pixels.repeat(1, -1)], images[~pixels])
    changed = out[pixels] != images[pixels]
    if rule == "mask_token":
        assert not changed.any()  # pixels untouched: the encoder swaps in the mask token
    else:
        assert changed.mean() > 0.99


def test_corruption_rules_have_their_statistics():
    images = jnp.full((8, 64, 96, 1), 0.5)
    mask = jnp.ones((8, 2, 3), bool)
    key = jax.random.key(6)
    gaussian = np.asarray(_masking(rule="gaussian", sigma=0.2).corrupt(images, mask, key))
    np.testing.assert_allclose([gaussian.mean(), gaussian.std()], [0.5, 0.2], atol=5e-3)
    speckle = np.asarray(_masking(rule="speckle", sigma=0.2).corrupt(images, mask, key))
    np.testing.assert_allclose([speckle.mean(), speckle.std()], [0.5, 0.1], atol=5e-3)
    replace = np.asarray(_masking(rule="replace").corrupt(images, mask, key))
    assert replace.min() >= 0 and replace.max() <= 1
    np.testing.assert_allclose(replace.std(), np.sqrt(1 / 12), atol=5e-3)
    # mean fill: each image's own mean (two different images: a ramp and a dimmer, squared one)
    ramp = np.broadcast_to(np.linspace(0, 1, 96, dtype=np.float32), (64, 96))
    two = np.stack([ramp, 0.5 * ramp**2])[..., None]  # [2, 64, 96, 1], means 0.5 and ~0.17
    corner = jnp.array([[[True, False, False], [False, False, False]]] * 2)
    mean = np.asarray(_masking(rule="mean").corrupt(jnp.asarray(two), corner, key))
    for b in range(2):
        np.testing.assert_allclose(mean[b, :32, :32], two[b].mean(), rtol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(ratio=1.0), "mask ratio"),
        (dict(ratio=-0.1), "mask ratio"),
        (dict(mask_patch_size=24), "multiple of the model patch"),
        (dict(image_size=(64, 80)), "not a multiple of mask_patch_size"),
        (dict(rule="blur"), "rule"),
        (dict(sigma=-1.0), "sigma"),
    ],
)
def test_invalid_settings_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        _masking(**kw)
