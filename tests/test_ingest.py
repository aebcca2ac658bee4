"""Ingest of real DICOM, PNG and JPEG files (and planted bad ones) into a TFDS dataset."""

import csv
import glob
import io
import json
import os
import re
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

from usfm_jax.data.ingest import (
    IngestError,
    Item,
    NoUsableImages,
    Options,
    assign_split,
    ingest,
    list_items,
    patient_key,
    salted_hash,
    warn_about_splits,
)
from usfm_jax.data.synthetic import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = "test-salt"
GOOD_DICOM = {
    "liver": ["US1_UNCR.dcm", "US1_J2KR.dcm"],  # the same pixels: lossless JPEG 2000 twin
    "kidney": ["gdcm-US-ALOKA-16.dcm", "OBXXXX1A.dcm", "OBXXXX1A_rle.dcm"],  # OB twins too
    "heart": ["color3d_jpeg_baseline.dcm"],  # 120-frame cine
    "breast": ["JPGLosslessP14SV1_1s_1f_8b.dcm"],
}
# DICOM files named as PACS and scanners export them: a UID, Siemens' .IMA (none is a twin)
UID_NAMED = {"kidney": ("CT_small.dcm", "1.2.840.113619.2.55.3.604688119.868.1234567890.123")}
UID_NAMED["liver"] = ("MR_small.dcm", "IM0001.IMA")
DUPLICATE_FILES = {"US1_UNCR.dcm", "OBXXXX1A_rle.dcm"}  # the later one of each twin (by name)
OPTIONS = Options(resize=0, frame_stride=30, max_frames=3, crop="none", salt=SALT)
SHARD_BYTES = 100_000


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
    for organ, (source, name) in UID_NAMED.items():
        shutil.copy(get_testdata_file(source), root / organ / name)
    os.makedirs(root / "thyroid")
    for i in range(3):
        image, _ = generate(7, i, (96, 128), organ=2)
        (root / "thyroid" / f"scan{i}.png").write_bytes(_png_bytes(image))
    rgb = np.stack([generate(7, 9, 64, organ=2)[0]] * 3, axis=-1)
    (root / "thyroid" / "photo.jpg").write_bytes(_png_bytes(rgb, "JPEG"))
    (root / "thyroid" / "notes.txt").write_text("not an image: ignored and reported\n")
    os.makedirs(root / "spleen" / ".cache")  # a folder without images: only a warning
    (root / "spleen" / "readme.md").write_text("images to come\n")
    (root / "spleen" / ".cache" / "x.png").write_bytes(b"hidden: never read")
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
    # small shards: a split spans several, and an organ's records cross from one to the next
    card = ingest(source_tree, out, "us_test", OPTIONS, workers=2, shard_bytes=SHARD_BYTES)
    return out, card


def _load(card: dict, split: str = "train"):
    return tfds.builder_from_directory(card["data_dir"]).as_data_source(split=split)


def test_every_valid_image_lands_and_counts_are_right(ingested):
    _, card = ingested
    expected = {"liver": 2, "kidney": 3, "heart": 3, "breast": 1, "thyroid": 4}
    assert card["images"]["train"] == expected
    assert card["organs"] == sorted(expected)  # no "spleen": its folder holds no image
    assert card["duplicates_removed"] == len(DUPLICATE_FILES)
    assert card["files"] == {
        "listed": 18, "used": {"train": 11}, "skipped": 5, "all_frames_duplicate": 2, "ignored": 2
    }  # fmt: skip
    assert card["splits_left_out"] == []
    ds = _load(card)
    assert len(ds) == sum(expected.values())
    shards = tfds.builder_from_directory(card["data_dir"]).info.splits["train"].shard_lengths
    assert len(shards) > 2 and sum(shards) == len(ds)
    names = card["organs"]
    organs = [names[ds[i]["organ"]] for i in range(len(ds))]
    for organ, (start, end) in card["organ_ranges"]["train"].items():  # grouped by organ
        assert organs[start:end] == [organ] * (end - start)


