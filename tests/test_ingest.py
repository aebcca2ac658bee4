"""Ingest of real DICOM, PNG and JPEG files (and planted bad ones) into a TFDS dataset."""

import csv
import glob
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pydicom
import pytest
import tensorflow_datasets as tfds
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array

from usfm_jax.data.ingest import Options, ingest, salted_hash
from usfm_jax.data.synthetic import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = "test-salt"
GOOD_DICOM = {
    "liver": ["US1_UNCR.dcm", "US1_J2KR.dcm"],  # the same pixels: lossless JPEG 2000 twin
    "kidney": ["gdcm-US-ALOKA-16.dcm", "OBXXXX1A.dcm", "OBXXXX1A_rle.dcm"],  # OB twins too
    "heart": ["color3d_jpeg_baseline.dcm"],  # 120-frame cine
    "breast": ["JPGLosslessP14SV1_1s_1f_8b.dcm"],
}
DUPLICATE_FILES = {"US1_UNCR.dcm", "OBXXXX1A_rle.dcm"}  # the later one of each twin (by name)
OPTIONS = Options(resize=0, frame_stride=30, max_frames=3, crop="none", salt=SALT)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.round(rgb[..., :3].astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)


def _png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> str:
    """organ/ folders of real DICOM files, PNG and JPEG images, and planted bad files."""
    root = tmp_path_factory.mktemp("exports")
    for organ, names in GOOD_DICOM.items():
        os.makedirs(root / organ)
        for name in names:
            shutil.copy(get_testdata_file(name), root / organ / name)
    os.makedirs(root / "thyroid")
    for i in range(3):
        image, _ = generate(7, i, (96, 128), organ=2)
        (root / "thyroid" / f"scan{i}.png").write_bytes(_png_bytes(image))
    rgb = np.stack([generate(7, 9, 64, organ=2)[0]] * 3, axis=-1)
    (root / "thyroid" / "photo.jpg").write_bytes(_png_bytes(rgb, "JPEG"))
    bad = root / "thyroid" / "bad"
    os.makedirs(bad)
    (bad / "empty.png").write_bytes(b"")
    dicom = open(get_testdata_file("US1_UNCR.dcm"), "rb").read()  # noqa: SIM115
    (bad / "truncated.dcm").write_bytes(dicom[: int(len(dicom) * 0.6)])
    (bad / "truncated.png").write_bytes(_png_bytes(generate(7, 20, 64)[0])[:300])
    (bad / "notes.dcm").write_text("this is not a DICOM file\n")
    no_pixels = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm"))
    del no_pixels.PixelData
    no_pixels.save_as(bad / "report.dcm")
    return str(root)


@pytest.fixture(scope="module")
def ingested(source_tree, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("tfds"))
    card = ingest(source_tree, out, "us_test", OPTIONS, workers=2)
    return out, card


def _load(card: dict, split: str = "train"):
    return tfds.builder_from_directory(card["data_dir"]).as_data_source(split=split)


def test_every_valid_image_lands_and_counts_are_right(ingested):
    _, card = ingested
    expected = {"liver": 1, "kidney": 2, "heart": 3, "breast": 1, "thyroid": 4}
    assert card["images"]["train"] == expected
    assert card["duplicates_removed"] == len(DUPLICATE_FILES)
    assert card["files"] == {
        "listed": 16, "used": {"train": 9}, "skipped": 5, "all_frames_duplicate": 2
    }  # fmt: skip
    ds = _load(card)
    assert len(ds) == sum(expected.values())
    names = card["organs"]
    organs = [names[ds[i]["organ"]] for i in range(len(ds))]
    for organ, (start, end) in card["organ_ranges"]["train"].items():  # grouped by organ
        assert organs[start:end] == [organ] * (end - start)


