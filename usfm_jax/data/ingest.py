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
``--crop none`` and single-frame images, and an input without its pair is skipped and reported.

Every frame becomes a single-channel uint8 PNG (``readers.read_image_file``: colour to gray,
windowing, scan-region crop; then the shorter side resized). Exact duplicates (same pixels) are
kept once. No names or free text are stored: paths and patient / study ids only as salted SHA-256
hashes. Patients are split between train, val and test as a whole (a hash of the patient
decides).

Output, in ``DATA_DIR/NAME/1.0.0``: the TFDS dataset (readable without TensorFlow through
``tfds.builder_from_directory(...).as_data_source(split)``), records grouped by organ in each
split; ``dataset_card.json`` (per-organ counts and index ranges per split, options, what was
skipped and why) and ``skipped.csv`` (path hash, reason) beside it. The raw paths of the skipped
files, for the user to act on, go to ``DATA_DIR/NAME_skipped_paths.csv``, outside the dataset.
Files run in parallel over the cores; a file that cannot be read is skipped and reported, never
fatal. Exit status 0 unless no usable image was found. Pixels are not scrubbed: text burned into
an image (outside the scan region when cropping) stays.
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
import shutil
import sys
import types
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import PIL.Image
import pydicom
import tensorflow_datasets as tfds
import tqdm
from absl import app, flags, logging

from usfm_jax.data import readers

VERSION = "1.0.0"
SPLITS = ("train", "val", "test")
FLAT_GROUP = "all"  # the organ / class of the files of a flat input folder
IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", "")
MANIFEST_COLUMNS = ("path", "organ", "patient_id", "study_id", "device", "center")


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
        if self.resize < 0:
            raise ValueError(f"--resize must be >= 0, got {self.resize}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0 - self.val_fraction:
            raise ValueError(
                f"--test_fraction must be in [0, 1 - val_fraction), got {self.test_fraction}"
            )
        for name in ("masks", "targets"):
            directory = getattr(self, name)
            if directory and not os.path.isdir(directory):
                raise ValueError(f"--{name} {directory!r} is not a directory")
            if directory and self.crop != "none":
                raise ValueError(
                    f"--{name} needs --crop none: pairs must stay aligned pixel for pixel"
                )
        if not 0 <= self.png_compression <= 9:
            raise ValueError(f"--png_compression must be in [0, 9], got {self.png_compression}")


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


class NoUsableImages(RuntimeError):
    """Nothing (or nothing for one split) could be read: see the skipped-files report."""


def salted_hash(value: str, salt: str) -> str:
    """A pseudonym: the first 16 hex digits of SHA-256(salt, value)."""
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16]


def list_items(input_path: str) -> list[Item]:
    """Items from a directory tree (first level = organ) or a CSV manifest, in a stable order."""
    if os.path.isdir(input_path):
        top = [f for f in sorted(os.listdir(input_path)) if _is_image_name(input_path, f)]
        groups = [d for d in os.listdir(input_path) if os.path.isdir(os.path.join(input_path, d))]
        if top and groups:
            raise ValueError(
                f"--input {input_path!r} holds both files and folders: put the files in "
                "folders (one per organ or class) or list them in a CSV manifest"
            )
        if top:  # a flat folder: one group
            return [Item(os.path.join(input_path, f), FLAT_GROUP, f) for f in top]
        items = []
        for organ in sorted(os.listdir(input_path)):
            top = os.path.join(input_path, organ)
            if not os.path.isdir(top):
                continue
            for root, dirs, files in os.walk(top):
                dirs.sort()
                items.extend(
                    Item(
                        os.path.join(root, f),
                        organ,
                        os.path.relpath(os.path.join(root, f), input_path),
                    )
                    for f in sorted(files)
                    if _is_image_name(root, f)
                )
        return items
    if os.path.isfile(input_path) and input_path.lower().endswith(".csv"):
        return _read_manifest(input_path)
    raise ValueError(f"--input {input_path!r} is neither a directory nor a .csv manifest")


