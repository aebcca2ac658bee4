"""Tests of usfm_jax.data.readers on the real ultrasound DICOM files of pydicom-data.

Every expected gray frame is computed here from pydicom's own decoding (``ds.pixel_array``) with
the conversion written out plainly, so the reader is checked against an independent reference.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pydicom
import pydicom.encaps
import pydicom.uid
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut

from usfm_jax.data import readers
from usfm_jax.data.readers import UnreadableError, read_image_file

# name: (photometric interpretation, transfer syntax, frames, carries SequenceOfUltrasoundRegions)
US_FILES = {
    "US1_UNCR.dcm": ("RGB", pydicom.uid.ExplicitVRLittleEndian, 1, False),
    "US1_J2KR.dcm": ("YBR_RCT", pydicom.uid.JPEG2000Lossless, 1, False),
    "gdcm-US-ALOKA-16.dcm": ("PALETTE COLOR", pydicom.uid.ImplicitVRLittleEndian, 1, True),
    "gdcm-US-ALOKA-16_big.dcm": ("PALETTE COLOR", pydicom.uid.ExplicitVRBigEndian, 1, True),
    "OBXXXX1A.dcm": ("PALETTE COLOR", pydicom.uid.ExplicitVRLittleEndian, 1, True),
    "OBXXXX1A_2frame.dcm": ("PALETTE COLOR", pydicom.uid.ExplicitVRLittleEndian, 2, True),
    "OBXXXX1A_rle.dcm": ("PALETTE COLOR", pydicom.uid.RLELossless, 1, True),
    "color3d_jpeg_baseline.dcm": ("YBR_FULL_422", pydicom.uid.JPEGBaseline8Bit, 120, True),
    "JPGLosslessP14SV1_1s_1f_8b.dcm": ("MONOCHROME2", pydicom.uid.JPEGLosslessSV1, 1, True),
}


def _path(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data lacks {name}"
    return path


def _read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(_path(name))


def _luma(rgb: np.ndarray, full_scale: float = 255.0) -> np.ndarray:
    """Plain BT.601 luma of an RGB array with values in 0..full_scale, as uint8."""
    rgb = rgb.astype(np.float64)
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return np.clip(np.round(y * 255.0 / full_scale), 0, 255).astype(np.uint8)


def _assert_close(actual: np.ndarray, expected: np.ndarray, tol: int = 1) -> None:
    assert actual.dtype == np.uint8
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(np.int32) - expected.astype(np.int32))
    assert diff.max() <= tol, f"max difference {diff.max()} gray levels"


def _region_union(ds: pydicom.Dataset) -> tuple[int, int, int, int]:
    """Half-open union of the regions, written out independently of the reader."""
    regions = ds.SequenceOfUltrasoundRegions
    y0 = min(r.RegionLocationMinY0 for r in regions)
    x0 = min(r.RegionLocationMinX0 for r in regions)
    y1 = min(max(r.RegionLocationMaxY1 for r in regions) + 1, ds.Rows)
    x1 = min(max(r.RegionLocationMaxX1 for r in regions) + 1, ds.Columns)
    return y0, x0, y1, x1


# ----------------------------------------------------------------------------- the test files


@pytest.mark.parametrize("name", sorted(US_FILES))
def test_pydicom_files_are_what_the_tests_assume(name):
    photometric, tsyntax, frames, has_regions = US_FILES[name]
    ds = _read(name)
    assert ds.Modality == "US"
    assert ds.PhotometricInterpretation == photometric
    assert ds.file_meta.TransferSyntaxUID == tsyntax
    assert int(ds.get("NumberOfFrames") or 1) == frames
    assert ("SequenceOfUltrasoundRegions" in ds) == has_regions
    image = read_image_file(_path(name), crop="none")
    assert image.kind == "dicom"
    assert image.num_frames_in_file == frames
    assert len(image.frames) == frames
    assert all(f.dtype == np.uint8 and f.shape == (ds.Rows, ds.Columns) for f in image.frames)


def test_metadata():
    image = read_image_file(_path("US1_UNCR.dcm"))
    assert image.patient_id == "13US1"
    assert image.study_id == "1.3.6.1.4.1.5962.1.2.13.20040826185059.5457"
    assert image.device == "G.E. Medical Systems LOGIQ 700"
    # an empty PatientID is reported as missing, not as ""
    assert read_image_file(_path("JPGLosslessP14SV1_1s_1f_8b.dcm")).patient_id is None


# ----------------------------------------------------------------------------- gray conversion


def test_rgb_uncompressed_is_bt601_luma():
    ds = _read("US1_UNCR.dcm")
    rgb = ds.pixel_array
    frame = read_image_file(_path("US1_UNCR.dcm"), crop="none").frames[0]
    _assert_close(frame, _luma(rgb))
    # bit-identical to PIL's convert("L"), so DICOM and PNG exports of a frame agree
    np.testing.assert_array_equal(frame, np.asarray(PIL.Image.fromarray(rgb).convert("L")))
    assert frame.std() > 10  # a real image, not a constant


def test_jpeg2000_matches_uncompressed_twin():
    ds = _read("US1_J2KR.dcm")
    # pydicom returns RGB for this YBR_RCT file: OpenJPEG undoes the reversible colour transform
    np.testing.assert_array_equal(ds.pixel_array, _read("US1_UNCR.dcm").pixel_array)
    frame = read_image_file(_path("US1_J2KR.dcm"), crop="none").frames[0]
    _assert_close(frame, _luma(ds.pixel_array))
    twin = read_image_file(_path("US1_UNCR.dcm"), crop="none").frames[0]
    np.testing.assert_array_equal(frame, twin)


def test_palette_16bit_and_big_endian_twin():
    ds = _read("gdcm-US-ALOKA-16.dcm")
    assert ds.BitsStored == 16
    rgb16 = apply_color_lut(ds.pixel_array, ds)  # segmented 16-bit LUT
    frame = read_image_file(_path("gdcm-US-ALOKA-16.dcm"), crop="none").frames[0]
    _assert_close(frame, _luma(rgb16, full_scale=65535.0))
    big = read_image_file(_path("gdcm-US-ALOKA-16_big.dcm"), crop="none").frames[0]
    np.testing.assert_array_equal(big, frame)


def test_palette_8bit_with_plain_lookup():
    ds = _read("OBXXXX1A.dcm")
    first = ds.RedPaletteColorLookupTableDescriptor[1]
    luts = [
        np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, dtype="<u2")
        for c in ("Red", "Green", "Blue")
    ]
    index = np.clip(ds.pixel_array.astype(np.int64) - first, 0, len(luts[0]) - 1)
    rgb16 = np.stack([lut[index] for lut in luts], axis=-1)
    frame = read_image_file(_path("OBXXXX1A.dcm"), crop="none").frames[0]
    _assert_close(frame, _luma(rgb16, full_scale=65535.0))


def test_rle_and_multiframe_match_uncompressed():
    single = read_image_file(_path("OBXXXX1A.dcm"), crop="none").frames
    rle = read_image_file(_path("OBXXXX1A_rle.dcm"), crop="none").frames
    np.testing.assert_array_equal(rle[0], single[0])
    two = read_image_file(_path("OBXXXX1A_2frame.dcm"), crop="none")
    np.testing.assert_array_equal(two.frames[0], single[0])
    ds = _read("OBXXXX1A_2frame.dcm")
    expected_1 = readers.dicom_to_gray(ds, ds.pixel_array)[1]
    np.testing.assert_array_equal(two.frames[1], expected_1)
    assert not np.array_equal(two.frames[0], two.frames[1])


def test_jpeg_lossless_monochrome_is_unchanged():
    ds = _read("JPGLosslessP14SV1_1s_1f_8b.dcm")
    frame = read_image_file(_path("JPGLosslessP14SV1_1s_1f_8b.dcm"), crop="none").frames[0]
    np.testing.assert_array_equal(frame, ds.pixel_array)


def test_cine_ybr_stride_and_max_frames():
    path = _path("color3d_jpeg_baseline.dcm")
    image = read_image_file(path, frame_stride=10, max_frames=5, crop="none")
    assert image.num_frames_in_file == 120
    assert len(image.frames) == 5
    ds = _read("color3d_jpeg_baseline.dcm")
    rgb = ds.pixel_array  # pydicom converts YBR_FULL_422 to RGB by default
    for k, index in enumerate((0, 10, 20, 30, 40)):
        # the Y channel is the BT.601 luma: exactly what pydicom decodes before its RGB conversion
        y = pydicom.pixels.pixel_array(ds, index=index, raw=True)[..., 0]
        np.testing.assert_array_equal(image.frames[k], y)
        # and close to the luma of pydicom's RGB (which clipped saturated colours)
        diff = np.abs(image.frames[k].astype(int) - _luma(rgb[index]).astype(int))
        assert (diff <= 1).mean() > 0.999 and diff.max() <= 8
    assert not np.array_equal(image.frames[0], image.frames[1])
    # max_frames alone and stride alone
    assert len(read_image_file(path, max_frames=3, crop="none").frames) == 3
    assert len(read_image_file(path, frame_stride=50, crop="none").frames) == 3  # 0, 50, 100


def test_an_uncompressed_cine_without_number_of_frames_keeps_every_frame(tmp_path):
    """NumberOfFrames missing (a malformed export): the pixel data's length tells the frames."""
    whole = read_image_file(_path("emri_small.dcm"), crop="none", max_frames=None)
    assert len(whole.frames) == 10
    ds = _read("emri_small.dcm")
    del ds.NumberOfFrames
    ds.save_as(tmp_path / "cine.dcm")
    image = read_image_file(tmp_path / "cine.dcm", crop="none", max_frames=None, frame_stride=3)
    assert image.num_frames_in_file == 10 and len(image.frames) == 4
    for frame, index in zip(image.frames, (0, 3, 6, 9), strict=True):
        np.testing.assert_array_equal(frame, whole.frames[index])


