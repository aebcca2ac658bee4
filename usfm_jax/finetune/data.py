"""Labelled data of the downstream tasks: fixed splits, label-fraction subsets, grain streams.

Two sources, one format of example (uint8 images, like pre-training's):

* ``synthetic``: breast lesion cases from the embedded generator
  (``usfm_jax.data.synthetic.generate_lesion_case``): benign-like vs malignant-like lesions for
  ``classify``, the lesion mask for ``segment``, speckled vs speckle-free images for
  ``enhance``. Split ``s`` holds a fixed range of case indices of ``config.data.seed``, so the
  validation and test sets never depend on the run's seed or label fraction.
* ``tfds``: a dataset written by ``python -m usfm_jax.data.ingest`` with train / val / test
  splits. Classification reads the class from the first-level folder (the ``organ`` field of
  the ingest); segmentation reads ``mask`` (ingested with ``--masks``); enhancement reads
  ``target`` (``--targets``: noisy-clean pairs) or, without it, synthesises the noisy input
  from the clean image (``config.data.degradation``).

Examples: ``image`` uint8 [H, W, 1] plus ``label`` int32 [] (classify), ``mask`` uint8 [H, W]
(segment: class ids, 255 = ignore) or ``target`` uint8 [H, W, 1] (enhance).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
from collections.abc import Mapping
from typing import Any

import cv2
import grain
import ml_collections
import numpy as np
from absl import logging

from usfm_jax.data import pipeline, synthetic
from usfm_jax.data.augment import resize_whole
from usfm_jax.data.layout import IGNORE, SPLITS

TASKS = ("classify", "segment", "enhance")
DEGRADATIONS = ("none", "speckle", "gaussian", "downsample")
# each kind's level when config.data.degradation_level is 0: fully developed speckle, noise of
# std 0.1 on [0, 1] intensities, x2 super-resolution
DEFAULT_LEVELS = {"speckle": 1.0, "gaussian": 0.1, "downsample": 2.0}
SPECKLE_RANGE_DB = 50.0  # dynamic range of the display that synthesised speckle assumes
TARGET_KEY = {"classify": "label", "segment": "mask", "enhance": "target"}


@dataclasses.dataclass(frozen=True)
class TaskData:
    """The splits of a task (examples in a fixed order) and what stratified subsets need."""

    splits: Mapping[str, grain.MapDataset]
    groups: Mapping[str, np.ndarray]  # train: stratum (class or organ) -> record indices
    classes: tuple[str, ...]  # classify: class names; segment: background + foregrounds


def label_subset(groups: Mapping[str, np.ndarray], fraction: float, seed: int) -> np.ndarray:
    """A stratified, seeded subset of the training records (sorted indices): ``fraction`` of
    each stratum, rounded, at least one record per stratum. Nested in the fraction for a fixed
    seed: the 5% subset is part of the 20% subset, which is part of the whole."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"config.label_fraction={fraction}: expected a value in (0, 1]")
    chosen = []
    for i, name in enumerate(sorted(groups)):
        members = np.asarray(groups[name])
        if not len(members):
            continue
        order = np.random.default_rng([seed, i]).permutation(len(members))
        keep = max(1, round(fraction * len(members)))
        chosen.append(members[order[:keep]])
    return np.sort(np.concatenate(chosen))


class Subset:
    """The records ``indices`` of a random-access dataset, as a grain source."""

    def __init__(self, ds: grain.MapDataset, indices: np.ndarray):
        self.ds, self.indices = ds, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.ds[int(self.indices[index])]


# ----------------------------------------------------------------------------------- sources


class SyntheticLesions:
    """Lesion cases ``start .. start + count - 1`` of ``seed`` as examples of ``task``: a
    grain random-access source, rendered on demand."""

    def __init__(self, task: str, start: int, count: int, image_size: tuple[int, int], seed: int):
        self.task, self.start, self.count = task, start, count
        self.image_size, self.seed = tuple(image_size), seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = operator.index(index)
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} cases")
        case = synthetic.generate_lesion_case(self.seed, self.start + index, self.image_size)
        example = {"image": case["image"][..., None]}
        if self.task == "classify":
            example["label"] = np.int32(case["label"])
        elif self.task == "segment":
            example["mask"] = case["lesion_mask"].astype(np.uint8)
        else:
            example["target"] = case["clean"][..., None]
        return example


