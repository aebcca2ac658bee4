"""The dual-MIM objective: views per combine mode; which pixels and frequencies count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config
from test_frequency import ref_filter
from test_model import ref_patchify

from usfm_jax.objectives.dual import FREQUENCY, SPATIAL, create_objective
from usfm_jax.objectives.frequency import fft_loss
from usfm_jax.objectives.pixel import normalize_patches, patch_loss

B, H, W, P = 4, 32, 48, 16
N = (H // P) * (W // P)
MEAN, STD = 0.3, 0.2  # the tests' normalization (not the demo's 0.5 / 0.25)


def _images(seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (B, H, W, 1))


def _objective(**overrides):
    norm = {"normalization.mean": MEAN, "normalization.std": STD}
    return create_objective(make_tiny_config(**{**norm, **overrides}))


# ----------------------------------------------------------------------------------------
# numpy references (written from the docstrings, not calling the code under test)
# ----------------------------------------------------------------------------------------


def _np_unpatchify(x: np.ndarray) -> np.ndarray:
    """[V, N, P * P * C] -> [V, H, W, C]."""
    v = x.shape[0]
    x = x.reshape(v, H // P, W // P, P, P, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(v, H, W, -1)


def _pixels(patch_mask: np.ndarray) -> np.ndarray:
    """[N] per-patch flags -> [H, W] bool per pixel."""
    return np.kron(patch_mask.reshape(H // P, W // P), np.ones((P, P))).astype(bool)


def _check_inputs(v, images, source) -> None:
    """The denormalised (config mean / std) model inputs against their clean source images:
    spatial views equal the image outside the masked patches (``patch_weight``) and differ
    inside; frequency views equal the numpy band-stop filter of the image with the removed
    frequencies (``freq_weight``, with the default ``fft_loss_on="removed"``)."""
    inputs = np.asarray(v.inputs) * STD + MEAN
    images = np.asarray(images)
    for i, branch in enumerate(np.asarray(v.branch)):
        clean = images[source[i]]
        if branch == SPATIAL:
            masked = _pixels(np.asarray(v.patch_weight[i]))
            assert masked.any() and not masked.all()
            np.testing.assert_allclose(inputs[i][~masked], clean[~masked], atol=1e-6)
            assert (np.abs(inputs[i][masked] - clean[masked]) > 1e-3).mean() > 0.99
        else:
            removed = np.asarray(v.freq_weight[i]).astype(bool)
            assert removed.any() and not removed.all()
            expected = ref_filter(clean, np.fft.fftshift(removed), "abs")
            assert np.abs(expected - clean).max() > 0.05  # the filter changes the image
            np.testing.assert_allclose(inputs[i], expected, atol=2e-5)


# ----------------------------------------------------------------------------------------
# views
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "combine, views, branches",
    [
        ("both", 2 * B, [SPATIAL, FREQUENCY] * B),
        ("split", B, [SPATIAL, FREQUENCY] * (B // 2)),
    ],
)
def test_views_per_combine_mode(combine, views, branches):
    """Branch layout per combine mode; targets are the clean source images normalised with the
    config's mean / std; inputs are their spatial / frequency corruptions (``_check_inputs``)."""
    obj = _objective(**{"objective.combine": combine})
    v = obj.views(_images(), jax.random.key(1), jnp.int32(0))
    assert v.inputs.shape == (views, H, W, 1)
    assert v.patch_weight.shape == (views, N)
    np.testing.assert_array_equal(v.branch, branches)
    np.testing.assert_array_equal(obj.branch_counts(v), [branches.count(0), branches.count(1)])
    source = np.arange(views) // 2 if combine == "both" else np.arange(views)
    clean = (np.asarray(_images()) - MEAN) / STD
    np.testing.assert_allclose(v.target, clean[source], rtol=1e-6, atol=1e-6)
    _check_inputs(v, _images(), source)


def test_alternate_switches_branch_every_step():
    """``alternate``: the whole batch is spatially masked on even steps, filtered on odd ones."""
    obj = _objective(**{"objective.combine": "alternate"})
    even = obj.views(_images(), jax.random.key(1), jnp.int32(4))
    odd = obj.views(_images(), jax.random.key(1), jnp.int32(5))
    np.testing.assert_array_equal(even.branch, [SPATIAL] * B)
    np.testing.assert_array_equal(odd.branch, [FREQUENCY] * B)
    _check_inputs(even, _images(), np.arange(B))
    _check_inputs(odd, _images(), np.arange(B))


def test_single_branch_configs():
    """One branch enabled: every image gives one view of that branch, corrupted accordingly."""
    spatial_only = _objective(**{"frequency.enabled": False})
    assert spatial_only.branches == ("spatial",)
    v = spatial_only.views(_images(), jax.random.key(0), jnp.int32(0))
    assert v.inputs.shape[0] == B and (np.asarray(v.branch) == SPATIAL).all()
    _check_inputs(v, _images(), np.arange(B))
    frequency_only = _objective(**{"spatial.enabled": False})
    v = frequency_only.views(_images(), jax.random.key(0), jnp.int32(0))
    assert frequency_only.branches == ("frequency",) and (np.asarray(v.branch) == FREQUENCY).all()
    _check_inputs(v, _images(), np.arange(B))


# ----------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------


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