@pytest.mark.parametrize("table", ["none", "basic", "extended"])
def test_a_jpeg_cine_without_number_of_frames_keeps_every_frame(tmp_path, table):
    """Encapsulated: the offset table's entries, or without one the fragments that begin a
    JPEG frame. (A JPEG 2000 frame in three fragments, US1_J2KR.dcm, stays one frame: see
    test_pydicom_files_are_what_the_tests_assume.)"""
    ds = _read("color3d_jpeg_baseline.dcm")
    whole = read_image_file(_path("color3d_jpeg_baseline.dcm"), crop="none", max_frames=None)
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=120))
    if table == "extended":
        ds.PixelData, offsets, lengths = pydicom.encaps.encapsulate_extended(frames)
        ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = offsets, lengths
    else:
        ds.PixelData = pydicom.encaps.encapsulate(frames, has_bot=table == "basic")
    del ds.NumberOfFrames
    ds.save_as(tmp_path / "cine.dcm")
    image = read_image_file(tmp_path / "cine.dcm", crop="none", max_frames=None, frame_stride=50)
    assert image.num_frames_in_file == 120 and len(image.frames) == 3
    for frame, index in zip(image.frames, (0, 50, 100), strict=True):
        np.testing.assert_array_equal(frame, whole.frames[index])


