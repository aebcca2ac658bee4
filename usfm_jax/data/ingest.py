"""Ingest ultrasound files (DICOM, PNG, JPEG, BMP, TIFF) into a TFDS array_record dataset.

    python -m usfm_jax.data.ingest --input DIR_OR_MANIFEST.csv --output DATA_DIR --name NAME \
        [--resize 256] [--frame_stride 1] [--max_frames 16] [--crop auto] [--val_fraction 0.1] \
        [--test_fraction 0.2] [--masks MASK_DIR | --targets CLEAN_DIR]

Input: a directory whose first level names the organ (``DIR/liver/**/*.dcm``) or, for a
classification task, the class (``DIR/benign/*.png``); a flat directory of files (one group,
``all``); or a CSV manifest with columns ``path`` (absolute or relative to the CSV) and
``organ``, optionally ``patient_id``, ``study_id``, ``device``, ``center``.

Labelled downstream data: ``--masks`` (segmentation: PNG masks of integer class ids, 255 =
ignore) and ``--targets`` (enhancement: clean images) name a directory holding, for every
input file, the file with the same relative path and stem (PNG first). Each record then carries
``mask`` / ``target``, resized like its image (nearest neighbour for masks); pairs need
``--crop none`` and single-frame images, and an input without its pair is skipped and reported,
and so is a pair whose image or mask / target carries an EXIF rotation (how the two line up is
ambiguous) or whose mask holds only 0 and 255 (no class id: a binary mask saved as 0/255).

Every frame becomes a single-channel uint8 PNG (``readers.read_image_file``: colour to gray,
windowing, scan-region crop; then the shorter side resized). Exact duplicates (same pixels) are
kept once. No names or free text are stored: paths and patient / study ids only as salted SHA-256
hashes. Patients are split between train, val and test as a whole (a hash of the patient
decides).

Output, in ``DATA_DIR/NAME/1.0.0``: the TFDS dataset (readable without TensorFlow through
``tfds.builder_from_directory(...).as_data_source(split)``), records grouped by organ in each
split and written as their files are read (``records``: memory stays flat);
``dataset_card.json`` (per-organ counts and index ranges per split, options, what was skipped
and why) and ``skipped.csv`` (path hash, reason) beside it. The raw paths of the skipped
files, for the user to act on, go to ``DATA_DIR/NAME_skipped_paths.csv``, outside the dataset,
written with it; a run that finds no usable image writes them to
``DATA_DIR/NAME_skipped_paths_failed_run.csv`` instead (an existing dataset's report stays).
Files run in parallel over the cores; a file that cannot be read is skipped and reported, never
fatal. Files are taken by suffix (images, ``.dcm`` / ``.dicom`` / ``.dic`` / ``.ima``, none) or,
whatever their name (PACS exports name files by UID), by DICOM's preamble; other files are
ignored and listed in the report too. A val or test split whose every file was skipped is left
out with a warning. Exit status 0 unless no usable image was found; the dataset appears only
once complete (a failed run leaves none). Pixels are not scrubbed: text burned into an image
(outside the scan region when cropping) stays.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import io
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import pydicom
import tensorflow_datasets as tfds
import tqdm
from absl import flags, logging

from usfm_jax.cli import leave_ctrl_c_to_the_main_process, run_program
from usfm_jax.data import readers, records
from usfm_jax.data.layout import CARD, IGNORE, SPLITS, VERSION
from usfm_jax.paths import PathError, work_directory

FLAT_GROUP = "all"  # the organ / class of the files of a flat input folder
# by name; a file with another suffix is taken when it starts with DICOM's preamble, else ignored
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *readers.DICOM_SUFFIXES)
MANIFEST_COLUMNS = ("path", "organ", "patient_id", "study_id", "device", "center")
DESCRIPTION = "Ultrasound images ingested by usfm_jax.data.ingest."


class IngestError(ValueError):
    """A mistake in the ingest's input or options; the message names the flag or file."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What ingest does to every file; recorded in the dataset card."""

    resize: int = 256  # shorter side in pixels; 0 keeps the size
    frame_stride: int = 1
    max_frames: int | None = 16
    crop: str = "auto"
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    masks: str = ""  # directory of segmentation masks, paired by relative path and stem
    targets: str = ""  # directory of clean target images (enhancement pairs), paired alike
    salt: str = ""
    png_compression: int = 6  # zlib level: 0 decodes ~2x faster at ~3x the disk of 6

    @property
    def pair_fields(self) -> tuple[str, ...]:
        """The paired images each record carries: "mask", "target"."""
        return tuple(f for f, d in (("mask", self.masks), ("target", self.targets)) if d)

    def __post_init__(self):
        if self.frame_stride < 1:
            raise IngestError(f"--frame_stride must be >= 1, got {self.frame_stride}")
        if self.max_frames is not None and self.max_frames < 1:
            raise IngestError(f"--max_frames must be >= 1 (0: every frame), got {self.max_frames}")
        if self.resize < 0 or 0 < self.resize < readers.MIN_SIDE:  # smaller images are skipped
            raise IngestError(
                f"--resize must be 0 (keep the size) or at least {readers.MIN_SIDE} px, "
                f"got {self.resize}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise IngestError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0 - self.val_fraction:
            raise IngestError(
                f"--test_fraction must be in [0, 1 - val_fraction), got {self.test_fraction}"
            )
        for name in ("masks", "targets"):
            directory = getattr(self, name)
            if directory and not os.path.isdir(directory):
                raise IngestError(f"--{name} {directory!r} is not a directory")
            if directory and self.crop != "none":
                raise IngestError(
                    f"--{name} needs --crop none: pairs must stay aligned pixel for pixel"
                )
        if not 0 <= self.png_compression <= 9:
            raise IngestError(f"--png_compression must be in [0, 9], got {self.png_compression}")


@dataclasses.dataclass(frozen=True)
class Item:
    """One input file and what the manifest (or the directory tree) says about it."""

    path: str
    organ: str
    key: str = ""  # the path relative to the input root: hashed, and stable across mounts
    patient_id: str | None = None
    study_id: str | None = None
    device: str | None = None
    center: str | None = None


class Skipped(NamedTuple):
    """A file that gave no image, and why."""

    key: str  # the path relative to the input (only its hash goes into the dataset)
    path: str
    reason: str
    split: str


class NoUsableImages(RuntimeError):
    """No file gave a usable image: see the skipped-files report."""


def salted_hash(value: str, salt: str) -> str:
    """A pseudonym: the first 16 hex digits of SHA-256(salt, value). A path that is not UTF-8
    (its bytes kept by Python as surrogates) is hashed as its bytes on disk."""
    return hashlib.sha256(f"{salt}\x00{value}".encode("utf-8", "surrogateescape")).hexdigest()[:16]


def list_items(input_path: str) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items from a directory tree (first level = organ) or a CSV manifest, in a stable order;
    and what of the directory is not read, as (path, reason): files neither images nor DICOM,
    DICOMDIR indexes, broken links, folders that cannot be listed."""
    if os.path.isdir(input_path):
        try:
            names = [f for f in sorted(os.listdir(input_path)) if not f.startswith(".")]
        except OSError as e:
            raise IngestError(f"--input {input_path!r} cannot be read: {e.strerror}") from e
        files = [f for f in names if not os.path.isdir(os.path.join(input_path, f))]
        groups = sorted(_folders(input_path))
        if not groups:  # a flat folder: one group
            items, ignored = [], []
            for f in files:
                _take(os.path.join(input_path, f), FLAT_GROUP, f, items, ignored)
            return items, ignored
        # beside organ folders: notes, licences, DICOMDIR are left; an image is an error
        top = [os.path.join(input_path, f) for f in files]
        images = [os.path.basename(p) for p in top if _is_candidate(p, without_suffix=False)]
        if images:
            raise IngestError(
                f"--input {input_path!r} holds both files ({images[0]!r}) and folders: put the "
                "files in folders (one per organ or class) or list them in a CSV manifest"
            )
        items, ignored = [], [(path, _why_not(path)) for path in top]

        def unreadable(error: OSError) -> None:
            ignored.append((error.filename, f"ignored: folder cannot be read ({error.strerror})"))

        seen = set()
        for organ in groups:
            # linked folders are read (a dataset assembled from links), each real folder once
            for root, dirs, names in os.walk(
                os.path.join(input_path, organ), onerror=unreadable, followlinks=True
            ):
                real = os.path.realpath(root)
                if real in seen:  # a link back up the tree, or a second link to one folder
                    dirs[:] = []
                    continue
                seen.add(real)
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in sorted(n for n in names if not n.startswith(".")):
                    path = os.path.join(root, f)
                    _take(path, organ, os.path.relpath(path, input_path), items, ignored)
        return items, ignored
    if os.path.isfile(input_path) and input_path.lower().endswith(".csv"):
        return _read_manifest(input_path), []
    if not os.path.exists(input_path):
        raise IngestError(f"--input {input_path!r} does not exist")
    raise IngestError(f"--input {input_path!r} is neither a directory nor a .csv manifest")


NOT_AN_IMAGE = "ignored: neither an image nor a DICOM file"


def _take(path: str, group: str, key: str, items: list[Item], ignored: list) -> None:
    """Adds the file ``path`` to ``items``, or to ``ignored`` with the reason."""
    if _is_candidate(path):
        items.append(Item(path, group, key))
    else:
        ignored.append((path, _why_not(path)))


def _is_dicomdir(path: str) -> bool:
    return os.path.basename(path).upper() == "DICOMDIR"


def _why_not(path: str) -> str:
    """Why ``path``, not an image or DICOM file to read, is left."""
    if not os.path.isfile(path):
        return "ignored: broken link" if os.path.islink(path) else "ignored: not a regular file"
    if _is_dicomdir(path):
        return "ignored: DICOMDIR, the index of a DICOM export (no image)"
    return NOT_AN_IMAGE


def _is_candidate(path: str, *, without_suffix: bool = True) -> bool:
    """A file to read: an image or DICOM file by its suffix (one without suffix counts only
    ``without_suffix``: not beside the organ folders, where README and LICENSE sit), or a DICOM
    file by its preamble (any name). Never a DICOMDIR index."""
    if not os.path.isfile(path) or _is_dicomdir(path):
        return False
    suffix = os.path.splitext(path)[1].lower()
    by_name = suffix in IMAGE_SUFFIXES and (bool(suffix) or without_suffix)
    return by_name or readers.is_dicom_file(path)


def paired_path(directory: str, key: str) -> str | None:
    """The file of ``directory`` paired with the item ``key`` (its path relative to the input):
    same relative folder and stem, PNG first, then any image suffix."""
    stem = os.path.join(directory, os.path.splitext(key)[0])
    for suffix in (".png", *IMAGE_SUFFIXES):
        if suffix and os.path.isfile(stem + suffix):
            return stem + suffix
    return None


def check_pairs(input_path: str, items: Sequence[Item], options: Options) -> None:
    """Refuses --masks / --targets that would pair images with themselves or be read as
    images: a folder inside a directory input, or a manifest with absolute paths."""
    absolute = next((item for item in items if os.path.isabs(item.key)), None)
    for name in ("masks", "targets"):
        directory = getattr(options, name)
        if not directory:
            continue
        if os.path.isdir(input_path) and _inside(directory, input_path):
            raise IngestError(
                f"--{name} {directory!r} lies inside --input {input_path!r}: its files would be "
                "ingested as images, and paired with themselves. Keep them in a folder of "
                "their own that mirrors the input's layout (organ/.../stem.png)"
            )
        if absolute is not None:  # os.path.join(directory, key) would be the image itself
            raise IngestError(
                f"--{name} pairs files by their path relative to the manifest, and the manifest "
                f"lists an absolute path ({absolute.key!r}): write the paths relative to the "
                "manifest's folder"
            )


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def _refuse_exif_rotation(orientation: int, what: str, other: str) -> None:
    """Refuses one file of a pair (``what``: image, mask or target) that its EXIF orientation
    rotates or flips: whether the ``other`` was drawn on its stored or its rotated pixels
    cannot be told, and a guess would give misaligned pairs (wrong labels)."""
    if orientation != 1:
        raise readers.UnreadableError(
            f"EXIF-rotated {what} with a paired {other}: its EXIF orientation {orientation} "
            f"leaves ambiguous how the two line up; save the {what} without the EXIF rotation"
        )


def _read_mask(path: str, shape: tuple[int, int], size: int) -> np.ndarray:
    """A label mask (PNG of integer class ids, one channel) for a frame of ``shape`` before
    resizing; resized like the frame (shorter side ``size``), nearest neighbour.

    A mask of only 0 and 255 (or only 255) holds no class id, 255 meaning ignore: most likely
    a binary mask saved as 0 / 255, it is refused rather than stored as "ignore"."""
    try:
        with PIL.Image.open(path) as image:
            if image.mode not in ("1", "L", "P", "I", "I;16"):  # "1": a boolean mask, 0 / 1
                raise readers.UnreadableError(
                    f"mask has mode {image.mode}: expected one channel of integer class ids"
                )
            _refuse_exif_rotation(readers.exif_orientation(image), "mask", "image")
            mask = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a bad or cut file
        raise readers.UnreadableError(f"unreadable mask ({type(e).__name__}: {e})") from None
    if mask.shape != shape:
        raise readers.UnreadableError(f"mask shape {mask.shape} differs from the image {shape}")
    if mask.max(initial=0) > 255:
        raise readers.UnreadableError(f"mask values up to {mask.max()}: expected <= 255")
    mask = mask.astype(np.uint8)
    values = set(np.unique(mask).tolist())
    if values == {IGNORE}:
        raise readers.UnreadableError(f"mask is all {IGNORE} (ignore): no labelled pixel")
    if values == {0, IGNORE}:
        raise readers.UnreadableError(
            f"mask holds only 0 and {IGNORE}: no class id ({IGNORE} means ignore); a binary "
            f"mask saved as 0/{IGNORE} needs class ids 0/1 (mask // {IGNORE})"
        )
    if size:
        h, w = readers.resize_shorter_side(np.zeros(shape, np.uint8), size).shape
        mask = np.asarray(PIL.Image.fromarray(mask).resize((w, h), PIL.Image.NEAREST))
    return mask


def _read_manifest(path: str) -> list[Item]:
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM as Excel writes it
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as e:
        raise IngestError(f"manifest {path} is not a UTF-8 CSV file ({e})") from None
    if not {"path", "organ"} <= set(header):
        raise IngestError(
            f"manifest {path} needs a header with at least 'path' and 'organ' columns"
        )
    if not rows:
        raise IngestError(f"manifest {path} has a header but no rows: list one file per row")
    items, listed = [], {}  # listed: file -> (line, organ) of its first row
    for line, row in enumerate(rows, start=2):
        row = {k: (v or "").strip() for k, v in row.items() if k}
        if not row["path"] or not row["organ"]:
            raise IngestError(f"manifest {path}, line {line}: empty path or organ")
        file = os.path.normpath(os.path.join(base, row["path"]))
        first, organ = listed.setdefault(file, (line, row["organ"]))
        if organ != row["organ"]:  # which is it? the first would win, unseen
            raise IngestError(
                f"manifest {path}: lines {first} and {line} list {row['path']!r} under two "
                f"organs, {organ!r} and {row['organ']!r}"
            )
        extra = {k: (row.get(k) or None) for k in MANIFEST_COLUMNS[2:]}
        items.append(Item(os.path.join(base, row["path"]), row["organ"], row["path"], **extra))
    return items


def patient_key(item: Item) -> str:
    """The identity that keeps a patient's images in one split: the manifest's patient id, else
    the DICOM PatientID (header only); without one (an export that blanks it), the study (the
    manifest's study id, else StudyInstanceUID: a study is one patient's); else the file."""
    if item.patient_id:
        return item.patient_id
    study = item.study_id
    try:
        ds = pydicom.dcmread(
            item.path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"],
            force=True,
        )  # force: like the reader, accept DICOM files without the preamble  # fmt: skip
        patient = str(ds.get("PatientID") or "").strip()
        if patient:
            return patient
        study = study or str(ds.get("StudyInstanceUID") or "").strip()
    except Exception:  # not DICOM, or unreadable: the reader reports it later
        pass
    return f"study:{study}" if study else f"file:{item.key}"


def assign_split(patient: str, options: Options) -> str:
    """train / val / test by a hash of the patient: deterministic, and a patient never
    straddles two splits."""
    if not options.val_fraction and not options.test_fraction:
        return "train"
    bucket = int(salted_hash(patient, "split:" + options.salt), 16) / 16**16
    if bucket < options.val_fraction:
        return "val"
    return "test" if bucket < options.val_fraction + options.test_fraction else "train"


def _png(frame: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(frame).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def process_file(args: tuple[Item, Options]) -> tuple[list[dict], str | None]:
    """Worker: one file -> (records without organ / split, None) or ([], reason it was skipped)."""
    item, options = args
    try:
        image = readers.read_image_file(
            item.path, frame_stride=options.frame_stride, max_frames=options.max_frames,
            crop=options.crop,
        )  # fmt: skip
    except readers.UnreadableError as e:
        return [], str(e)
    except Exception as e:  # a reader bug must not stop a million-file run: report it
        return [], f"unexpected {type(e).__name__}: {e}"
    try:
        pairs = _read_pairs(item, image, options)
    except readers.UnreadableError as e:
        return [], str(e)
    except Exception as e:  # as for the image: reported, never the end of the run
        return [], f"unexpected {type(e).__name__} reading its pair: {e}"
    records = []
    for index, frame in enumerate(image.frames):
        if options.resize:
            frame = readers.resize_shorter_side(frame, options.resize)
        patient = item.patient_id or image.patient_id
        study = item.study_id or image.study_id
        records.append(
            {
                "image": _png(frame, options.png_compression),
                "content_hash": hashlib.sha256(
                    np.asarray(frame.shape).tobytes() + frame.tobytes()
                ).hexdigest(),
                "path_hash": salted_hash(item.key, options.salt),
                "patient_hash": salted_hash(patient, options.salt) if patient else "",
                "study_hash": salted_hash(study, options.salt) if study else "",
                "device": item.device or image.device or "",
                "center": item.center or "",
                "frame": index * options.frame_stride,
                "height": frame.shape[0],
                "width": frame.shape[1],
                **pairs,
            }
        )
    return records, None


def _read_pairs(item: Item, image: readers.ImageFile, options: Options) -> dict[str, Any]:
    """The PNG bytes of the item's mask and / or clean target, resized like its frame (and
    the mask's values, for the card)."""
    pairs = {}
    for name in ("masks", "targets"):
        directory = getattr(options, name)
        if not directory:
            continue
        if len(image.frames) != 1:
            raise readers.UnreadableError(f"--{name} pairs need single-frame images")
        path = paired_path(directory, item.key)
        if path is None:
            raise readers.UnreadableError(f"no {name[:-1]} for it in --{name}")
        if os.path.samefile(path, item.path):  # --masks is the images' own folder
            raise readers.UnreadableError(f"its {name[:-1]} in --{name} would be itself")
        _refuse_exif_rotation(image.exif_orientation, "image", name[:-1])
        shape = image.frames[0].shape
        if name == "masks":
            pair = _read_mask(path, shape, options.resize)
            pairs["mask_values"] = tuple(int(v) for v in np.unique(pair))
        else:
            target = readers.read_image_file(path, max_frames=1, crop="none")
            _refuse_exif_rotation(target.exif_orientation, "target", "image")
            pair = target.frames[0]
            if pair.shape != shape:
                raise readers.UnreadableError(
                    f"target shape {pair.shape} differs from the image {shape}"
                )
            if options.resize:
                pair = readers.resize_shorter_side(pair, options.resize)
        pairs[name[:-1]] = _png(pair, options.png_compression)
    return pairs


class Writer:
    """Streams the worker pool's results, one split at a time, counting as it goes."""

    def __init__(self, items: Sequence[Item], splits: Sequence[str], organs: Sequence[str],
                 options: Options, pool: multiprocessing.pool.Pool):  # fmt: skip
        self.items, self.splits, self.organs = items, splits, organs
        self.options, self.pool = options, pool
        self.seen_hashes: set[str] = set()
        self.skipped: list[Skipped] = []
        self.counts = {split: Counter() for split in SPLITS}
        # per split: frames dropped as duplicates; files used; files read fine whose every
        # frame was already in the dataset
        self.duplicates, self.files_used, self.files_all_duplicate = Counter(), Counter(), Counter()
        self.mask_values: set[int] = set()

    def examples(self, split: str) -> Iterator[dict[str, Any]]:
        """Examples of one split, grouped by organ (the items are sorted by organ)."""
        todo = [
            (i, item)
            for i, item in enumerate(self.items)
            if self.splits[i] == split
        ]  # fmt: skip
        todo.sort(key=lambda t: (self.organs.index(t[1].organ), t[0]))
        jobs = [(item, self.options) for _, item in todo]
        results = self.pool.imap(process_file, jobs, chunksize=4)
        bar = tqdm.tqdm(zip(todo, results, strict=True), total=len(todo), unit="file",
                        desc=f"ingest {split}", dynamic_ncols=True)  # fmt: skip
        for (_, item), (frames, error) in bar:
            if error is not None:
                reason = error.replace(item.path, "<file>")
                self.skipped.append(Skipped(item.key, item.path, reason, split))
                continue
            used = False
            for record in frames:
                if record["content_hash"] in self.seen_hashes:
                    self.duplicates[split] += 1
                    continue
                self.seen_hashes.add(record["content_hash"])
                self.mask_values.update(record.pop("mask_values", ()))
                self.counts[split][item.organ] += 1
                used = True
                yield {**record, "organ": item.organ}
            self.files_used[split] += used
            self.files_all_duplicate[split] += not used


def features(organs: Sequence[str], options: Options) -> tfds.features.FeaturesDict:
    """What a record holds, as TFDS stores and decodes it."""
    png = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
    return tfds.features.FeaturesDict(
        {
            "image": png,
            "organ": tfds.features.ClassLabel(names=list(organs)),
            "content_hash": tfds.features.Text(),
            "path_hash": tfds.features.Text(),
            "patient_hash": tfds.features.Text(),
            "study_hash": tfds.features.Text(),
            "device": tfds.features.Text(),
            "center": tfds.features.Text(),
            "frame": np.int32,
            "height": np.int32,
            "width": np.int32,
            **{field: png for field in options.pair_fields},
        }
    )


def ingest(
    input_path: str,
    output: str,
    name: str,
    options: Options,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    shard_bytes: int = records.SHARD_BYTES,
) -> dict:
    """Runs the whole ingest; returns the dataset card (also written beside the dataset).

    The dataset is built in ``OUTPUT/.NAME.incomplete`` and moved to ``OUTPUT/NAME`` only once
    complete: a failed or interrupted run leaves nothing to clean up, and an existing dataset
    it would overwrite stays until the new one is ready."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):  # TFDS finds its files by such names
        raise IngestError(
            f"--name {name!r} must start with a lower-case letter and hold only a-z, 0-9 and _, "
            "e.g. 'thyroid_us'"
        )
    work_directory(output, "--output")  # a directory, or one that can be created
    target = os.path.join(output, name)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    items, ignored = list_items(input_path)
    for reason, count in Counter(reason for _, reason in ignored).items():
        example = next(path for path, r in ignored if r == reason)
        if reason == NOT_AN_IMAGE:
            reason += f" (by suffix: {' '.join(s for s in IMAGE_SUFFIXES if s)}; or preamble)"
        logging.warning("%d %s, e.g. %s", count, reason, example)
    if not items:
        raise IngestError(f"no image or DICOM file under {input_path}")
    check_pairs(input_path, items, options)
    organs = sorted({item.organ for item in items})
    for organ in organs:
        try:
            organ.encode("utf-8")
        except UnicodeEncodeError:  # a folder's name from a non-UTF-8 file system
            raise IngestError(
                f"organ folder {os.fsencode(organ)!r} is not a UTF-8 name: rename it (the "
                "name is the organ's label in the dataset)"
            ) from None
    reported = {path for path, _ in ignored}  # e.g. an unreadable folder: not called empty
    for group in _folders(input_path) - {*organs}:
        if os.path.join(input_path, group) in reported:
            continue
        logging.warning("folder %r holds no image or DICOM file: it is not in the dataset", group)
    by_case = Counter(organ.casefold() for organ in organs)
    for organ in sorted(o for o in organs if by_case[o.casefold()] > 1):
        logging.warning("organ %r differs from another only in case: they are two organs", organ)
    staging = os.path.join(output, f".{name}.incomplete")
    replaced = os.path.join(staging, "replaced")  # the dataset --overwrite replaces, briefly
    _put_back(replaced, target)  # a killed run's
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted run left
    try:
        # Fork (cheap, works from interactive sessions) before TFDS starts threads, unless JAX,
        # which is multithreaded and unsafe to fork, is loaded in this process (tests, notebooks).
        context = multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")
        processes = workers or os.cpu_count() or 1
        with context.Pool(processes, initializer=leave_ctrl_c_to_the_main_process) as pool:
            patients = pool.map(patient_key, items, chunksize=64)  # DICOM headers, in parallel
            splits = [assign_split(patient, options) for patient in patients]
            warn_about_splits(patients, splits, options)
            writer = Writer(items, splits, organs, options, pool)
            staged = os.path.join(staging, name, VERSION)
            os.makedirs(staged)
            dropped = _build(staged, name, writer, shard_bytes=shard_bytes)
        report = os.path.join(output, f"{name}_skipped_paths.csv")
        failed_report = os.path.join(output, f"{name}_skipped_paths_failed_run.csv")
        rows = [(s.path, s.reason) for s in writer.skipped]
        rows += ignored
        if len(dropped) == len(set(splits)):  # the report of a dataset kept stays as it is
            _write_csv(failed_report, [("path", "reason"), *rows])
            raise NoUsableImages(f"no usable image; the reasons are in {failed_report}")
        for split in dropped:
            copies = writer.files_all_duplicate[split]
            logging.warning(
                "split %r is left out: none of its files gave a new usable image (%d skipped, "
                "reasons in %s; %d held only images already in another split)", split,
                sum(s.split == split for s in writer.skipped), report, copies,
            )  # fmt: skip
        card = dataset_card(
            name, organs, options, writer, os.path.join(target, VERSION),
            ignored=len(ignored), left_out=dropped, report=os.path.abspath(report),
        )  # fmt: skip
        with open(os.path.join(staged, CARD), "w") as f:
            json.dump(portable_card(card), f, indent=2)
        # The dataset keeps path hashes only; the raw paths, for the user, stay in the report.
        hashed = [(salted_hash(s.key, options.salt), s.reason) for s in writer.skipped]
        _write_csv(os.path.join(staged, "skipped.csv"), [("path_hash", "reason"), *hashed])
        staged_report = os.path.join(staging, os.path.basename(report))  # beside, not inside
        _write_csv(staged_report, [("path", "reason"), *rows])
        if os.path.exists(target):  # replaced only now that the new dataset is complete, and
            os.replace(target, replaced)  # deleted only once the new one is in its place
        os.replace(os.path.join(staging, name), target)
        os.replace(staged_report, report)  # with its dataset, never before
        if os.path.exists(failed_report):  # an earlier failed run's: out of date
            os.remove(failed_report)
    finally:
        _put_back(replaced, target)  # stopped between the two moves
        shutil.rmtree(staging, ignore_errors=True)
    for organ in organs:
        if not any(card["images"][split].get(organ) for split in SPLITS):
            logging.warning("organ %r: none of its files gave a usable image", organ)
        elif card["images"]["train"] and not card["images"]["train"].get(organ):
            logging.warning(
                "organ %r has no image in train: all of its patients went to %s (too few "
                "patients to split; pre-training and fine-tuning will not see it)", organ,
                " and ".join(s for s in SPLITS if card["images"][s].get(organ)),
            )  # fmt: skip
    if options.masks and not set(card["mask_values"]) - {0, IGNORE}:
        logging.warning(
            "the masks hold only the values %s: 0 is background and %d 'ignore', so there is "
            "no class to learn", card["mask_values"], IGNORE,
        )  # fmt: skip
    return card


def _write_csv(path: str, rows: Sequence[Sequence[Any]]) -> None:
    """Writes ``rows`` (the header first) to the CSV file ``path``, in UTF-8; a file name that
    is not UTF-8 is written as its bytes on disk, as found."""
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        csv.writer(f).writerows(rows)


def _folders(input_path: str) -> set[str]:
    """The organ / class folders of a directory input (none for a manifest)."""
    if not os.path.isdir(input_path):
        return set()
    return {
        d for d in os.listdir(input_path)
        if not d.startswith(".") and os.path.isdir(os.path.join(input_path, d))
    }  # fmt: skip


def warn_about_splits(patients: Sequence[str], splits: Sequence[str], options: Options) -> None:
    """Warns of a split asked for that got no file (too few patients for its fraction), and of
    one patient holding most files (an export that writes one placeholder id for all)."""
    fractions = {"train": 1.0 - options.val_fraction - options.test_fraction,
                 "val": options.val_fraction, "test": options.test_fraction}  # fmt: skip
    files = Counter(splits)
    for split, fraction in fractions.items():
        if fraction > 0 and not files[split]:
            logging.warning(
                "split %r (fraction %.3g) gets no file: the %d file(s) come from %d patient(s), "
                "and a patient's files all go to one split", split, fraction, len(splits),
                len(set(patients)),
            )  # fmt: skip
    if options.val_fraction or options.test_fraction:
        count = Counter(patients).most_common(1)[0][1]
        if len(splits) >= 10 and count > len(splits) / 2:
            logging.warning(
                "one patient id holds %d of the %d files, all in one split: if the export "
                "anonymised every patient to one id, give the ids in a manifest (patient_id)",
                count, len(splits),
            )  # fmt: skip


def _put_back(replaced: str, target: str) -> None:
    """Moves the dataset an --overwrite set aside back, if no new one took its place."""
    if os.path.exists(replaced) and not os.path.exists(target):
        os.replace(replaced, target)


def _build(
    directory: str,
    name: str,
    writer: Writer,
    *,
    shard_bytes: int,
) -> list[str]:
    """Writes the dataset's shards into ``directory`` as the files are read, then its metadata
    if any split got an image; returns the splits left out (every file of theirs skipped)."""
    structure = features(writer.organs, writer.options)
    encode = records.Encoder(structure)
    written, dropped = [], []
    # val and test first: an image found in an evaluation split and in train (exact copies
    # under two patients) stays where it is evaluated, and train drops its copy
    for split in ("val", "test", "train"):
        if split not in writer.splits:
            continue
        with records.SplitWriter(directory, name, split, shard_bytes) as shards:
            for example in writer.examples(split):
                shards.write(encode(example))
        if shards.info is None:
            dropped.append(split)
        else:
            written.append(shards.info)
    if written:
        records.write_metadata(directory, structure, written, DESCRIPTION, VERSION)
    return dropped


def dataset_card(
    name: str,
    organs: Sequence[str],
    options: Options,
    writer: Writer,
    data_dir: str,
    *,
    ignored: int,
    left_out: Sequence[str],
    report: str,
) -> dict:
    """What the dataset holds and how it was made; the pipeline reads organ ranges from here.
    ``ignored`` files were neither images nor DICOM; the ``left_out`` splits got no image;
    ``report`` lists the skipped and ignored files by path."""
    ranges = {}
    for split in SPLITS:
        start, ranges[split] = 0, {}
        for organ in organs:
            count = writer.counts[split][organ]
            if count:
                ranges[split][organ] = [start, start + count]
            start += count
    reasons = Counter(s.reason.split(":")[0] for s in writer.skipped)
    return {
        "name": name,
        "version": VERSION,
        "data_dir": data_dir,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "organs": list(organs),
        "images": {split: dict(writer.counts[split]) for split in SPLITS},
        "organ_ranges": ranges,
        "files": {
            "listed": len(writer.items),
            "used": dict(writer.files_used),
            "skipped": len(writer.skipped),
            "all_frames_duplicate": sum(writer.files_all_duplicate.values()),
            "ignored": ignored,
        },
        "splits_left_out": list(left_out),
        "skipped_paths_report": report,
        "skipped_reasons": dict(reasons),
        "duplicates_removed": sum(writer.duplicates.values()),
        "fields": list(options.pair_fields),  # paired images besides "image"
        "mask_values": sorted(writer.mask_values),  # class ids seen in the masks
        "options": {
            k: bool(v) if k in ("masks", "targets") else v  # no local paths in the dataset
            for k, v in dataclasses.asdict(options).items()
            if k != "salt"
        },
    }


def portable_card(card: dict) -> dict:
    """The card as written beside the dataset: no absolute path (it would be wrong once the
    dataset is copied elsewhere, and names the ingesting machine's directories); the report's
    path is relative to the dataset's directory."""
    written = {k: v for k, v in card.items() if k != "data_dir"}
    written["skipped_paths_report"] = os.path.relpath(
        card["skipped_paths_report"], card["data_dir"]
    )
    return written


def define_flags() -> None:
    """The command line (defined only when run as a program: others import this module)."""
    flags.DEFINE_string("input", None, "Directory (first level = organ) or CSV manifest.")
    flags.DEFINE_string("output", None, "TFDS data directory to write into.")
    flags.DEFINE_string("name", None, "Dataset name (lower-case identifier).")
    flags.DEFINE_integer("resize", 256, "Shorter side in pixels (0: keep).")
    flags.DEFINE_integer("frame_stride", 1, "Keep every n-th frame of a cine loop.")
    flags.DEFINE_integer("max_frames", 16, "At most this many frames per loop (0: every frame).")
    flags.DEFINE_enum("crop", "auto", readers.CROP_MODES, "Scan-region crop.")
    flags.DEFINE_float("val_fraction", 0.0, "Fraction of patients in the val split.")
    flags.DEFINE_float("test_fraction", 0.0, "Fraction of patients in the test split.")
    flags.DEFINE_string(
        "masks", "", "Segmentation masks (PNG class ids), paired by relative path and file stem."
    )
    flags.DEFINE_string(
        "targets", "", "Clean target images (enhancement pairs), paired like --masks."
    )
    flags.DEFINE_string("salt", None, "Secret for the id hashes (default: $USFM_SALT or '').")
    flags.DEFINE_integer(
        "png_compression", 6, "PNG zlib level 0-9: 0 decodes ~2x faster, ~3x larger files."
    )
    flags.DEFINE_integer("workers", None, "Worker processes (default: all cores).", lower_bound=1)
    flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of this name.")
    flags.mark_flags_as_required(["input", "output", "name"])


def main(argv: list[str]) -> None:
    del argv  # parse_flags refuses positional arguments
    f = flags.FLAGS
    try:
        options = Options(
            resize=f.resize,
            frame_stride=f.frame_stride,
            max_frames=f.max_frames or None,
            crop=f.crop,
            val_fraction=f.val_fraction,
            test_fraction=f.test_fraction,
            masks=f.masks,
            targets=f.targets,
            png_compression=f.png_compression,
            salt=f.salt if f.salt is not None else os.environ.get("USFM_SALT", ""),
        )
        if not options.salt:
            logging.warning(
                "no --salt / $USFM_SALT: id hashes are unsalted (guessable for short ids)"
            )
        tfds.disable_progress_bar()  # the per-split bars of this module say more
        card = ingest(f.input, f.output, f.name, options, workers=f.workers,
                      overwrite=f.overwrite)  # fmt: skip
    except (IngestError, FileExistsError, NoUsableImages, PathError, records.WriteError) as e:
        sys.exit(f"error: {e}")
    keys = ("data_dir", "images", "files", "skipped_reasons", "splits_left_out")
    print(json.dumps({k: card[k] for k in keys}, indent=2))
    if card["files"]["skipped"] or card["files"]["ignored"]:
        print(f"skipped and ignored files, with reasons: {card['skipped_paths_report']}")


if __name__ == "__main__":
    define_flags()
    run_program(main, lambda: "no dataset was written or replaced (one is, only once complete)")