def test_bad_files_are_skipped_with_reasons(ingested, source_tree):
    _, card = ingested
    out, _ = ingested
    with open(os.path.join(out, "us_test_skipped_paths.csv")) as f:  # outside the dataset
        rows = {os.path.basename(r["path"]): r["reason"] for r in csv.DictReader(f)}
    skipped = {"empty.png", "truncated.dcm", "truncated.png", "notes.dcm", "report.dcm"}
    assert set(rows) == skipped | {"notes.txt", "readme.md"}
    assert rows["notes.txt"].startswith("ignored") and rows["readme.md"].startswith("ignored")
    assert card["skipped_paths_report"] == os.path.join(out, "us_test_skipped_paths.csv")
    with open(os.path.join(card["data_dir"], "dataset_card.json")) as f:
        written = f.read()
    assert out not in written and source_tree not in written  # true wherever it is copied
    report = json.loads(written)["skipped_paths_report"]
    assert os.path.samefile(os.path.join(card["data_dir"], report), card["skipped_paths_report"])
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
    for organ, (source, name) in UID_NAMED.items():  # taken by content, whatever the name
        landed = by_path[salted_hash(os.path.join(organ, name), SALT)]
        assert (
            landed["image"].shape[:2]
            == pydicom.dcmread(get_testdata_file(source)).pixel_array.shape
        )
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
    ds = _load(card)
    patients = {ds[i]["path_hash"].decode(): ds[i]["patient_hash"].decode() for i in range(len(ds))}
    liver = patients[salted_hash(os.path.join("liver", "US1_J2KR.dcm"), SALT)]
    assert liver == salted_hash("13US1", SALT)  # its PatientID, salted


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


def test_dicom_files_without_patient_id_are_split_by_study(tmp_path):
    """An export that blanks PatientID keeps StudyInstanceUID: a study is one patient's, so its
    files go to one split together, not each its own way."""
    ds = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm"))
    ds.PatientID = ""
    items = []
    for i, study in enumerate(["1.2.3.4", "1.2.3.4", "1.2.3.5"]):
        ds.StudyInstanceUID = study
        ds.save_as(tmp_path / f"{i}.dcm")
        items.append(Item(str(tmp_path / f"{i}.dcm"), "liver", f"{i}.dcm"))
    png = tmp_path / "still.png"
    png.write_bytes(_png_bytes(generate(3, 0, 64)[0]))
    items.append(Item(str(png), "liver", "still.png", study_id="7"))  # a manifest's study id
    items.append(Item(str(png), "liver", "still.png"))
    keys = [patient_key(item) for item in items]
    assert keys == ["study:1.2.3.4", "study:1.2.3.4", "study:1.2.3.5", "study:7", "file:still.png"]
    ds.PatientID = "P1"
    ds.save_as(tmp_path / "0.dcm")
    assert patient_key(items[0]) == "P1"  # the patient, when known, first


def test_a_manifest_listing_a_file_under_two_organs_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes(generate(3, 0, 64)[0]))
    rows = [("path", "organ"), ("a.png", "liver"), ("b.png", "liver"), ("./a.png", "kidney")]
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    error = "lines 2 and 4 list './a.png' under two organs, 'liver' and 'kidney'"
    with pytest.raises(IngestError, match=re.escape(error)):
        list_items(str(tmp_path / "manifest.csv"))