def test_bad_files_are_skipped_with_reasons(ingested, source_tree):
    _, card = ingested
    out, _ = ingested
    with open(os.path.join(out, "us_test_skipped_paths.csv")) as f:  # outside the dataset
        rows = {os.path.basename(r["path"]): r["reason"] for r in csv.DictReader(f)}
    assert set(rows) == {"empty.png", "truncated.dcm", "truncated.png", "notes.dcm", "report.dcm"}
    assert "empty" in rows["empty.png"]
    assert "pixel data" in rows["report.dcm"]
    assert all(reason and source_tree not in reason for reason in rows.values())
    with open(os.path.join(card["data_dir"], "skipped.csv")) as f:  # in it: hashes only
        hashed = {r["path_hash"]: r["reason"] for r in csv.DictReader(f)}
    key = os.path.join("thyroid", "bad", "report.dcm")
    assert hashed[salted_hash(key, SALT)] == rows["report.dcm"]
    with open(os.path.join(card["data_dir"], "skipped.csv"), "rb") as f:
        assert source_tree.encode() not in f.read()


def test_landed_dicom_pixels_match_pydicom(ingested, source_tree):
    _, card = ingested
    ds = _load(card)
    by_path = {ds[i]["path_hash"].decode(): ds[i] for i in range(len(ds))}
    # the JPEG 2000 file landed (its uncompressed twin was the duplicate): same pixels as the twin
    landed = by_path[salted_hash(os.path.join("liver", "US1_J2KR.dcm"), SALT)]  # relative path
    expected = _luma(
        pydicom.dcmread(os.path.join(source_tree, "liver", "US1_UNCR.dcm")).pixel_array
    )
    np.testing.assert_allclose(landed["image"][..., 0], expected, atol=1)
    cine = pydicom.dcmread(os.path.join(source_tree, "heart", "color3d_jpeg_baseline.dcm"))
    heart = [ds[i] for i in range(len(ds)) if card["organs"][ds[i]["organ"]] == "heart"]
    assert sorted(r["frame"] for r in heart) == [0, 30, 60]  # stride 30, at most 3 frames
    for record in heart:  # YBR_FULL_422: the gray image is the decoded Y (luma) plane
        raw = pixel_array(cine, raw=True, index=int(record["frame"]))
        np.testing.assert_array_equal(record["image"][..., 0], raw[..., 0])


def test_no_names_are_stored(ingested):
    _, card = ingested
    blob = b"".join(open(p, "rb").read() for p in glob.glob(card["data_dir"] + "/*"))  # noqa: SIM115
    for secret in (b"CompressedSamples", b"NAME^PATIENT", b"Citizen", b"13US1", b"98279"):
        assert secret not in blob
    liver = _load(card)[card["organ_ranges"]["train"]["liver"][0]]
    assert liver["patient_hash"].decode() == salted_hash("13US1", SALT)  # PatientID, salted


def test_patients_never_straddle_splits(tmp_path):
    rows = [("path", "organ", "patient_id")]
    for i in range(40):
        image, _ = generate(3, i, 64)
        (tmp_path / f"{i}.png").write_bytes(_png_bytes(image))
        rows.append((f"{i}.png", "liver" if i % 2 else "kidney", f"patient{i // 4}"))
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    options = Options(resize=0, val_fraction=0.5, salt=SALT)
    card = ingest(str(manifest), str(tmp_path / "out"), "split_test", options, workers=1)
    patients = {}
    for split in ("train", "val"):
        ds = _load(card, split)
        patients[split] = {ds[i]["patient_hash"] for i in range(len(ds))}
    assert patients["train"] and patients["val"]
    assert not patients["train"] & patients["val"]
    assert len(patients["train"] | patients["val"]) == 10


def test_existing_output_is_refused_unless_overwritten(ingested, source_tree):
    out, _ = ingested
    with pytest.raises(FileExistsError, match="--overwrite"):
        ingest(source_tree, out, "us_test", OPTIONS, workers=1)


def test_cli_exit_status(tmp_path):
    (tmp_path / "liver").mkdir()
    (tmp_path / "liver" / "broken.png").write_bytes(b"\x89PNG not really")
    cmd = [sys.executable, "-m", "usfm_jax.data.ingest", f"--input={tmp_path}",
           f"--output={tmp_path / 'out'}", "--name=nothing", "--workers=1"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1
    assert "error: no usable image in split(s) ['train']" in result.stderr
    card = json.loads((tmp_path / "out" / "nothing" / "1.0.0" / "dataset_card.json").read_text())
    assert card["files"]["skipped"] == 1