def synthetic_task(config: ml_collections.ConfigDict) -> TaskData:
    cfg = config.data
    sizes = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
    starts = np.cumsum([0, *sizes.values()])
    splits = {
        split: grain.MapDataset.source(
            SyntheticLesions(config.task, int(start), n, config.image_size, cfg.seed)
        )
        for (split, n), start in zip(sizes.items(), starts, strict=False)
    }
    indices = np.arange(cfg.num_train)
    if config.task == "classify":
        labels = np.array([synthetic.lesion_class(cfg.seed, i) for i in indices])
        names = synthetic.LESION_CLASSES
        groups = {names[c]: indices[labels == c] for c in range(len(names))}
        return TaskData(splits, groups, names)
    classes = ("background", "lesion") if config.task == "segment" else ()
    return TaskData(splits, {"all": indices}, classes)


def _decode(record: dict[str, Any], task: str, image_size: tuple[int, int]) -> dict[str, Any]:
    """An ingested record -> an example at ``image_size``: the whole frame resized as in
    pre-training (area averaging when shrinking, bilinear when enlarging), a mask by its
    nearest pixel centre, so that class ids stay class ids and the mask stays on its image."""
    image = resize_whole(pipeline.decode_image(record["image"]), image_size)
    example = {"image": image[..., None]}
    if task == "classify":
        example["label"] = np.int32(record["organ"])
    elif task == "segment":
        mask = pipeline.decode_image(record["mask"])[..., 0]
        size = (image_size[1], image_size[0])  # OpenCV: (width, height)
        # NEAREST_EXACT samples pixel centres, as the image's resize; NEAREST takes each
        # output pixel's top-left source pixel, shifting the mask by up to half a pixel
        example["mask"] = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST_EXACT)
    elif "target" in record:
        target = pipeline.decode_image(record["target"])
        example["target"] = resize_whole(target, image_size)[..., None]
    else:
        example["target"] = example["image"]  # clean: the input is degraded on the fly
    return example


def tfds_task(config: ml_collections.ConfigDict) -> TaskData:
    cfg = config.data
    card = pipeline.read_card(cfg.tfds_dir)
    missing = [s for s in SPLITS if not card["organ_ranges"].get(s)]
    if missing:
        raise ValueError(
            f"config.data.tfds_dir={cfg.tfds_dir!r} has no {missing} split(s): ingest it with "
            "--val_fraction and --test_fraction"
        )
    pipeline.check_shards(cfg.tfds_dir, SPLITS)
    decode = functools.partial(_decode, task=config.task, image_size=tuple(config.image_size))
    splits = {}
    for split in SPLITS:
        split_cfg = ml_collections.ConfigDict({"tfds_dir": cfg.tfds_dir, "split": split})
        splits[split] = pipeline.split_source(split_cfg).map(decode)
    groups = {
        organ: np.arange(start, end)
        for organ, (start, end) in card["organ_ranges"]["train"].items()
    }
    if config.task == "classify":
        classes = tuple(card["organs"])
        for split in ("val", "test"):
            absent = [c for c in classes if c not in card["organ_ranges"][split]]
            if absent:
                logging.warning(
                    "classes %s have no image in the %s split: its AUC is undefined (NaN), "
                    "and the other scores leave them out",
                    absent, split,
                )  # fmt: skip
    elif config.task == "segment":
        top = max([v for v in card.get("mask_values", []) if v != IGNORE], default=1)
        classes = ("background", *(f"class_{v}" for v in range(1, top + 1)))
    else:
        classes = ()
    return TaskData(splits, groups, classes)


def load_task(config: ml_collections.ConfigDict) -> TaskData:
    """The task's splits and strata from ``config.data.source`` (synthetic or tfds)."""
    if config.data.source == "synthetic":
        return synthetic_task(config)
    if config.data.source == "tfds":
        return tfds_task(config)
    raise ValueError(f"config.data.source={config.data.source!r}: expected synthetic or tfds")


# ----------------------------------------------------------------------------- transforms


def degrade(image: np.ndarray, rng: np.random.Generator, kind: str, level: float) -> np.ndarray:
    """A noisy version of a clean uint8 image [H, W, 1] for enhancement training:

    * ``speckle``: multiplicative speckle in the intensity domain, the display value taken as
      log-compressed over ``SPECKLE_RANGE_DB``: intensity times ``1 - level + level * s`` with
      ``s`` exponential of mean 1 (``level`` 1: fully developed speckle);
    * ``gaussian``: additive Gaussian noise of std ``level`` (on [0, 1] intensities);
    * ``downsample``: area-downsampled by the factor ``level`` and bicubic-upsampled back
      (super-resolution).
    """
    x = image[..., 0].astype(np.float32) / 255.0
    if kind == "speckle":
        k = SPECKLE_RANGE_DB * np.log(10.0) / 10.0  # nepers of intensity per display unit
        speckle = rng.exponential(size=x.shape).astype(np.float32)
        mix = (1.0 - level) + level * speckle
        x = x + np.log(np.maximum(mix, 1e-6)) / k
    elif kind == "gaussian":
        x = x + rng.normal(0.0, level, size=x.shape).astype(np.float32)
    elif kind == "downsample":
        h, w = x.shape
        small = (max(1, round(w / level)), max(1, round(h / level)))
        x = cv2.resize(x, small, interpolation=cv2.INTER_AREA)
        x = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)
    else:
        raise ValueError(f"config.data.degradation={kind!r}: expected one of {DEGRADATIONS}")
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)[..., None]