def test_an_rle_cine_without_number_of_frames_keeps_every_frame(tmp_path):
    """RLE has one fragment per frame, and no marker to tell."""
    ds = _read("emri_small.dcm")
    ds.compress(pydicom.uid.RLELossless)
    del ds.NumberOfFrames
    ds.save_as(tmp_path / "cine.dcm")
    image = read_image_file(tmp_path / "cine.dcm", crop="none", max_frames=None)
    whole = read_image_file(_path("emri_small.dcm"), crop="none", max_frames=None)
    assert image.num_frames_in_file == 10
    np.testing.assert_array_equal(np.stack(image.frames), np.stack(whole.frames))


def test_dicom_to_gray_default_assumes_pydicom_rgb_and_raw_ybr_uses_y():
    ds = _read("color3d_jpeg_baseline.dcm")
    rgb = pydicom.pixels.pixel_array(ds, index=3)
    np.testing.assert_array_equal(readers.dicom_to_gray(ds, rgb), _luma_pil(rgb))
    ybr = pydicom.pixels.pixel_array(ds, index=3, raw=True)
    gray = readers.dicom_to_gray(ds, ybr, photometric="YBR_FULL_422")
    np.testing.assert_array_equal(gray, ybr[..., 0])
    # all frames at once: [F, H, W, 3] -> [F, H, W]
    stack = readers.dicom_to_gray(ds, np.stack([rgb, rgb]))
    assert stack.shape == (2, *rgb.shape[:2])


