"""The dual-MIM objective: views per combine mode; which pixels and frequencies count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config

from usfm_jax.objectives.dual import FREQUENCY, SPATIAL, create_objective
from usfm_jax.objectives.frequency import fft_loss
from usfm_jax.objectives.pixel import normalize_patches, patch_loss
from usfm_jax.patches import patchify

B, H, W, P = 4, 32, 48, 16
N = (H // P) * (W // P)


def _images(seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (B, H, W, 1))


def _objective(**overrides):
    return create_objective(make_tiny_config(**overrides))


@pytest.mark.parametrize(
    "combine, views, branches",
    [
        ("both", 2 * B, [SPATIAL, FREQUENCY] * B),
        ("split", B, [SPATIAL, FREQUENCY] * (B // 2)),
    ],
)
def test_views_per_combine_mode(combine, views, branches):
    obj = _objective(**{"objective.combine": combine})
    v = obj.views(_images(), jax.random.key(1), jnp.int32(0))
    assert v.inputs.shape == (views, H, W, 1)
    assert v.patch_weight.shape == (views, N)
    np.testing.assert_array_equal(v.branch, branches)
    np.testing.assert_array_equal(obj.branch_counts(v), [branches.count(0), branches.count(1)])
    # targets are the clean images, normalised
    clean = obj.normalize(_images())
    source = np.arange(views) // 2 if combine == "both" else np.arange(views)
    for i in range(views):
        np.testing.assert_allclose(v.target[i], clean[source[i]], rtol=1e-6)


def test_alternate_switches_branch_every_step():
    obj = _objective(**{"objective.combine": "alternate"})
    even = obj.views(_images(), jax.random.key(1), jnp.int32(4))
    odd = obj.views(_images(), jax.random.key(1), jnp.int32(5))
    np.testing.assert_array_equal(even.branch, [SPATIAL] * B)
    np.testing.assert_array_equal(odd.branch, [FREQUENCY] * B)


def test_single_branch_configs():
    spatial_only = _objective(**{"frequency.enabled": False})
    assert spatial_only.branches == ("spatial",)
    v = spatial_only.views(_images(), jax.random.key(0), jnp.int32(0))
    assert v.inputs.shape[0] == B and (np.asarray(v.branch) == SPATIAL).all()
    frequency_only = _objective(**{"spatial.enabled": False})
    v = frequency_only.views(_images(), jax.random.key(0), jnp.int32(0))
    assert frequency_only.branches == ("frequency",) and (np.asarray(v.branch) == FREQUENCY).all()


def test_spatial_loss_counts_only_masked_patches():
    obj = _objective(**{"frequency.enabled": False})
    v = obj.views(_images(), jax.random.key(2), jnp.int32(0))
    counts = obj.branch_counts(v)
    pred = jax.random.normal(jax.random.key(3), (B, N, P * P))
    loss, _ = obj.loss(pred, v, counts)
    unmasked = ~np.asarray(v.patch_weight, bool)
    assert unmasked.any()
    perturbed = jnp.where(unmasked[..., None], pred + 10.0, pred)
    np.testing.assert_allclose(obj.loss(perturbed, v, counts)[0], loss, rtol=1e-6)
    masked_changed = jnp.where(~unmasked[..., None], pred + 1.0, pred)
    assert abs(float(obj.loss(masked_changed, v, counts)[0]) - float(loss)) > 0.1


def test_loss_matches_numpy_reference():
    obj = _objective(**{"objective.combine": "both", "objective.spatial_weight": 0.7})
    v = obj.views(_images(), jax.random.key(4), jnp.int32(0))
    pred = jax.random.normal(jax.random.key(5), (2 * B, N, P * P))
    loss, sums = obj.loss(pred, v, obj.branch_counts(v))
    target = np.asarray(patchify(v.target, P))
    err = np.abs(np.asarray(pred) - target).mean(-1)  # [V, N]
    w = np.asarray(v.patch_weight)
    per_view = (err * w).sum(-1) / w.sum(-1)
    spatial, frequency = per_view[0::2], per_view[1::2]  # views interleave the branches
    expected = 0.7 * spatial.mean() + 1.0 * frequency.mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(sums["loss_spatial"], spatial.sum(), rtol=1e-5)


def test_fft_loss_matches_numpy():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 3, 8, 10, 2)).astype(np.float32)
    weight = (rng.uniform(size=(3, 8, 10)) > 0.5).astype(np.float32)
    diff = np.fft.fft2(pred, axes=(1, 2), norm="ortho") - np.fft.fft2(
        target, axes=(1, 2), norm="ortho"
    )
    dist = np.sqrt(diff.real**2 + diff.imag**2).mean(-1)
    expected = (dist * weight).sum((1, 2)) / weight.sum((1, 2))
    np.testing.assert_allclose(fft_loss(pred, target, weight), expected, rtol=1e-5)


def test_frequency_fft_loss_is_added_for_frequency_views_only():
    base = {"objective.combine": "both"}
    plain = _objective(**base)
    spectral = _objective(**base, **{"objective.frequency_fft_weight": 1.0})
    v = plain.views(_images(), jax.random.key(6), jnp.int32(0))
    pred = jax.random.normal(jax.random.key(7), (2 * B, N, P * P))
    counts = plain.branch_counts(v)
    _, s0 = plain.loss(pred, v, counts)
    _, s1 = spectral.loss(pred, v, counts)
    np.testing.assert_allclose(s1["loss_spatial"], s0["loss_spatial"], rtol=1e-6)
    assert float(s1["loss_frequency"]) > float(s0["loss_frequency"]) + 0.1


def test_pixel_helpers():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(2, 5, 12)).astype(np.float32)
    z = np.asarray(normalize_patches(x))
    np.testing.assert_allclose(z.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(-1), 1, atol=1e-3)
    w = np.zeros((2, 5), np.float32)
    np.testing.assert_array_equal(patch_loss(x, x + 1, w, "l1"), [0, 0])  # nothing weighted
    w[:, 0] = 1
    np.testing.assert_allclose(patch_loss(x, x + 2, w, "l2"), [4, 4])