def _is_image_name(directory: str, name: str) -> bool:
    path = os.path.join(directory, name)
    suffix = os.path.splitext(name)[1].lower()
    return suffix in IMAGE_SUFFIXES and not name.startswith(".") and os.path.isfile(path)


def paired_path(directory: str, key: str) -> str | None:
    """The file of ``directory`` paired with the item ``key`` (its path relative to the input):
    same relative folder and stem, PNG first, then any image suffix."""
    stem = os.path.join(directory, os.path.splitext(key)[0])
    for suffix in (".png", *IMAGE_SUFFIXES):
        if suffix and os.path.isfile(stem + suffix):
            return stem + suffix
    return None


def _read_mask(path: str, shape: tuple[int, int], size: int) -> np.ndarray:
    """A label mask (PNG of integer class ids, one channel) for a frame of ``shape`` before
    resizing; resized like the frame (shorter side ``size``), nearest neighbour."""
    with PIL.Image.open(path) as image:
        if image.mode not in ("L", "P", "I", "I;16"):
            raise readers.UnreadableError(
                f"mask {os.path.basename(path)} has mode {image.mode}: expected one channel "
                "of integer class ids"
            )
        mask = np.asarray(image)
    if mask.shape != shape:
        raise readers.UnreadableError(f"mask shape {mask.shape} differs from the image {shape}")
    if mask.max(initial=0) > 255:
        raise readers.UnreadableError(f"mask values up to {mask.max()}: expected <= 255")
    mask = mask.astype(np.uint8)
    if size:
        h, w = readers.resize_shorter_side(np.zeros(shape, np.uint8), size).shape
        mask = np.asarray(PIL.Image.fromarray(mask).resize((w, h), PIL.Image.NEAREST))
    return mask


def _read_manifest(path: str) -> list[Item]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "organ"} <= set(rows[0]):
        raise ValueError(f"manifest {path} needs a header with at least 'path' and 'organ' columns")
    items = []
    for line, row in enumerate(rows, start=2):
        row = {k: (v or "").strip() for k, v in row.items() if k}
        if not row["path"] or not row["organ"]:
            raise ValueError(f"manifest {path}, line {line}: empty path or organ")
        extra = {k: (row.get(k) or None) for k in MANIFEST_COLUMNS[2:]}
        items.append(Item(os.path.join(base, row["path"]), row["organ"], row["path"], **extra))
    return items


def patient_key(item: Item) -> str:
    """The identity that keeps a patient's images in one split: the manifest's patient id, else
    the DICOM PatientID (header only), else the file itself."""
    if item.patient_id:
        return item.patient_id
    try:
        ds = pydicom.dcmread(
            item.path, stop_before_pixels=True, specific_tags=["PatientID"], force=True
        )  # force: like the reader, accept DICOM files without the preamble
        patient = str(ds.get("PatientID") or "").strip()
        if patient:
            return patient
    except Exception:  # not DICOM, or unreadable: the reader reports it later
        pass
    return f"file:{item.key}"


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
        shape = image.frames[0].shape
        if name == "masks":
            pair = _read_mask(path, shape, options.resize)
            pairs["mask_values"] = tuple(int(v) for v in np.unique(pair))
        else:
            pair = readers.read_image_file(path, max_frames=1, crop="none").frames[0]
            if pair.shape != shape:
                raise readers.UnreadableError(
                    f"target shape {pair.shape} differs from the image {shape}"
                )
            if options.resize:
                pair = readers.resize_shorter_side(pair, options.resize)
        pairs[name[:-1]] = _png(pair, options.png_compression)
    return pairs