def _luma_pil(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(PIL.Image.fromarray(rgb).convert("L"))


def _mono_dataset(pixels: np.ndarray, photometric: str, bits: int, **extra) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = pydicom.uid.UltrasoundImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "US"
    ds.set_pixel_data(pixels, photometric, bits)
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def test_high_bit_depth_window_minmax_and_monochrome1(tmp_path):
    values = np.array([[0, 1000, 1500, 1750, 2000], [2250, 2500, 3000, 4095, 100]], np.uint16)
    pixels = np.tile(values, (8, 8))  # 16 x 40
    # no window: min-max over the frame
    ds = _mono_dataset(pixels, "MONOCHROME2", 12)
    expected = np.round((pixels - 0.0) / 4095.0 * 255.0).astype(np.uint8)
    _assert_close(readers.dicom_to_gray(ds, pixels), expected)
    # window centre 2000 width 1000: DICOM linear function onto 0..255
    ds = _mono_dataset(pixels, "MONOCHROME2", 12, WindowCenter=2000, WindowWidth=1000)
    c, w = 2000 - 0.5, 1000 - 1
    windowed = np.clip(((pixels - c) / w + 0.5) * 255.0, 0, 255)
    expected = np.round(windowed).astype(np.uint8)
    _assert_close(readers.dicom_to_gray(ds, pixels), expected)
    assert readers.dicom_to_gray(ds, pixels)[0, 1] == 0  # 1000 is below the window
    # MONOCHROME1 is the inverse, also through the whole file path
    ds = _mono_dataset(pixels, "MONOCHROME1", 12, WindowCenter=2000, WindowWidth=1000)
    path = tmp_path / "mono1.dcm"
    ds.save_as(path, enforce_file_format=True)
    frame = read_image_file(path, crop="none").frames[0]
    _assert_close(frame, 255 - expected)


def test_a_negative_rescale_slope_without_a_window_keeps_bright_what_the_values_make_bright():
    values = np.array([[0, 1000, 2000, 4095], [3000, 500, 100, 2500]], np.uint16)
    pixels = np.tile(values, (4, 4))  # 8 x 16
    ds = _mono_dataset(pixels, "MONOCHROME2", 12, RescaleSlope=-1, RescaleIntercept=4095)
    expected = np.round((4095.0 - pixels) / 4095.0 * 255.0).astype(np.uint8)
    _assert_close(readers.dicom_to_gray(ds, pixels), expected)


def test_an_empty_rescale_is_left_out():
    pixels = np.tile(np.array([[0, 1000, 4095, 2000]], np.uint16), (16, 4))
    ds = _mono_dataset(pixels, "MONOCHROME2", 12, RescaleSlope="", RescaleIntercept="")
    expected = np.round(pixels / 4095.0 * 255.0).astype(np.uint8)
    _assert_close(readers.dicom_to_gray(ds, pixels), expected)


def test_low_bit_depth_is_stretched():
    pixels = np.tile(np.arange(64, dtype=np.uint8), (16, 1))  # 6 bits stored: 0..63
    ds = _mono_dataset(pixels, "MONOCHROME2", 6)
    gray = readers.dicom_to_gray(ds, pixels)
    np.testing.assert_array_equal(gray[0], np.round(np.arange(64) * 255 / 63).astype(np.uint8))


def test_unsupported_photometric_is_an_error():
    pixels = np.zeros((20, 20, 3), np.uint8)
    ds = _mono_dataset(pixels[..., 0], "MONOCHROME2", 8)
    ds.PhotometricInterpretation = "HSV"
    with pytest.raises(UnreadableError, match="photometric"):
        readers.dicom_to_gray(ds, pixels)


def test_dicom_without_preamble_is_read(tmp_path):
    ds = _read("OBXXXX1A.dcm")
    del ds.file_meta
    ds.preamble = None
    path = tmp_path / "old_style.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    frame = read_image_file(path, crop="none").frames[0]
    np.testing.assert_array_equal(
        frame, read_image_file(_path("OBXXXX1A.dcm"), crop="none").frames[0]
    )


# ----------------------------------------------------------------------------- crop


def test_scan_region_box_of_real_files():
    assert readers.scan_region_box(_read("US1_UNCR.dcm")) is None
    ds = _read("OBXXXX1A.dcm")  # its first region ends at MaxX1 = 800 = Columns: clipped
    assert readers.scan_region_box(ds) == _region_union(ds) == (60, 120, 577, 800)
    ds = _read("gdcm-US-ALOKA-16.dcm")  # two side-by-side B-mode views and a gray bar
    assert readers.scan_region_box(ds) == _region_union(ds) == (24, 32, 416, 640)


@pytest.mark.parametrize(
    "name", ["OBXXXX1A.dcm", "gdcm-US-ALOKA-16.dcm", "color3d_jpeg_baseline.dcm"]
)
@pytest.mark.parametrize("crop", ["auto", "regions"])
def test_crop_to_regions(name, crop):
    ds = _read(name)
    y0, x0, y1, x1 = _region_union(ds)
    full = read_image_file(_path(name), crop="none", max_frames=2).frames
    cropped = read_image_file(_path(name), crop=crop, max_frames=2).frames
    for f, c in zip(full, cropped, strict=True):
        np.testing.assert_array_equal(c, f[y0:y1, x0:x1])


def test_crop_without_regions():
    path = _path("US1_UNCR.dcm")
    full = read_image_file(path, crop="none").frames[0]
    np.testing.assert_array_equal(read_image_file(path, crop="regions").frames[0], full)
    y0, x0, y1, x1 = readers.content_box(full)
    assert (y1 - y0, x1 - x0) != full.shape
    for crop in ("auto", "bbox"):
        np.testing.assert_array_equal(
            read_image_file(path, crop=crop).frames[0], full[y0:y1, x0:x1]
        )


def test_scan_region_box_synthetic():
    ds = Dataset()
    ds.Rows, ds.Columns = 100, 200
    assert readers.scan_region_box(ds) is None

    def region(x0, y0, x1, y1):
        r = Dataset()
        r.RegionLocationMinX0, r.RegionLocationMinY0 = x0, y0
        r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x1, y1
        return r

    ds.SequenceOfUltrasoundRegions = [region(10, 20, 59, 79), region(50, 5, 500, 30)]
    assert readers.scan_region_box(ds) == (5, 10, 80, 200)
    ds.SequenceOfUltrasoundRegions = [region(10, 20, 5, 79)]  # Max < Min: degenerate
    assert readers.scan_region_box(ds) is None
    ds.SequenceOfUltrasoundRegions = [region(300, 20, 400, 79)]  # outside the image
    assert readers.scan_region_box(ds) is None


def test_content_box_synthetic():
    image = np.zeros((100, 120), np.uint8)
    image[20:70, 30:90] = 200  # the scan
    image[5, 5] = image[95, 115] = image[50, 100] = 255  # isolated marker pixels
    image[85:89, 3:7] = 255  # a small text-like blob far from the scan
    assert readers.content_box(image, margin=2) == (18, 28, 72, 92)
    assert readers.content_box(image, margin=0) == (20, 30, 70, 90)
    # the 3x3 opening alone removes the isolated markers (component filtering switched off)
    markers_only = image.copy()
    markers_only[85:89, 3:7] = 0
    box = readers.content_box(markers_only, margin=0, min_component_fraction=0.0)
    assert box == (20, 30, 70, 90)
    # nothing above the threshold: the full image
    assert readers.content_box(np.full((40, 50), 8, np.uint8)) == (0, 0, 40, 50)
    # two large parts are both kept; the margin is clipped at the border
    image[0:40, 100:120] = 90
    assert readers.content_box(image, margin=3) == (0, 27, 73, 120)


# ----------------------------------------------------------------------------- resize


def test_resize_shorter_side():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 300), dtype=np.uint8)
    small = readers.resize_shorter_side(image, 100)
    assert small.shape == (100, 150) and small.dtype == np.uint8
    box = PIL.Image.fromarray(image).resize((150, 100), PIL.Image.Resampling.BOX)
    np.testing.assert_array_equal(small, np.asarray(box))
    np.testing.assert_allclose(small.mean(), image.mean(), atol=1.0)  # area averaging
    tall = rng.integers(0, 256, (90, 60), dtype=np.uint8)
    big = readers.resize_shorter_side(tall, 120)
    assert big.shape == (180, 120)
    bicubic = PIL.Image.fromarray(tall).resize((120, 180), PIL.Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(big, np.asarray(bicubic))
    np.testing.assert_array_equal(readers.resize_shorter_side(tall, 60), tall)
    assert readers.resize_shorter_side(np.zeros((10, 33), np.uint8), 20).shape == (20, 66)


# ----------------------------------------------------------------------------- ordinary images


def _scan_like(h: int = 64, w: int = 80, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w), np.uint8)
    image[8 : h - 8, 10 : w - 10] = rng.integers(20, 256, (h - 16, w - 20))
    return image