def test_an_image_in_val_and_in_train_stays_in_val(tmp_path, caplog):
    """Exact copies under two patients: the evaluation split keeps its image, train drops its
    copy; a split left with copies only says so."""
    options = Options(resize=0, val_fraction=0.3, salt=SALT)
    train, val = _patients_in("train", options, 2), _patients_in("val", options, 2)
    image = _png_bytes(generate(5, 0, 64)[0])
    rows = [("path", "organ", "patient_id")]
    for name, patient, content in [
        ("t0.png", train[0], image),
        ("v0.png", val[0], image),
        ("t1.png", train[1], _png_bytes(generate(5, 1, 64)[0])),
    ]:
        (tmp_path / name).write_bytes(content)
        rows.append((name, "liver", patient))  # fmt: skip
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    card = ingest(str(tmp_path / "manifest.csv"), str(tmp_path / "out"), "copies", options)
    assert card["images"]["val"] == {"liver": 1} and card["images"]["train"] == {"liver": 1}
    assert card["duplicates_removed"] == 1
    val_hash = salted_hash("v0.png", SALT)
    assert [r["path_hash"].decode() for r in _load(card, "val")] == [val_hash]
    # a val split of copies alone is left out, and the warning says why
    rows = [rows[0], ("t0.png", "liver", train[0]), ("v0.png", "liver", val[0])]
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with caplog.at_level("WARNING", logger="absl"):
        card = ingest(str(tmp_path / "manifest.csv"), str(tmp_path / "out"), "copies2", options)
    assert card["splits_left_out"] == ["train"] and card["images"]["val"] == {"liver": 1}
    (warning,) = [r.getMessage() for r in caplog.records if "is left out" in r.getMessage()]
    assert warning.startswith("split 'train' is left out: none of its files gave a new usable "
                              "image (0 skipped")  # fmt: skip
    assert warning.endswith("1 held only images already in another split)")


def test_an_organ_whose_patients_all_went_to_val_is_warned(tmp_path, caplog):
    options = Options(resize=0, val_fraction=0.3, salt=SALT)
    rows = [("path", "organ", "patient_id")]
    patients = _patients_in("train", options, 3) + _patients_in("val", options, 1)
    for i, (organ, patient) in enumerate(zip(["liver"] * 3 + ["spleen"], patients, strict=True)):
        (tmp_path / f"{i}.png").write_bytes(_png_bytes(generate(5, i, 64)[0]))
        rows.append((f"{i}.png", organ, patient))
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with caplog.at_level("WARNING", logger="absl"):
        card = ingest(str(tmp_path / "manifest.csv"), str(tmp_path / "out"), "rare", options)
    assert card["images"]["train"] == {"liver": 3} and card["images"]["val"] == {"spleen": 1}
    warnings = [r.getMessage() for r in caplog.records]
    assert any(w.startswith("organ 'spleen' has no image in train: all of its patients went to "
                            "val") for w in warnings), warnings  # fmt: skip
    assert not any("organ 'liver'" in w for w in warnings)


def test_existing_output_is_refused_unless_overwritten(ingested, source_tree):
    out, _ = ingested
    with pytest.raises(FileExistsError, match="--overwrite"):
        ingest(source_tree, out, "us_test", OPTIONS, workers=1)


def _patients_in(split: str, options: Options, count: int) -> list[str]:
    """Patient ids that ``assign_split`` puts in ``split``."""
    names = (f"patient{i}" for i in range(10_000))
    return [p for p in names if assign_split(p, options) == split][:count]