class Writer:
    """Streams the worker pool's results into TFDS split generators, counting as it goes."""

    def __init__(self, items: Sequence[Item], splits: Sequence[str], organs: Sequence[str],
                 options: Options, pool: multiprocessing.pool.Pool):  # fmt: skip
        self.items, self.splits, self.organs = items, splits, organs
        self.options, self.pool = options, pool
        self.seen_hashes: set[str] = set()
        self.skipped: list[tuple[str, str, str]] = []  # (key, path, reason)
        self.duplicates = 0
        self.counts = {split: Counter() for split in SPLITS}
        self.files_used = Counter()
        self.files_all_duplicate = 0  # read fine, but every frame was already in the dataset
        self.mask_values: set[int] = set()

    def examples(self, split: str) -> Iterator[tuple[str, dict]]:
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
        for (index, item), (records, error) in bar:
            if error is not None:
                self.skipped.append((item.key, item.path, error.replace(item.path, "<file>")))
                continue
            used = False
            for record in records:
                if record["content_hash"] in self.seen_hashes:
                    self.duplicates += 1
                    continue
                self.seen_hashes.add(record["content_hash"])
                self.mask_values.update(record.pop("mask_values", ()))
                self.counts[split][item.organ] += 1
                used = True
                yield f"{index:09d}-{record['frame']:05d}", {**record, "organ": item.organ}
            self.files_used[split] += used
            self.files_all_duplicate += not used


def _builder_class(name: str, organs: Sequence[str], writer: Writer) -> type:
    """A TFDS builder class named ``name`` whose splits stream from ``writer``."""

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Ultrasound images ingested by usfm_jax.data.ingest.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
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
                    **{
                        field: tfds.features.Image(shape=(None, None, 1), encoding_format="png")
                        for field in writer.options.pair_fields
                    },
                }
            ),
            disable_shuffling=True,  # keep records grouped by organ
        )

    def _split_generators(self, dl_manager):
        return {split: writer.examples(split) for split in SPLITS if split in writer.splits}

    def _generate_examples(self):  # unused: the split generators above are the examples
        raise NotImplementedError

    namespace = {
        "name": name,
        "VERSION": tfds.core.Version(VERSION),
        "_info": _info,
        "_split_generators": _split_generators,
        "_generate_examples": _generate_examples,
    }
    return types.new_class(
        f"Ingest_{name}",
        (tfds.core.GeneratorBasedBuilder,),
        {"skip_registration": True},
        lambda ns: ns.update(namespace),
    )


