"""Pre-training augmentation: shapes, identities with augmentations off, flip, tone curve,
determinism (standalone and as a grain RandomMap), config validation."""

import dataclasses

import grain
import numpy as np
import pytest

from usfm_jax.data.augment import (
    Augment,
    AugmentConfig,
    augment,
    center_resize,
    crop_box,
    tone_lut,
)
from usfm_jax.data.synthetic import generate

OFF = dict(crop_scale=(1, 1), crop_ratio=(1, 1), hflip=0.0, gamma=(1, 1), contrast=(1, 1))


@pytest.fixture(scope="module")
def square():
    return generate(0, 1, (300, 300))[0]


@pytest.fixture(scope="module")
def wide():
    return generate(0, 2, (260, 390))[0]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("size", [(224, 224), (96, 160), (400, 320)])
def test_output_shape_and_dtype(square, wide, size):
    cfg = AugmentConfig(size, brightness=0.1)
    for image in (square, wide, wide[..., None], wide[:40, :50]):
        out = augment(image, _rng(0), cfg)
        assert out.shape == size and out.dtype == np.uint8
        assert out.flags.c_contiguous and out.flags.writeable
    view = center_resize(wide, size)
    assert view.shape == size and view.dtype == np.uint8 and view.flags.writeable
    plain = augment(wide, _rng(0), AugmentConfig(size, **OFF))
    assert plain.flags.writeable and not np.shares_memory(plain, wide)


def test_augmentations_off_equal_center_resize(square):
    out = augment(square, _rng(0), AugmentConfig((224, 224), **OFF))
    np.testing.assert_array_equal(out, center_resize(square, (224, 224)))
    # Same size in and out: the image itself, as a copy.
    same = augment(square, _rng(0), AugmentConfig((300, 300), **OFF))
    np.testing.assert_array_equal(same, square)
    assert not np.shares_memory(same, square)


def test_augmentations_off_give_one_view_whatever_the_rounding(square):
    """A 256 x 257 frame (as near-square scans come out of ``ingest --resize 256``): its whole
    area at ratio 1 rounds to 256 x 256, one column short. The view must not shift by that
    column from draw to draw: teacher targets cached from one draw must fit every other."""
    image = square[:256, :257]
    views = {augment(image, _rng(seed), AugmentConfig((256, 256), **OFF)).tobytes()
             for seed in range(20)}  # fmt: skip
    assert len(views) == 1
    assert crop_box((256, 257), _rng(3), (1.0, 1.0), (1.0, 1.0)) == (0, 0, 256, 256)


def test_center_resize_keeps_the_centre_at_the_target_aspect(wide):
    # 260 x 390 to a square: the central 260 x 260 columns [65, 325).
    np.testing.assert_array_equal(center_resize(wide, (260, 260)), wide[:, 65:325])
    # To 130 x 390 (ratio 3): full width, central 130 rows.
    np.testing.assert_array_equal(center_resize(wide, (130, 390)), wide[65:195])


def test_flip_mirrors_the_unflipped_result(wide):
    base = dict(image_size=(224, 224), brightness=0.1)
    for seed in range(5):
        plain = augment(wide, _rng(seed), AugmentConfig(**base, hflip=0.0))
        flipped = augment(wide, _rng(seed), AugmentConfig(**base, hflip=1.0))
        np.testing.assert_array_equal(flipped, np.fliplr(plain))
        assert not np.array_equal(flipped, plain)


@pytest.mark.parametrize("gamma", [0.5, 0.8, 1.25, 2.0])
def test_gamma_matches_a_float_reference(square, gamma):
    cfg = AugmentConfig((300, 300), **{**OFF, "gamma": (gamma, gamma)})
    out = augment(square, _rng(0), cfg).astype(int)
    reference = 255.0 * (square / 255.0) ** gamma
    assert np.max(np.abs(out - reference)) <= 1.0
    assert np.mean(out != square) > 0.5


def test_tone_lut_matches_a_float_reference():
    x = np.arange(256) / 255.0
    for gamma, contrast, shift, mean in [(0.8, 1.2, 0.05, 0.3), (1.25, 0.8, -0.1, 0.6)]:
        ref = np.clip((x**gamma - mean) * contrast + mean + shift, 0, 1) * 255
        lut = tone_lut(gamma, contrast, shift, mean)
        assert lut.dtype == np.uint8 and lut.shape == (256,)
        assert np.max(np.abs(lut - ref)) <= 0.5 + 1e-9
    np.testing.assert_array_equal(tone_lut(1.0, 1.0, 0.0, 0.5), np.arange(256))


def test_contrast_pivots_around_the_mean():
    image = _rng(1).integers(30, 91, size=(64, 64), dtype=np.uint8)  # mean far from 0.5
    cfg = AugmentConfig((64, 64), **{**OFF, "contrast": (1.5, 1.5)})
    out = augment(image, _rng(0), cfg).astype(float)
    assert abs(out.mean() - image.mean()) < 1.5
    assert out.std() == pytest.approx(1.5 * image.std(), rel=0.02)


def test_brightness_shifts_levels():
    image = np.full((32, 32), 100, np.uint8)
    cfg = AugmentConfig((32, 32), **{**OFF, "brightness": 0.2})
    shifts = {int(augment(image, _rng(s), cfg)[0, 0]) - 100 for s in range(50)}
    assert min(shifts) < -25 and max(shifts) > 25 and max(map(abs, shifts)) <= 51


def test_deterministic_per_rng_seed(wide):
    cfg = AugmentConfig((224, 224), brightness=0.1)
    a = augment(wide, _rng(5), cfg)
    np.testing.assert_array_equal(a, augment(wide, _rng(5), cfg))
    assert not np.array_equal(a, augment(wide, _rng(6), cfg))


