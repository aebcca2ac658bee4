"""URFM's representation objective on small random inputs: the student's views, the target
normalisation and the per-image loss, against numpy and torch references."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_config

from usfm_jax.masking.spatial import SpatialMasking
from usfm_jax.objectives.representation import RepresentationMIM, create_representation

IMAGE, PATCH = (32, 48), 8  # a 4 x 6 grid of 8-px patches: N = 24 tokens
N = (IMAGE[0] // PATCH) * (IMAGE[1] // PATCH)


def _objective(mask_patch_size=PATCH, ratio=0.3, **kwargs) -> RepresentationMIM:
    masking = SpatialMasking(IMAGE, PATCH, mask_patch_size, ratio, rule="mask_token")
    return RepresentationMIM(masking=masking, **kwargs)


def _images(batch=4, seed=0):
    return np.random.default_rng(seed).uniform(size=(batch, *IMAGE, 3)).astype(np.float32)


def _masked_count(mask_patch_size, ratio):
    """SimMIM's count: ceil(ratio x mask units), each unit covering (unit / patch)^2 tokens."""
    units = (IMAGE[0] // mask_patch_size) * (IMAGE[1] // mask_patch_size)
    return math.ceil(ratio * units) * (mask_patch_size // PATCH) ** 2


# random masking (units of the model patch): 24 units -> ceil(7.2) = 8 tokens, not round(7.2);
# block-wise: 6 units -> ceil(2.4) = 3 units = 12 tokens, not ceil(0.4 x 24 tokens) = 10
@pytest.mark.parametrize(("mask_patch_size", "ratio"), [(8, 0.3), (16, 0.4)])
def test_mae_views_keep_exactly_the_visible_patches_in_order(mask_patch_size, ratio):
    """The MAE encoder gets the unmasked patches, sorted; the masked ones, ceil(ratio x units)
    whole mask units per image, carry the loss weight."""
    objective = _objective(mask_patch_size, ratio)
    images = _images()
    views = objective.views(images, jax.random.key(1))
    mask = np.asarray(views.weight) > 0  # loss_on="masked": weight 1 on masked tokens, else 0
    assert set(np.unique(np.asarray(views.weight))) == {0.0, 1.0}
    expected = _masked_count(mask_patch_size, ratio)
    assert objective.num_masked_tokens == expected
    np.testing.assert_array_equal(mask.sum(1), expected)
    keep = np.asarray(views.keep)
    assert keep.dtype == np.int32 and keep.shape == (len(images), N - expected)
    for b in range(len(images)):
        assert not mask[b, keep[b]].any()  # no masked patch reaches the encoder
        assert np.all(np.diff(keep[b]) > 0)  # in order, no repeats
        np.testing.assert_array_equal(keep[b], np.flatnonzero(~mask[b]))
    units = mask.reshape(len(images), 4 // (s := mask_patch_size // PATCH), s, 6 // s, s)
    assert np.all(units == units[:, :, :1, :, :1])  # constant within each mask unit
    assert not np.asarray(views.token_mask).any()  # the MAE encoder has no mask tokens
    np.testing.assert_allclose(views.inputs, (images - 0.5) / 0.25, rtol=1e-6)
    other = objective.views(images, jax.random.key(2))  # a fresh mask per key
    assert not np.array_equal(np.asarray(other.weight), views.weight)


def test_views_of_simmim_and_of_loss_on_all_use_the_same_mask():
    """Same key, same mask: SimMIM swaps the masked tokens for the mask token; loss_on="all"
    weights every token while MAE still keeps only the visible ones."""
    images, key = _images(), jax.random.key(3)
    reference = _objective(16, 0.4).views(images, key)
    mask = np.asarray(reference.weight) > 0
    simmim = _objective(16, 0.4, student="simmim").views(images, key)
    assert simmim.keep is None
    np.testing.assert_array_equal(simmim.token_mask, mask)
    np.testing.assert_array_equal(simmim.weight, reference.weight)
    every = _objective(16, 0.4, loss_on="all").views(images, key)
    np.testing.assert_array_equal(every.keep, reference.keep)
    np.testing.assert_array_equal(every.weight, np.ones_like(mask, np.float32))
    simmim_all = _objective(16, 0.4, student="simmim", loss_on="all").views(images, key)
    np.testing.assert_array_equal(simmim_all.token_mask, mask)
    np.testing.assert_array_equal(simmim_all.weight, np.ones_like(mask, np.float32))


def _torch_target(features: np.ndarray, norm: str) -> np.ndarray:
    x = torch.from_numpy(features).double()
    if norm == "layernorm":
        x = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
    elif norm == "l2":
        x = F.normalize(x, dim=-1)
    return x.numpy()


@pytest.mark.parametrize("norm", ["layernorm", "l2", "none"])
def test_targets_match_torch(norm):
    """Per-token normalisation of the teacher's features: F.layer_norm (no affine, eps 1e-6),
    F.normalize, or the features as they are; float32 whatever the teacher's dtype."""
    rng = np.random.default_rng(4)
    scale = np.array([[[0.05]], [[1.0]], [[30.0]]])  # small variance: eps matters
    features = (2.0 + scale * rng.normal(size=(3, 5, 16))).astype(np.float32)
    out = _objective(target_norm=norm).targets(jax.numpy.asarray(features))
    assert out.dtype == np.float32 and out.shape == features.shape
    np.testing.assert_allclose(out, _torch_target(features, norm), rtol=2e-5, atol=2e-5)
    half = _objective(target_norm=norm).targets(jax.numpy.asarray(features, jax.numpy.bfloat16))
    assert half.dtype == np.float32


def _torch_loss(pred, target, mask, loss_fn, beta):
    """Per image: torch's mean loss over the selected tokens."""
    out = []
    for p, t, m in zip(torch.from_numpy(pred), torch.from_numpy(target), mask, strict=True):
        p, t = p[torch.from_numpy(m)].double(), t[torch.from_numpy(m)].double()
        if loss_fn == "smooth_l1":
            out.append(F.smooth_l1_loss(p, t, beta=beta))
        elif loss_fn == "cosine":
            out.append((1 - F.cosine_similarity(p, t, dim=-1)).mean())
        else:
            out.append(F.mse_loss(p, t))
    return torch.stack(out).numpy()


@pytest.mark.parametrize("loss_on", ["masked", "all"])
@pytest.mark.parametrize(
    ("loss_fn", "beta"), [("smooth_l1", 2.0), ("smooth_l1", 0.5), ("cosine", 2.0), ("mse", 2.0)]
)
def test_loss_matches_torch_over_the_documented_tokens(loss_fn, beta, loss_on):
    """The per-image loss is torch's loss averaged over the masked tokens (loss_on="masked")
    or over every token (loss_on="all") of that image."""
    objective = _objective(8, 0.3, loss_fn=loss_fn, beta=beta, loss_on=loss_on)
    key = jax.random.key(5)
    views = objective.views(_images(3), key)
    mask = np.ones((3, N), bool)  # masked: the patches the MAE encoder does not keep
    np.put_along_axis(mask, np.asarray(_objective(8, 0.3).views(_images(3), key).keep), False, 1)
    selected = mask if loss_on == "masked" else np.ones_like(mask)
    rng = np.random.default_rng(6)
    # differences on both sides of beta (smooth-L1's quadratic and linear parts)
    pred = (3.0 * rng.normal(size=(3, N, 16))).astype(np.float32)
    target = rng.normal(size=(3, N, 16)).astype(np.float32)
    out = objective.loss(pred, target, views.weight)
    assert out.shape == (3,)
    np.testing.assert_allclose(out, _torch_loss(pred, target, selected, loss_fn, beta), rtol=1e-5)


def test_create_representation_reads_the_config():
    """Every field of ``config.representation`` reaches the objective."""
    config = make_tiny_config()
    config.image_size = (64, 96)  # room for 32-px mask units
    config.representation.update(
        enabled=True, student="simmim", ratio=0.4, mask_patch_size=32, target_norm="l2",
        loss="cosine", beta=0.7, loss_on="all", weight=0.3,
    )  # fmt: skip
    config.normalization.update(mean=0.2, std=0.7)
    objective = create_representation(config)
    assert objective.masking == SpatialMasking(
        tuple(config.image_size), config.model.patch_size, 32, 0.4, rule="mask_token"
    )
    assert (objective.student, objective.target_norm, objective.loss_fn) == (
        "simmim", "l2", "cosine",
    )  # fmt: skip
    assert (objective.beta, objective.loss_on, objective.weight) == (0.7, "all", 0.3)
    assert (objective.mean, objective.std) == (0.2, 0.7)
    config.representation.enabled = False
    assert create_representation(config) is None
