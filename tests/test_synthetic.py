"""Tests for usfm_jax.data.synthetic: determinism, format, validation and image statistics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from usfm_jax.data.synthetic import (
    GEOMETRIES,
    ORGANS,
    SyntheticUltrasound,
    generate,
    generate_with_labels,
)

LIVER, KIDNEY, THYROID, BREAST, HEART, FETAL = (ORGANS.index(o) for o in ORGANS)


def test_organ_table():
    assert ORGANS == ("liver", "kidney", "thyroid", "breast", "heart", "fetal")


# ----------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------


def test_same_arguments_give_identical_bytes():
    for organ in (None, *range(len(ORGANS))):
        a, oa = generate(7, 3, 64, organ)
        b, ob = generate(7, 3, 64, organ)
        assert oa == ob
        assert a.tobytes() == b.tobytes()


def test_different_index_or_seed_gives_different_images():
    base, _ = generate(0, 0, 64, LIVER)
    other_index, _ = generate(0, 1, 64, LIVER)
    other_seed, _ = generate(1, 0, 64, LIVER)
    assert not np.array_equal(base, other_index)
    assert not np.array_equal(base, other_seed)
    assert not np.array_equal(other_index, other_seed)


def test_drawn_organ_is_deterministic_varied_and_matches_explicit_organ():
    drawn = [generate(3, i, 32)[1] for i in range(60)]
    assert drawn == [generate(3, i, 32)[1] for i in range(60)]
    assert set(drawn) == set(range(len(ORGANS)))  # every organ shows up
    for i in range(6):
        image, organ = generate(3, i, 32)
        assert np.array_equal(image, generate(3, i, 32, organ)[0])


def test_labels_variant_renders_the_same_image():
    out = generate_with_labels(2, 5, (48, 80), HEART)
    image, organ = generate(2, 5, (48, 80), HEART)
    assert np.array_equal(out["image"], image)
    assert out["organ"] == organ == HEART
    assert out["geometry"] in GEOMETRIES


def test_anatomy_is_resolution_independent():
    """The scene is drawn in units of the image height: label maps agree across sizes."""
    for organ in (LIVER, THYROID, HEART):
        small = generate_with_labels(4, 2, 64, organ)["region"]
        large = generate_with_labels(4, 2, 128, organ)["region"]
        assert np.mean(small == large[::2, ::2]) > 0.95


# ----------------------------------------------------------------------------------------
# Format and validation
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 64, (48, 80), (80, 40)])
@pytest.mark.parametrize("organ", range(len(ORGANS)))
def test_dtype_and_shape(size, organ):
    image, organ_id = generate(0, organ, size, organ)
    h, w = (size, size) if isinstance(size, int) else size
    assert image.shape == (h, w)
    assert image.dtype == np.uint8
    assert organ_id == organ
    assert image.std() > 5  # an image, not a constant


def test_label_maps_format():
    out = generate_with_labels(0, 1, (40, 72), FETAL)
    for key in ("fan_mask", "cyst_mask"):
        assert out[key].shape == (40, 72) and out[key].dtype == bool
    assert out["region"].shape == (40, 72) and out["region"].dtype == np.int16
    assert not (out["cyst_mask"] & ~out["fan_mask"]).any()
    assert np.array_equal(out["region"] == -1, ~out["fan_mask"])
    assert out["cyst_mask"].any()  # amniotic fluid


def test_dataset_items():
    ds = SyntheticUltrasound(5, (32, 48), seed=11)
    assert len(ds) == 5
    for i in range(5):
        item = ds[i]
        assert set(item) == {"image", "organ"}
        assert item["image"].shape == (32, 48, 1) and item["image"].dtype == np.uint8
        assert item["organ"].shape == () and item["organ"].dtype == np.int32
        image, organ = generate(11, i, (32, 48))
        assert np.array_equal(item["image"][..., 0], image)
        assert int(item["organ"]) == organ
    assert np.array_equal(ds[-1]["image"], ds[4]["image"])
    assert np.array_equal(ds[np.int64(2)]["image"], ds[2]["image"])


def test_dataset_organ_subset():
    ds = SyntheticUltrasound(30, 16, seed=1, organs=[HEART, BREAST])
    organs = {int(ds[i]["organ"]) for i in range(len(ds))}
    assert organs == {HEART, BREAST}
    only = SyntheticUltrasound(4, 16, organs=[KIDNEY])
    assert all(int(only[i]["organ"]) == KIDNEY for i in range(4))


@pytest.mark.parametrize("index", [5, 6, -6, 100])
def test_dataset_index_out_of_range(index):
    with pytest.raises(IndexError, match="out of range"):
        SyntheticUltrasound(5, 16)[index]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_images": 0, "image_size": 32}, "num_images must be >= 1"),
        ({"num_images": 2, "image_size": 15}, "at least 16 px"),
        ({"num_images": 2, "image_size": (16, 8)}, "at least 16 px"),
        ({"num_images": 2, "image_size": (0, 32)}, "at least 16 px"),
        ({"num_images": 2, "image_size": (16, 16, 16)}, "image_size must be"),
        ({"num_images": 2, "image_size": 32, "organs": [6]}, "organ id must be in"),
        ({"num_images": 2, "image_size": 32, "organs": [-1]}, "organ id must be in"),
        ({"num_images": 2, "image_size": 32, "organs": []}, "organs must not be empty"),
        ({"num_images": 2, "image_size": 32, "seed": -1}, "non-negative"),
    ],
)
def test_dataset_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticUltrasound(**kwargs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 0, 12), "at least 16 px"),
        ((0, 0, (32, 15)), "at least 16 px"),
        ((0, 0, "32"), "image_size must be"),
        ((0, 0, 32, len(ORGANS)), "organ id must be in"),
        ((0, -1, 32), "non-negative"),
        ((-2, 0, 32), "non-negative"),
    ],
)
def test_generate_validation(args, match):
    with pytest.raises(ValueError, match=match):
        generate(*args)
    with pytest.raises(ValueError, match=match):
        generate_with_labels(*args)


# ----------------------------------------------------------------------------------------
# Image statistics
# ----------------------------------------------------------------------------------------


def _horizontal_correlation(image: np.ndarray, mask: np.ndarray) -> float:
    pair = mask[:, :-1] & mask[:, 1:]
    return float(np.corrcoef(image[:, :-1][pair], image[:, 1:][pair])[0, 1])


@pytest.mark.parametrize("organ", [LIVER, KIDNEY, THYROID])
def test_speckle_in_homogeneous_tissue(organ):
    """Background tissue is speckled (not flat) with grains wider than a pixel (the PSF)."""
    for index in range(3):
        out = generate_with_labels(0, index, 96, organ)
        tissue = ndimage.binary_erosion(out["region"] == 0, iterations=3)
        assert tissue.sum() > 500
        image = out["image"].astype(np.float64)
        # Local contrast: deviation from a 7x7 local mean removes slow trends and shadows.
        local = image - ndimage.uniform_filter(image, 7)
        assert local[tissue].std() > 8
        corr = _horizontal_correlation(image, tissue)
        assert 0.3 < corr < 0.99  # spatially correlated speckle grain, yet not smooth


@pytest.mark.parametrize("organ", [LIVER, BREAST, HEART, FETAL])
def test_anechoic_fluid_is_darker_than_surroundings(organ):
    checked = 0
    for index in range(40):
        out = generate_with_labels(1, index, 96, organ)
        core = ndimage.binary_erosion(out["cyst_mask"], iterations=2)
        if core.sum() < 15:  # no fluid in this image, or too small to have a core
            continue
        grown = ndimage.binary_dilation(out["cyst_mask"], iterations=6)
        ring = grown & ~ndimage.binary_dilation(out["cyst_mask"], iterations=2) & out["fan_mask"]
        ring &= ~out["cyst_mask"]
        image = out["image"].astype(np.float64)
        assert image[core].mean() < 60
        assert image[core].mean() < 0.5 * image[ring].mean()
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def test_sector_outside_fan_is_black():
    for size in (64, (48, 96), (96, 48)):
        for index in range(4):
            out = generate_with_labels(0, index, size, HEART)  # cardiac: always a sector
            assert out["geometry"] == "sector"
            fan = out["fan_mask"]
            assert not fan[0, 0] and not fan[0, -1]  # apex at the top centre
            assert 0.2 < fan.mean() < 0.9
            assert (out["image"][~fan] == 0).all()
            assert out["image"][fan].mean() > 30


def test_geometries_follow_organ_preferences():
    geometries = {
        organ: [generate_with_labels(0, i, 32, organ)["geometry"] for i in range(20)]
        for organ in (THYROID, BREAST, LIVER, FETAL)
    }
    assert geometries[THYROID].count("linear") >= 14
    assert geometries[BREAST].count("linear") >= 14
    assert geometries[LIVER].count("convex") >= 10
    assert geometries[FETAL].count("linear") == 0
    for organ in (THYROID, BREAST):
        out = generate_with_labels(0, geometries[organ].index("linear"), 32, organ)
        assert out["fan_mask"].all()
    seen = {g for gs in geometries.values() for g in gs}
    assert seen == set(GEOMETRIES)


def test_organ_recipes_differ():
    """Fetal scans (mostly amniotic fluid) are darker and more fluid-filled than liver scans."""

    def stats(organ):
        outs = [generate_with_labels(2, i, 64, organ) for i in range(20)]
        means = np.array([o["image"][o["fan_mask"]].mean() for o in outs])
        fluid = np.array([o["cyst_mask"].sum() / o["fan_mask"].sum() for o in outs])
        return means, fluid

    liver_mean, liver_fluid = stats(LIVER)
    fetal_mean, fetal_fluid = stats(FETAL)
    stderr = np.sqrt(liver_mean.var() / 20 + fetal_mean.var() / 20)
    assert liver_mean.mean() - fetal_mean.mean() > 5 * stderr
    assert fetal_fluid.mean() > 4 * liver_fluid.mean()
    assert np.median(fetal_fluid) > 0.15