def _reference_loss(cfg, images, v, pred, source):
    """numpy DualMIM loss for the config section ``cfg`` (the objective's docstrings).

    Per view: the l1 / l2 distance per patch (averaged over its pixels) to the clean image,
    normalised with the config's mean / std (and standardised per patch with norm_pix), averaged
    over the patches that count: spatial views the corrupted ones (found from the inputs) or all
    of them, frequency views all. Frequency views: that times frequency_pixel_weight plus
    frequency_fft_weight * the mean |FFT(pred) - FFT(target)| (orthonormal FFT) over the removed
    (or all) frequencies. Returns the total (branch weight * mean over the branch's views) and
    the per-branch sums.
    """
    o = cfg.objective
    images = np.asarray(images, np.float64)[source]
    target = (images - MEAN) / STD  # [V, H, W, C]
    target_patches = ref_patchify(target, P)
    if o.norm_pix:
        mu, var = target_patches.mean(-1, keepdims=True), target_patches.var(-1, keepdims=True)
        target_patches = (target_patches - mu) / np.sqrt(var + 1e-6)
    pred = np.asarray(pred, np.float64)
    diff = pred - target_patches
    err = (np.abs(diff) if o.pixel_loss == "l1" else diff**2).mean(-1)  # [V, N]
    branch = np.asarray(v.branch)
    corrupted = np.abs(np.asarray(v.inputs) * STD + MEAN - images) > 1e-4  # [V, H, W, C]
    corrupted_patches = ref_patchify(corrupted, P).any(-1)  # [V, N]
    per_view = np.zeros(len(branch))
    for i, b in enumerate(branch):
        if b == SPATIAL:
            w = corrupted_patches[i] if o.spatial_loss_on == "masked" else np.ones(N)
            assert 0 < w.sum() <= N
            per_view[i] = (err[i] * w).sum() / w.sum()
            continue
        per_view[i] = o.frequency_pixel_weight * err[i].mean()
        if o.frequency_fft_weight:
            if o.fft_loss_on == "removed":
                fw = np.asarray(v.freq_weight[i])  # the removed band (see _check_inputs)
                assert set(np.unique(fw)) == {0.0, 1.0}
            else:
                fw = np.ones((H, W))
            spec = np.fft.fft2(_np_unpatchify(pred[i : i + 1])[0], axes=(0, 1), norm="ortho")
            spec_t = np.fft.fft2(target[i], axes=(0, 1), norm="ortho")
            dist = np.abs(spec - spec_t).mean(-1)  # [H, W]
            per_view[i] += o.frequency_fft_weight * (dist * fw).sum() / fw.sum()
    spatial, frequency = per_view[branch == SPATIAL], per_view[branch == FREQUENCY]
    total = o.spatial_weight * spatial.mean() + o.frequency_weight * frequency.mean()
    return total, spatial.sum(), frequency.sum()


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="l1-masked"),
        pytest.param({"objective.norm_pix": True}, id="norm_pix"),
        pytest.param({"objective.pixel_loss": "l2"}, id="l2"),
        pytest.param({"objective.spatial_loss_on": "all"}, id="spatial-on-all"),
        pytest.param({"objective.frequency_pixel_weight": 0.3}, id="frequency-pixel-weight"),
        pytest.param(
            {"objective.frequency_fft_weight": 0.5, "objective.fft_loss_on": "removed"},
            id="fft-on-removed",
        ),
        pytest.param(
            {"objective.frequency_fft_weight": 0.5, "objective.fft_loss_on": "all"},
            id="fft-on-all",
        ),
        pytest.param(
            {
                "objective.combine": "split",
                "objective.pixel_loss": "l2",
                "objective.frequency_pixel_weight": 2.0,
                "objective.frequency_fft_weight": 0.25,
            },
            id="split-l2-fft",
        ),
    ],
)
def test_loss_matches_numpy_reference(overrides):
    """Total loss and the per-branch sums (loss_spatial, loss_frequency) against the numpy
    reference ``_reference_loss``, for each loss option."""
    weights = {"objective.spatial_weight": 0.7, "objective.frequency_weight": 1.3}
    cfg = make_tiny_config(
        **{"normalization.mean": MEAN, "normalization.std": STD, **weights, **overrides}
    )
    obj = create_objective(cfg)
    v = obj.views(_images(), jax.random.key(4), jnp.int32(0))
    views = v.branch.shape[0]
    source = np.arange(views) // 2 if cfg.objective.combine == "both" else np.arange(views)
    pred = jax.random.normal(jax.random.key(5), (views, N, P * P))
    loss, sums = obj.loss(pred, v, obj.branch_counts(v))
    total, spatial, frequency = _reference_loss(cfg, _images(), v, pred, source)
    np.testing.assert_allclose(loss, total, rtol=1e-5)
    np.testing.assert_allclose(sums["loss_spatial"], spatial, rtol=1e-5)
    np.testing.assert_allclose(sums["loss_frequency"], frequency, rtol=1e-5)


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


def test_pixel_helpers():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(2, 5, 12)).astype(np.float32)
    z = np.asarray(normalize_patches(x))
    np.testing.assert_allclose(z.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(-1), 1, atol=1e-3)
    w = np.zeros((2, 5), np.float32)
    np.testing.assert_array_equal(patch_loss(x, x + 1, w, "l1"), [0, 0])  # nothing weighted
    w[:, 0] = 1
    np.testing.assert_allclose(patch_loss(x, x + 2, w, "l2"), [4, 4])