def test_a_split_whose_files_are_all_bad_is_left_out(tmp_path):
    options = Options(resize=0, val_fraction=0.3, salt=SALT)
    rows = [("path", "organ", "patient_id")]
    for i, patient in enumerate(_patients_in("train", options, 3)):
        (tmp_path / f"{i}.png").write_bytes(_png_bytes(generate(5, i, 64)[0]))
        rows.append((f"{i}.png", "liver", patient))
    (tmp_path / "cut.png").write_bytes(_png_bytes(generate(5, 9, 64)[0])[:100])
    rows.append(("cut.png", "liver", _patients_in("val", options, 1)[0]))
    with open(tmp_path / "manifest.csv", "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f).writerows(rows)  # with a byte-order mark, as Excel saves CSV
    (tmp_path / "latin1.csv").write_bytes("path,organ\nf\xf6tus.png,liver\n".encode("latin-1"))
    with pytest.raises(IngestError, match=r"manifest .*latin1\.csv is not a UTF-8 CSV file"):
        ingest(str(tmp_path / "latin1.csv"), str(tmp_path / "out"), "no_val", options)
    card = ingest(str(tmp_path / "manifest.csv"), str(tmp_path / "out"), "no_val", options)
    assert card["splits_left_out"] == ["val"]
    assert card["images"]["train"] == {"liver": 3} and card["images"]["val"] == {}
    assert card["files"]["skipped"] == 1 and card["skipped_reasons"]
    assert len(_load(card, "train")) == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["no_val", "no_val_skipped_paths.csv"]


def test_a_failed_run_leaves_no_dataset_and_keeps_the_old_one(ingested, tmp_path):
    source = tmp_path / "in"
    (source / "liver").mkdir(parents=True)
    (source / "liver" / "broken.png").write_bytes(b"\x89PNG not really")
    out, card = ingested
    report = os.path.join(out, "us_test_skipped_paths.csv")
    with open(report) as f:
        old_report = f.read()
    failed = os.path.join(out, "us_test_skipped_paths_failed_run.csv")
    with pytest.raises(NoUsableImages, match=f"no usable image; the reasons are in {failed}$"):
        ingest(str(source), out, "us_test", OPTIONS, workers=1, overwrite=True)
    assert len(_load(card)) == sum(card["images"]["train"].values())  # the old one, intact
    with open(report) as f:  # and so is its report: the failed run's went beside it
        assert f.read() == old_report
    with open(failed) as f:
        assert [os.path.basename(r["path"]) for r in csv.DictReader(f)] == ["broken.png"]
    assert not os.path.exists(os.path.join(out, ".us_test.incomplete"))
    with pytest.raises(NoUsableImages):
        ingest(str(source), str(tmp_path / "new"), "fresh", OPTIONS, workers=1)
    assert os.listdir(tmp_path / "new") == ["fresh_skipped_paths_failed_run.csv"]  # no dataset
    # a run that succeeds writes its report with its dataset, and drops the failed run's
    (source / "liver" / "good.png").write_bytes(_png_bytes(generate(4, 1, 48)[0]))
    ingest(str(source), str(tmp_path / "new"), "fresh", OPTIONS, workers=1)
    assert sorted(os.listdir(tmp_path / "new")) == ["fresh", "fresh_skipped_paths.csv"]


def test_an_overwrite_stopped_as_it_swaps_the_datasets_keeps_one(tmp_path, monkeypatch):
    """Ctrl-C as the new dataset moves into place (before: after the old one was deleted, and
    the new one was deleted with the staging folder: no dataset at all)."""
    source = tmp_path / "in"
    (source / "liver").mkdir(parents=True)
    for i in range(3):
        (source / "liver" / f"{i}.png").write_bytes(_png_bytes(generate(3, i, 48)[0]))
    out = str(tmp_path / "out")
    card = ingest(str(source), out, "swap", OPTIONS, workers=1)
    move, moves = os.replace, []

    def stopped(src, dst):  # the first move into place is where Ctrl-C lands
        moves.append(dst)
        if moves.count(dst) == 1 and dst == os.path.join(out, "swap"):
            raise KeyboardInterrupt
        move(src, dst)

    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        ingest(str(source), out, "swap", OPTIONS, workers=1, overwrite=True)
    monkeypatch.setattr(os, "replace", move)
    assert len(_load(card)) == 3  # the old dataset, in its place
    assert sorted(os.listdir(out)) == ["swap", "swap_skipped_paths.csv"]


def test_cli_exit_status(tmp_path):
    (tmp_path / "liver").mkdir()
    (tmp_path / "liver" / "broken.png").write_bytes(b"\x89PNG not really")
    cmd = [sys.executable, "-m", "usfm_jax.data.ingest", f"--input={tmp_path}",
           f"--output={tmp_path / 'out'}", "--name=nothing", "--workers=1"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1
    assert "error: no usable image; the reasons are in" in result.stderr
    with open(tmp_path / "out" / "nothing_skipped_paths_failed_run.csv") as f:
        assert [os.path.basename(r["path"]) for r in csv.DictReader(f)] == ["broken.png"]
    # a re-run just works
    assert os.listdir(tmp_path / "out") == ["nothing_skipped_paths_failed_run.csv"]
    # a bad option value: one line, no traceback
    result = subprocess.run([*cmd, "--frame_stride=0"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: --frame_stride must be >= 1, got 0"
    assert "Traceback" not in result.stderr
    broken = tmp_path / "liver" / "broken.png"
    for extra, error in [
        ([f"--output={broken}/out"], f"--output {broken}/out: {broken} is a file, not a directory"),
        (["--workers=0"], "flag --workers=0: 0 is not a positive integer"),
        (["stray"], "unexpected arguments ['stray']: flags take the form --name=value"),
        (
            ["--name=_ds"],
            "--name '_ds' must start with a lower-case letter and hold only a-z, "
            "0-9 and _, e.g. 'thyroid_us'",
        ),  # TFDS would not find its files
    ]:
        result = subprocess.run([*cmd, *extra], cwd=ROOT, capture_output=True, text=True,
                                timeout=300, check=False)  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines()[-1] == f"error: {error}", result.stderr


def _segmentation_files(root, count: int = 4) -> tuple[str, str]:
    """images/liver/case_i.png and masks/liver/case_i.png (class ids 0 / 1)."""
    for i in range(count):
        image = generate(11, i, 32)[0]
        mask = (image > 128).astype(np.uint8)
        for folder, array in (("images", image), ("masks", mask)):
            os.makedirs(root / folder / "liver", exist_ok=True)
            (root / folder / "liver" / f"case_{i}.png").write_bytes(_png_bytes(array))
    return str(root / "images"), str(root / "masks")


def test_masks_are_never_the_images_themselves(tmp_path):
    """A --masks folder inside the input, a manifest of absolute paths, or a mask folder that
    is the images' own: refused, or every file skipped, never a dataset of images as masks."""
    images, _ = _segmentation_files(tmp_path)
    options = Options(resize=0, crop="none", masks=images)
    with pytest.raises(IngestError, match=r"--masks .* lies inside --input .* paired with them"):
        ingest(str(tmp_path), str(tmp_path / "out"), "inside", options, workers=1)
    rows = [("path", "organ")] + [(str(tmp_path / f"images/liver/case_{i}.png"), "liver")
                                  for i in range(4)]  # fmt: skip
    with open(tmp_path / "absolute.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    options = Options(resize=0, crop="none", masks=str(tmp_path / "images"))
    with pytest.raises(IngestError, match=r"the manifest lists an absolute path"):
        ingest(str(tmp_path / "absolute.csv"), str(tmp_path / "out"), "absolute", options)
    rows = [("path", "organ")] + [(f"liver/case_{i}.png", "liver") for i in range(4)]
    with open(tmp_path / "images" / "relative.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(NoUsableImages):  # the masks folder is the manifest's: each its own
        ingest(str(tmp_path / "images" / "relative.csv"), str(tmp_path / "out"), "own", options,
               workers=1)  # fmt: skip
    with open(tmp_path / "out" / "own_skipped_paths_failed_run.csv") as f:
        reasons = {r["reason"] for r in csv.DictReader(f)}
    assert reasons == {"its mask in --masks would be itself"}


def test_bad_masks_are_skipped_and_boolean_masks_read(tmp_path):
    images, masks = _segmentation_files(tmp_path)
    mask = os.path.join(masks, "liver", "case_1.png")
    data = open(mask, "rb").read()  # noqa: SIM115
    with open(mask, "wb") as f:
        f.write(data[: len(data) // 2])  # cut short
    with open(os.path.join(masks, "liver", "case_2.png"), "w") as f:
        f.write("not an image")
    boolean = PIL.Image.fromarray(np.eye(32, dtype=bool))  # mode "1", as numpy bools save
    boolean.save(os.path.join(masks, "liver", "case_3.png"))
    assert PIL.Image.open(os.path.join(masks, "liver", "case_3.png")).mode == "1"
    options = Options(resize=0, crop="none", masks=masks, salt=SALT)
    card = ingest(images, str(tmp_path / "out"), "masks", options, workers=1)
    assert card["files"]["used"] == {"train": 2} and card["files"]["skipped"] == 2
    assert card["skipped_reasons"] == {"unreadable mask (OSError": 1,
                                       "unreadable mask (UnidentifiedImageError": 1}  # fmt: skip
    ds = _load(card)
    by_path = {ds[i]["path_hash"].decode(): ds[i]["mask"] for i in range(len(ds))}
    got = by_path[salted_hash(os.path.join("liver", "case_3.png"), SALT)]
    np.testing.assert_array_equal(np.squeeze(got), np.eye(32, dtype=np.uint8))


def test_linked_folders_are_read_and_empty_organs_reported(tmp_path, caplog):
    data = tmp_path / "data"
    elsewhere = tmp_path / "site_a"
    os.makedirs(elsewhere)
    for i in range(3):
        (elsewhere / f"{i}.png").write_bytes(_png_bytes(generate(4, i, 48)[0]))
    os.makedirs(data / "kidney")
    os.symlink(elsewhere, data / "kidney" / "site_a")
    os.symlink(data / "kidney", data / "kidney" / "site_a" / "loop")  # a cycle: read once
    os.makedirs(data / "spleen")  # empty
    (data / "liver").mkdir()
    (data / "liver" / "x.png").write_bytes(_png_bytes(generate(4, 9, 48)[0]))
    with caplog.at_level("WARNING", logger="absl"):
        card = ingest(str(data), str(tmp_path / "out"), "linked", OPTIONS, workers=1)
    assert card["images"]["train"] == {"kidney": 3, "liver": 1}
    warnings = [r.getMessage() for r in caplog.records]
    assert "folder 'spleen' holds no image or DICOM file: it is not in the dataset" in warnings


def _report(out, name: str) -> dict[bytes, str]:
    """The skipped-paths report: path (as bytes on disk) -> reason."""
    with open(os.path.join(out, f"{name}_skipped_paths.csv"), encoding="utf-8",
              errors="surrogateescape", newline="") as f:  # fmt: skip
        return {os.fsencode(r["path"]): r["reason"] for r in csv.DictReader(f)}


def _deny(monkeypatch, function: str, folder: str) -> None:
    """``os.<function>`` (scandir, listdir) of a folder named ``folder`` fails as it does for
    another user's folder (this runs as root, who may read any)."""
    real = getattr(os, function)

    def denied(path="."):
        if not isinstance(path, int) and os.path.basename(os.fspath(path)) == folder:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, function, denied)


def test_what_the_input_holds_besides_images_is_left_and_reported(tmp_path, caplog, monkeypatch):
    """A CD export's DICOMDIR and a README or LICENSE beside the organ folders, a broken link
    and a folder that cannot be listed inside them: the run goes on, each reported."""
    data = tmp_path / "data"
    for organ in ("liver", "kidney", "locked"):
        (data / organ).mkdir(parents=True)
        (data / organ / "1.png").write_bytes(_png_bytes(generate(4, len(organ), 48)[0]))
    (data / "README").write_text("exported 2026-11-01\n")
    (data / "LICENSE").write_text("CC BY 4.0\n")
    shutil.copy(get_testdata_file("DICOMDIR"), data / "DICOMDIR")
    shutil.copy(get_testdata_file("DICOMDIR"), data / "liver" / "DICOMDIR")
    os.symlink(tmp_path / "moved_away.png", data / "kidney" / "2.png")
    os.symlink(tmp_path / "unmounted", data / "spleen")  # an organ folder on a gone disk
    _deny(monkeypatch, "scandir", "locked")
    with caplog.at_level("WARNING", logger="absl"):
        card = ingest(str(data), str(tmp_path / "out"), "export", OPTIONS, workers=1)
    monkeypatch.undo()
    assert card["images"]["train"] == {"kidney": 1, "liver": 1}
    assert card["files"]["ignored"] == 7
    dicomdir = "ignored: DICOMDIR, the index of a DICOM export (no image)"
    assert _report(tmp_path / "out", "export") == {
        os.fsencode(data / "README"): "ignored: neither an image nor a DICOM file",
        os.fsencode(data / "LICENSE"): "ignored: neither an image nor a DICOM file",
        os.fsencode(data / "DICOMDIR"): dicomdir,
        os.fsencode(data / "liver" / "DICOMDIR"): dicomdir,
        os.fsencode(data / "kidney" / "2.png"): "ignored: broken link",
        os.fsencode(data / "spleen"): "ignored: broken link",
        os.fsencode(data / "locked"): "ignored: folder cannot be read (Permission denied)",
    }
    warnings = [r.getMessage() for r in caplog.records]
    assert f"2 {dicomdir}, e.g. {data / 'DICOMDIR'}" in warnings
    assert (
        f"1 ignored: folder cannot be read (Permission denied), e.g. {data / 'locked'}" in warnings
    )
    assert not [w for w in warnings if "'locked' holds no image" in w]  # unread, not empty
    (data / "stray.png").write_bytes(_png_bytes(generate(4, 5, 48)[0]))  # an image up there
    with pytest.raises(IngestError, match=r"holds both files \('stray.png'\) and folders"):
        ingest(str(data), str(tmp_path / "out2"), "export", OPTIONS, workers=1)
    _deny(monkeypatch, "listdir", "data")
    with pytest.raises(IngestError, match=f"--input '{data}' cannot be read: Permission denied"):
        ingest(str(data), str(tmp_path / "out2"), "export", OPTIONS, workers=1)


def test_file_names_that_are_not_utf8_are_read_and_reported_as_found(tmp_path):
    """Linux file names are bytes; one from a Windows share may not be UTF-8."""
    data = os.path.join(os.fsencode(tmp_path), b"data")
    os.makedirs(os.path.join(data, b"liver"))
    good = os.path.join(data, b"liver", b"f\xf6tus.png")  # Latin-1 "fötus"
    cut = os.path.join(data, b"liver", b"c\xe9sar.png")
    with open(good, "wb") as f:
        f.write(_png_bytes(generate(4, 1, 48)[0]))
    with open(cut, "wb") as f:
        f.write(_png_bytes(generate(4, 2, 48)[0])[:100])
    out = str(tmp_path / "out")
    card = ingest(os.fsdecode(data), out, "latin", OPTIONS, workers=1)
    assert card["images"]["train"] == {"liver": 1} and card["files"]["skipped"] == 1
    (reason,) = _report(out, "latin").values()
    assert list(_report(out, "latin")) == [cut] and reason.startswith("truncated or corrupt")
    hashes = {r["path_hash"].decode() for r in _load(card)}
    assert hashes == {salted_hash(os.fsdecode(b"liver/f\xf6tus.png"), SALT)}
    os.makedirs(os.path.join(data, b"f\xf6tus"))  # an organ folder: its name is a label
    shutil.copy(good, os.path.join(data, b"f\xf6tus", b"1.png"))
    with pytest.raises(IngestError, match=r"organ folder b'f\\xf6tus' is not a UTF-8 name"):
        ingest(os.fsdecode(data), out, "latin2", OPTIONS, workers=1)


def test_splits_without_files_and_one_placeholder_patient_are_warned(caplog):
    options = Options(val_fraction=0.2, salt=SALT)
    patients = ["ANONYMOUS"] * 50
    splits = [assign_split(p, options) for p in patients]
    with caplog.at_level("WARNING", logger="absl"):
        warn_about_splits(patients, splits, options)
    warnings = [r.getMessage() for r in caplog.records]
    empty = "train" if splits[0] == "val" else "val"
    assert any(w.startswith(f"split {empty!r} (fraction") and "from 1 patient(s)" in w
               for w in warnings)  # fmt: skip
    assert any(w.startswith("one patient id holds 50 of the 50 files") for w in warnings)
    caplog.clear()
    patients = [f"p{i}" for i in range(50)]
    with caplog.at_level("WARNING", logger="absl"):
        warn_about_splits(patients, [assign_split(p, options) for p in patients], options)
    assert not caplog.records


def test_a_resize_under_the_smallest_image_kept_is_refused():
    for size in (-1, 1, 8, 15):  # ingest skips images under 16 px a side
        with pytest.raises(IngestError, match=rf"^--resize must be 0 \(keep the size\) or at "
                                             rf"least 16 px, got {size}$"):  # fmt: skip
            Options(resize=size)
    assert Options(resize=0).resize == 0 and Options(resize=16).resize == 16


def test_a_manifest_without_rows_says_so(tmp_path):
    (tmp_path / "header_only.csv").write_text("path,organ\n")
    with pytest.raises(IngestError, match=r"header_only\.csv has a header but no rows"):
        list_items(str(tmp_path / "header_only.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(IngestError, match=r"empty\.csv needs a header with at least 'path'"):
        list_items(str(tmp_path / "empty.csv"))


def _save(path, array: np.ndarray, orientation: int = 1) -> None:
    """``array`` as an image file (format by suffix), with an EXIF orientation unless 1."""
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation  # Orientation
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path, **({"exif": exif} if orientation != 1 else {}))


def test_exif_rotated_pairs_and_masks_without_class_ids_are_skipped(tmp_path):
    """The reader turns an EXIF-rotated image, so how its mask lines up is ambiguous; a mask of
    only 0 and 255 (255 = ignore) is a binary mask saved as 0/255: each is skipped and reported,
    never stored as misaligned labels or as "ignore"."""
    images, masks = _segmentation_files(tmp_path, count=6)
    _save(os.path.join(images, "liver", "case_0.png"), generate(11, 0, 32)[0], orientation=6)
    wide = generate(11, 9, (100, 200))[0]  # 100x200 both, the image turned to 200x100
    _save(os.path.join(images, "liver", "wide.jpg"), wide, orientation=6)
    _save(os.path.join(masks, "liver", "wide.png"), (wide > 128).astype(np.uint8))
    _save(os.path.join(masks, "liver", "case_1.png"), np.eye(32, dtype=np.uint8), orientation=3)
    binary = np.zeros((32, 32), np.uint8)
    binary[8:24, 8:24] = 255
    _save(os.path.join(masks, "liver", "case_2.png"), binary)  # 0/255
    _save(os.path.join(masks, "liver", "case_3.png"), np.full((32, 32), 255, np.uint8))
    labelled = np.where(binary, 1, 0).astype(np.uint8)
    labelled[:2] = 255  # a class, background and an ignored band: kept
    _save(os.path.join(masks, "liver", "case_4.png"), labelled)
    options = Options(resize=0, crop="none", masks=masks, salt=SALT)
    card = ingest(images, str(tmp_path / "out"), "exif", options, workers=1)
    assert card["files"]["used"] == {"train": 2} and card["files"]["skipped"] == 5
    assert card["skipped_reasons"] == {
        "EXIF-rotated image with a paired mask": 2,
        "EXIF-rotated mask with a paired image": 1,
        "mask holds only 0 and 255": 1,
        "mask is all 255 (ignore)": 1,
    }
    assert card["mask_values"] == [0, 1, 255]
    with open(tmp_path / "out" / "exif_skipped_paths.csv") as f:
        rows = {os.path.basename(r["path"]): r["reason"] for r in csv.DictReader(f)}
    assert rows["wide.jpg"] == (
        "EXIF-rotated image with a paired mask: its EXIF orientation 6 leaves ambiguous how "
        "the two line up; save the image without the EXIF rotation"
    )
    assert "a binary mask saved as 0/255 needs class ids 0/1" in rows["case_2.png"]


def test_exif_rotated_enhancement_pairs_are_skipped(tmp_path):
    noisy, clean = tmp_path / "noisy" / "liver", tmp_path / "clean" / "liver"
    for i, (image_orientation, target_orientation) in enumerate(((6, 1), (1, 8), (1, 1))):
        image = generate(12, i, 32)[0]
        _save(str(noisy / f"case_{i}.png"), image, image_orientation)
        _save(str(clean / f"case_{i}.png"), image, target_orientation)
    options = Options(resize=0, crop="none", targets=str(tmp_path / "clean"), salt=SALT)
    card = ingest(str(tmp_path / "noisy"), str(tmp_path / "out"), "pairs", options, workers=1)
    assert card["files"]["used"] == {"train": 1}
    assert card["skipped_reasons"] == {
        "EXIF-rotated image with a paired target": 1,
        "EXIF-rotated target with a paired image": 1,
    }