def test_gray_png_round_trip(tmp_path):
    gray = _scan_like()
    path = tmp_path / "gray.png"
    PIL.Image.fromarray(gray).save(path)
    image = read_image_file(path, crop="none")
    assert image.kind == "image" and image.num_frames_in_file == 1
    assert (image.patient_id, image.study_id, image.device) == (None, None, None)
    np.testing.assert_array_equal(image.frames[0], gray)
    # bbox crop: the content plus the 2 px margin
    np.testing.assert_array_equal(read_image_file(path).frames[0], gray[6:58, 8:72])


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "JPEG"])
def test_rgb_images_become_luma(tmp_path, fmt):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    path = tmp_path / f"rgb.{fmt.lower()}"
    PIL.Image.fromarray(rgb).save(path, format=fmt)
    with PIL.Image.open(path) as im:
        decoded = np.asarray(im.convert("RGB"))
    if fmt != "JPEG":
        np.testing.assert_array_equal(decoded, rgb)
    frame = read_image_file(path, crop="none").frames[0]
    _assert_close(frame, _luma(decoded))


def test_jpeg_exif_orientation_is_applied(tmp_path):
    gray = _scan_like(40, 64)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    PIL.Image.fromarray(gray).save(path, exif=exif, quality=95)
    frame = read_image_file(path, crop="none").frames[0]
    assert frame.shape == (64, 40)
    diff = np.abs(frame.astype(int) - np.rot90(gray, k=-1).astype(int))
    assert diff.mean() < 3  # lossy JPEG of speckle, but clearly the rotated image