def ingest(
    input_path: str,
    output: str,
    name: str,
    options: Options,
    *,
    workers: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Runs the whole ingest; returns the dataset card (also written beside the dataset)."""
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"--name {name!r} must be a lower-case identifier, e.g. 'thyroid_us'")
    target = os.path.join(output, name)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    items = list_items(input_path)
    if not items:
        raise ValueError(f"no candidate files under {input_path}")
    if os.path.exists(target):  # only once the new input is known to hold candidates
        shutil.rmtree(target)
    organs = sorted({item.organ for item in items})
    # Fork (cheap, works from interactive sessions) before TFDS starts threads, unless JAX, which
    # is multithreaded and unsafe to fork, is loaded in this process (tests, notebooks).
    context = multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")
    with context.Pool(workers or os.cpu_count() or 1) as pool:
        patients = pool.map(patient_key, items, chunksize=64)  # DICOM headers, in parallel
        splits = [assign_split(patient, options) for patient in patients]
        writer = Writer(items, splits, organs, options, pool)
        builder = _builder_class(name, organs, writer)(data_dir=output, file_format="array_record")
        try:
            builder.download_and_prepare()
            failure = None
        except AssertionError:  # TFDS refuses a split that received no example
            empty = [split for split in set(splits) if not sum(writer.counts[split].values())]
            if not empty:
                raise
            failure = f"no usable image in split(s) {sorted(empty)}"
    data_dir = os.path.join(output, name, VERSION)
    os.makedirs(data_dir, exist_ok=True)
    card = dataset_card(name, organs, options, writer, data_dir)
    with open(os.path.join(data_dir, "dataset_card.json"), "w") as f:
        json.dump(card, f, indent=2)
    # The dataset keeps path hashes only; the raw paths, for the user to act on, stay outside it.
    hashed = [(salted_hash(key, options.salt), reason) for key, _, reason in writer.skipped]
    with open(os.path.join(data_dir, "skipped.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("path_hash", "reason"), *hashed])
    report = os.path.join(output, f"{name}_skipped_paths.csv")
    with open(report, "w", newline="") as f:
        csv.writer(f).writerows([("path", "reason"), *((p, r) for _, p, r in writer.skipped)])
    if failure:
        raise NoUsableImages(f"{failure}; the reasons are in {report}")
    return card


def dataset_card(
    name: str,
    organs: Sequence[str],
    options: Options,
    writer: Writer,
    data_dir: str,
) -> dict:
    """What the dataset holds and how it was made; the pipeline reads organ ranges from here."""
    ranges = {}
    for split in SPLITS:
        start, ranges[split] = 0, {}
        for organ in organs:
            count = writer.counts[split][organ]
            if count:
                ranges[split][organ] = [start, start + count]
            start += count
    reasons = Counter(reason.split(":")[0] for _, _, reason in writer.skipped)
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
            "all_frames_duplicate": writer.files_all_duplicate,
        },
        "skipped_reasons": dict(reasons),
        "duplicates_removed": writer.duplicates,
        "fields": list(options.pair_fields),  # paired images besides "image"
        "mask_values": sorted(writer.mask_values),  # class ids seen in the masks
        "options": {
            k: bool(v) if k in ("masks", "targets") else v  # no local paths in the dataset
            for k, v in dataclasses.asdict(options).items()
            if k != "salt"
        },
    }


_INPUT = flags.DEFINE_string("input", None, "Directory (first level = organ) or CSV manifest.")
_OUTPUT = flags.DEFINE_string("output", None, "TFDS data directory to write into.")
_NAME = flags.DEFINE_string("name", None, "Dataset name (lower-case identifier).")
_RESIZE = flags.DEFINE_integer("resize", 256, "Shorter side in pixels (0: keep).")
_STRIDE = flags.DEFINE_integer("frame_stride", 1, "Keep every n-th frame of a cine loop.")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 16, "At most this many frames per loop.")
_CROP = flags.DEFINE_enum("crop", "auto", ["auto", "regions", "bbox", "none"], "Scan-region crop.")
_VAL = flags.DEFINE_float("val_fraction", 0.0, "Fraction of patients in the val split.")
_TEST = flags.DEFINE_float("test_fraction", 0.0, "Fraction of patients in the test split.")
_MASKS = flags.DEFINE_string(
    "masks", "", "Segmentation masks (PNG class ids), paired by relative path and file stem."
)
_TARGETS = flags.DEFINE_string(
    "targets", "", "Clean target images (enhancement pairs), paired like --masks."
)
_SALT = flags.DEFINE_string("salt", None, "Secret for the id hashes (default: $USFM_SALT or '').")
_PNG = flags.DEFINE_integer(
    "png_compression", 6, "PNG zlib level 0-9: 0 decodes ~2x faster, ~3x larger files."
)
_WORKERS = flags.DEFINE_integer("workers", None, "Worker processes (default: all cores).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of this name.")


def main(argv: list[str]) -> None:
    del argv
    options = Options(
        resize=_RESIZE.value,
        frame_stride=_STRIDE.value,
        max_frames=_MAX_FRAMES.value or None,
        crop=_CROP.value,
        val_fraction=_VAL.value,
        test_fraction=_TEST.value,
        masks=_MASKS.value,
        targets=_TARGETS.value,
        png_compression=_PNG.value,
        salt=_SALT.value if _SALT.value is not None else os.environ.get("USFM_SALT", ""),
    )
    if not options.salt:
        logging.warning("no --salt / $USFM_SALT: id hashes are unsalted (guessable for short ids)")
    try:
        card = ingest(_INPUT.value, _OUTPUT.value, _NAME.value, options,
                      workers=_WORKERS.value, overwrite=_OVERWRITE.value)  # fmt: skip
    except (ValueError, FileExistsError, NoUsableImages) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({k: card[k] for k in ("images", "files", "skipped_reasons")}, indent=2))


if __name__ == "__main__":
    flags.mark_flags_as_required(["input", "output", "name"])
    app.run(main)