def test_crop_box_follows_torchvision():
    rng = _rng(0)
    for _ in range(200):
        top, left, h, w = crop_box((300, 400), rng, (0.4, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        assert 0.4 * 0.95 <= h * w / 120_000 <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # No attempt fits (a ratio-2 crop of the whole square): the centred fallback.
    assert crop_box((100, 100), rng, (1.0, 1.0), (2.0, 2.0)) == (25, 0, 50, 100)
    assert crop_box((100, 100), rng, (1.0, 1.0), (0.5, 0.5)) == (0, 25, 100, 50)
    assert crop_box((100, 300), rng, (1.0, 1.0), (1.0, 1.0)) == (0, 100, 100, 100)


@pytest.mark.parametrize(
    "scale, ratio",
    [((0.4, 1.0), (3 / 4, 4 / 3)), ((0.08, 1.0), (1 / 2, 2.0))],
    ids=["defaults", "wide"],
)
def test_crop_box_draws_like_torchvision(scale, ratio):
    """2000 boxes of a 300 x 400 image against as many from torchvision's
    ``RandomResizedCrop.get_params`` (both seeded): a two-sample KS test per coordinate and
    for the aspect ratio, equal means, offsets uniform over the free range (mean top =
    mean (H - h) / 2) and reaching both of its ends."""
    import torch
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    (height, width), n = (300, 400), 2000
    rng = _rng(0)
    ours = np.array([crop_box((height, width), rng, scale, ratio) for _ in range(n)])
    image = torch.empty(1, height, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = np.array([RandomResizedCrop.get_params(image, scale, ratio) for _ in range(n)])
    for name, a, b in [
        *zip(("top", "left", "h", "w"), ours.T, theirs.T, strict=True),
        ("w / h", ours[:, 3] / ours[:, 2], theirs[:, 3] / theirs[:, 2]),
    ]:
        assert ks_2samp(a, b).pvalue > 1e-3, name
        se = np.sqrt((a.var() + b.var()) / n)
        assert abs(a.mean() - b.mean()) < 4 * se, (name, a.mean(), b.mean())
    top, left, h, w = ours.T
    for offset, free in [(top, height - h), (left, width - w)]:
        centred = offset - free / 2  # uniform on [0, free]: mean free / 2
        assert abs(centred.mean()) < 4 * centred.std() / np.sqrt(n)
        assert np.any(offset == 0) and np.any((offset == free) & (free > 0))


def _pipeline(images: list[np.ndarray], seed: int, cfg: AugmentConfig) -> list[dict]:
    ds = grain.MapDataset.range(len(images)).map(lambda i: {"image": images[i], "organ": i})
    return list(ds.seed(seed).random_map(Augment(cfg)))


def test_augment_as_a_grain_random_map(square, wide):
    images = [square, wide[..., None], square, wide]
    cfg = AugmentConfig((64, 96), brightness=0.1)
    a = _pipeline(images, 0, cfg)
    b = _pipeline(images, 0, cfg)
    c = _pipeline(images, 1, cfg)
    assert [e["organ"] for e in a] == [0, 1, 2, 3]
    for x, y, z in zip(a, b, c, strict=True):
        assert x["image"].shape == (64, 96, 1) and x["image"].dtype == np.uint8
        np.testing.assert_array_equal(x["image"], y["image"])
        assert not np.array_equal(x["image"], z["image"])
    # Each element has its own random stream: the same input image is augmented differently.
    assert not np.array_equal(a[0]["image"], a[2]["image"])
    assert images[1].shape == (260, 390, 1)  # inputs are not modified


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", (224, 0)),
        ("image_size", 224),
        ("image_size", (224, 224, 3)),
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.5, 1.5)),
        ("crop_scale", (0.9, 0.4)),
        ("crop_ratio", (0.0, 1.0)),
        ("crop_ratio", (2.0, 1.0)),
        ("hflip", 1.5),
        ("hflip", -0.1),
        ("gamma", (-1.0, 1.0)),
        ("gamma", (1.2, 0.8)),
        ("gamma", (0.8, float("nan"))),
        ("contrast", (0.0, 1.2)),
        ("contrast", 1.0),
        ("brightness", -0.1),
        ("brightness", 1.5),
    ],
)
def test_config_errors_name_the_field(field, value):
    kwargs = {"image_size": (224, 224), field: value}
    with pytest.raises(ValueError, match=f"^{field}="):
        AugmentConfig(**kwargs)


def test_config_normalises_lists_and_builds_from_a_mapping():
    cfg = AugmentConfig([224, 192], crop_scale=[0.5, 1], gamma=[1, 1])
    assert cfg.image_size == (224, 192) and cfg.crop_scale == (0.5, 1.0)
    assert cfg.gamma == (1.0, 1.0) and isinstance(cfg.gamma[0], float)
    built = AugmentConfig.from_mapping([224, 192], {"crop_scale": (0.5, 1), "gamma": (1, 1)})
    assert built == cfg
    with pytest.raises(ValueError, match=r"unknown augmentation fields.*rotate"):
        AugmentConfig.from_mapping((224, 224), {"rotate": 10})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hflip = 0.0  # type: ignore[misc]


def test_bad_images_are_rejected():
    cfg = AugmentConfig((32, 32))
    with pytest.raises(ValueError, match="uint8"):
        augment(np.zeros((40, 40), np.float32), _rng(0), cfg)
    with pytest.raises(ValueError, match="uint8"):
        augment(np.zeros((40, 40, 3), np.uint8), _rng(0), cfg)