def test_an_mpo_camera_jpeg_is_its_first_picture_with_its_exif_rotation(tmp_path):
    gray = _scan_like(40, 64)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "camera.jpg"  # an MPO: the picture, then a preview
    preview = PIL.Image.fromarray(gray[::4, ::4])
    PIL.Image.fromarray(gray).save(path, format="MPO", save_all=True, append_images=[preview],
                                   exif=exif, quality=95)  # fmt: skip
    assert PIL.Image.open(path).n_frames == 2
    image = read_image_file(path, crop="none")
    assert len(image.frames) == 1 and image.num_frames_in_file == 1
    assert image.exif_orientation == 6 and image.frames[0].shape == (64, 40)
    diff = np.abs(image.frames[0].astype(int) - np.rot90(gray, k=-1).astype(int))
    assert diff.mean() < 3


def test_tiff_orientation_is_applied_once_or_refused_when_pillow_misreads_it(tmp_path):
    gray = _scan_like(40, 64)
    for orientation, expected in [(3, np.rot90(gray, 2)), (4, gray[::-1])]:
        exif = PIL.Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.tif"
        PIL.Image.fromarray(gray).save(path, exif=exif)
        image = read_image_file(path, crop="none")
        np.testing.assert_array_equal(image.frames[0], expected)  # lossless: exact
        assert image.exif_orientation == orientation  # known, for the check of pairs
    pages = [PIL.Image.fromarray(gray), PIL.Image.fromarray(gray[::-1].copy())]
    exif = PIL.Image.Exif()
    exif[0x0112] = 3
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:], exif=exif)
    image = read_image_file(tmp_path / "pages.tif", crop="none")  # Pillow turns each page
    assert image.exif_orientation == 3 and len(image.frames) == 2
    np.testing.assert_array_equal(image.frames[0], np.rot90(gray, 2))
    for orientation in (5, 6, 7, 8):  # Pillow 13 scrambles these as it loads them
        exif = PIL.Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.tif"
        PIL.Image.fromarray(gray).save(path, exif=exif)
        with pytest.raises(UnreadableError, match=f"TIFF with orientation {orientation} "):
            read_image_file(path, crop="none")


def test_16bit_png_is_min_max_scaled(tmp_path):
    values = np.linspace(1000, 40000, 48 * 64).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(values).save(path)
    frame = read_image_file(path, crop="none").frames[0]
    expected = np.round((values - 1000.0) / 39000.0 * 255.0).astype(np.uint8)
    _assert_close(frame, expected)
    assert frame.min() == 0 and frame.max() == 255