class TrainTransform(grain.transforms.RandomMap):
    """Training-time randomness: the synthesised noisy input (enhancement from clean images)
    and a horizontal flip applied alike to the image and its mask / target."""

    def __init__(self, hflip: float, degradation: str = "none", level: float = 0.0):
        self.hflip, self.degradation, self.level = hflip, degradation, level

    def random_map(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        example = dict(example)
        if self.degradation != "none":
            example["image"] = degrade(example["target"], rng, self.degradation, self.level)
        if rng.random() < self.hflip:
            for key in ("image", "mask", "target"):
                if key in example:
                    example[key] = np.ascontiguousarray(example[key][:, ::-1])
        return example


def fixed_degradation(
    ds: grain.MapDataset, degradation: str, level: float, seed: int, split: str
) -> grain.MapDataset:
    """Evaluation splits with synthesised noisy inputs: one fixed draw per record, another
    for each split (val and test are independent draws, as their images are)."""
    if degradation == "none":
        return ds
    stream = SPLITS.index(split)

    def noisy(index: int, example: dict[str, Any]) -> dict[str, Any]:
        rng = np.random.default_rng([seed, stream, index])
        return {**example, "image": degrade(example["target"], rng, degradation, level)}

    return ds.map_with_index(noisy)


def train_stream(config: ml_collections.ConfigDict, data: TaskData) -> grain.MapDataset:
    """The endless stream of training examples: the label-fraction subset, reshuffled every
    epoch, with the random transforms."""
    subset = label_subset(data.groups, config.label_fraction, config.seed)
    cfg = config.data
    return (
        grain.MapDataset.source(Subset(data.splits["train"], subset))
        .seed(config.seed)
        .shuffle()
        .repeat()
        .random_map(TrainTransform(cfg.hflip, cfg.degradation, degradation_level(cfg)))
    )


def eval_split(config: ml_collections.ConfigDict, data: TaskData, split: str) -> grain.MapDataset:
    """A validation / test split as evaluated: fixed order, fixed synthetic degradation."""
    cfg = config.data
    level = degradation_level(cfg)
    return fixed_degradation(data.splits[split], cfg.degradation, level, cfg.seed, split)


def degradation_level(cfg: ml_collections.ConfigDict) -> float:
    """``cfg.degradation_level``, or the kind's default (``DEFAULT_LEVELS``) when it is 0."""
    return cfg.degradation_level or DEFAULT_LEVELS.get(cfg.degradation, 0.0)


def write_synthetic_files(task: str, out: str, num: int, image_size: int, seed: int = 0) -> str:
    """Writes ``num`` synthetic lesion cases as files in the layout ``usfm_jax.data.ingest``
    reads (for trying the file path of a task): ``out/benign|malignant/*.png`` (classify),
    ``out/images`` + ``out/masks`` (segment), ``out/noisy`` + ``out/clean`` (enhance).
    Returns the directory to pass as ``--input``."""
    import PIL.Image

    folders = {"classify": ("",), "segment": ("images", "masks"), "enhance": ("noisy", "clean")}
    for i in range(num):
        case = synthetic.generate_lesion_case(seed, i, image_size)
        name = f"case_{i:05d}.png"
        if task == "classify":
            files = {os.path.join(synthetic.LESION_CLASSES[case["label"]], name): case["image"]}
        elif task == "segment":
            mask = case["lesion_mask"].astype(np.uint8)
            files = {os.path.join("images", name): case["image"], os.path.join("masks", name): mask}
        else:
            files = {os.path.join("noisy", name): case["image"],
                     os.path.join("clean", name): case["clean"]}  # fmt: skip
        for relative, array in files.items():
            path = os.path.join(out, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            PIL.Image.fromarray(array).save(path)
    return os.path.join(out, folders[task][0]) if folders[task][0] else out