def test_palette_png(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    pal = PIL.Image.fromarray(rgb).quantize(colors=16)
    path = tmp_path / "pal.png"
    pal.save(path)
    expected = np.asarray(pal.convert("RGB"))
    frame = read_image_file(path, crop="none").frames[0]
    _assert_close(frame, _luma(expected))
    assert len(np.unique(frame)) > 4


def test_multipage_tiff_stride(tmp_path):
    pages = [_scan_like(seed=i) for i in range(25)]
    path = tmp_path / "cine.tiff"
    images = [PIL.Image.fromarray(p) for p in pages]
    images[0].save(path, save_all=True, append_images=images[1:])
    image = read_image_file(path, frame_stride=3, max_frames=4, crop="none")
    assert image.num_frames_in_file == 25
    assert len(image.frames) == 4
    for frame, index in zip(image.frames, (0, 3, 6, 9), strict=True):
        np.testing.assert_array_equal(frame, pages[index])


def test_multiframe_bbox_is_shared(tmp_path):
    a = np.zeros((80, 90), np.uint8)
    b = a.copy()
    a[10:30, 10:30] = 150
    b[40:60, 50:70] = 150
    path = tmp_path / "moving.tiff"
    PIL.Image.fromarray(a).save(path, save_all=True, append_images=[PIL.Image.fromarray(b)])
    frames = read_image_file(path, crop="bbox").frames
    np.testing.assert_array_equal(frames[0], a[8:62, 8:72])  # one box: the union, + margin
    np.testing.assert_array_equal(frames[1], b[8:62, 8:72])


# ----------------------------------------------------------------------------- bad files


def test_empty_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(UnreadableError, match="empty"):
        read_image_file(path)


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "color3d_jpeg_baseline.dcm", "OBXXXX1A_rle.dcm"])
def test_truncated_dicom(tmp_path, name):
    data = Path(_path(name)).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(UnreadableError, match="truncated"):
        read_image_file(path)


def test_dicom_cut_inside_the_header(tmp_path):
    # cut inside the long segmented palette LUT, before the Pixel Data element: pydicom reads
    # what is there without complaint; the element shorter than declared gives it away
    data = Path(_path("gdcm-US-ALOKA-16.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) // 50])
    with pytest.raises(UnreadableError, match="truncated"):
        read_image_file(path)


def test_dicom_without_pixel_data(tmp_path):
    ds = _read("US1_UNCR.dcm")
    del ds.PixelData
    path = tmp_path / "meta_only.dcm"
    ds.save_as(path)
    with pytest.raises(UnreadableError, match="no pixel data: not an image DICOM"):
        read_image_file(path)


def test_text_named_dcm(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("patient,organ\n1,liver\n" * 20)
    with pytest.raises(UnreadableError, match="not a DICOM or image file"):
        read_image_file(path)
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(UnreadableError, match="not a DICOM or image file"):
        read_image_file(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_png_and_jpeg(tmp_path, fmt):
    buf = io.BytesIO()
    PIL.Image.fromarray(_scan_like(128, 128)).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(UnreadableError, match="truncated"):
        read_image_file(path)


def test_unsupported_transfer_syntax(tmp_path):
    ds = _read("JPGLosslessP14SV1_1s_1f_8b.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    path = tmp_path / "video.dcm"
    ds.save_as(path)
    with pytest.raises(UnreadableError, match="transfer syntax MPEG2 Main Profile"):
        read_image_file(path)


def test_missing_codec(monkeypatch):
    class NoPlugin:
        is_available = False
        missing_dependencies = ("openjpeg - requires pylibjpeg-openjpeg",)

    monkeypatch.setattr(readers, "get_decoder", lambda uid: NoPlugin())
    with pytest.raises(UnreadableError, match=r"JPEG 2000 .*missing codec.*openjpeg"):
        read_image_file(_path("US1_J2KR.dcm"))


def test_too_small(tmp_path):
    path = tmp_path / "tiny.png"
    PIL.Image.fromarray(np.full((12, 40), 128, np.uint8)).save(path)
    with pytest.raises(UnreadableError, match="too small"):
        read_image_file(path, crop="none")
    # large file, tiny content: too small only after the crop
    image = np.zeros((100, 100), np.uint8)
    image[40:48, 40:48] = 200
    path = tmp_path / "speck.png"
    PIL.Image.fromarray(image).save(path)
    assert read_image_file(path, crop="none").frames[0].shape == (100, 100)
    with pytest.raises(UnreadableError, match="too small after crop"):
        read_image_file(path, crop="auto")


def test_bad_arguments():
    path = _path("US1_UNCR.dcm")
    with pytest.raises(ValueError, match="frame_stride"):
        read_image_file(path, frame_stride=0)
    with pytest.raises(ValueError, match="max_frames"):
        read_image_file(path, max_frames=0)
    with pytest.raises(ValueError, match="crop"):
        read_image_file(path, crop="scan")
