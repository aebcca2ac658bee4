"""grain input pipeline of pre-training.

    synthetic: generated images -> per-epoch shuffle
    tfds:      one source per organ (slices of an ingested dataset) -> organ mix (balanced, ...)
               -> augment (random resized crop, flip, gamma / contrast)
    then:      batch -> this process's block -> threads (+ optional worker processes) prefetch

Element i of the stream is a pure function of (seed, i), so every process reads a disjoint,
deterministic block of each global batch, the global batches do not depend on the number of
processes, and the iterator's state (``get_state`` / ``set_state``, or grain's orbax checkpoint
handler) resumes on the exact next batch. ``global_batch`` assembles the blocks into one
``jax.Array`` on the mesh.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from usfm_jax import parallel
from usfm_jax.cli import leave_ctrl_c_to_the_main_process
from usfm_jax.data.augment import Augment, AugmentConfig
from usfm_jax.data.layout import CARD
from usfm_jax.data.mixing import mix_organs, organ_weights
from usfm_jax.data.synthetic import SyntheticUltrasound
from usfm_jax.paths import as_path

CACHE_ARRAY = "targets.npy"  # in a teacher-target cache directory (usfm_jax.teacher_cache)


def cache_array(directory: str) -> str:
    """The array file of a teacher-target cache directory."""
    return os.path.join(directory, CACHE_ARRAY)


SOURCES = ("synthetic", "tfds")


def parse_organ_weights(text: str) -> dict[str, float] | None:
    """``"liver=2,kidney=1"`` -> {"liver": 2.0, "kidney": 1.0}; empty -> None."""
    if not text:
        return None
    weights = {}
    for item in text.split(","):
        organ, sep, value = (part.strip() for part in item.partition("="))
        try:
            weight = float(value)
        except ValueError:
            sep = ""
        if not sep or not organ:
            raise ValueError(
                f"config.data.organ_weights: expected 'organ=weight,...', got {item!r}"
            )
        if organ in weights:
            raise ValueError(f"config.data.organ_weights: {organ!r} is given twice")
        weights[organ] = weight
    return weights


def read_card(tfds_dir: str) -> dict[str, Any]:
    """The dataset card written by ``usfm_jax.data.ingest`` next to the TFDS files."""
    path = as_path(tfds_dir) / CARD  # local or gs://
    if not path.is_file():
        raise FileNotFoundError(
            f"config.data.tfds_dir={tfds_dir!r}: no {CARD} there; point it at the versioned "
            "directory written by `python -m usfm_jax.data.ingest` (DATA_DIR/NAME/1.0.0)"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{path}: not a dataset card ({e}); re-run the ingest") from None


def check_shards(tfds_dir: str, splits: Sequence[str]) -> None:
    """Every record file of ``splits`` of an ingested dataset is there, readable and holds the
    records its dataset_info.json counts: a missing or cut file is an error before training,
    not at the first batch (or, for a fine-tuning's val split, at the first evaluation)."""
    import tensorflow_datasets as tfds  # imported here: slow, and only this source needs it
    from array_record.python.array_record_module import ArrayRecordReader

    builder = tfds.builder_from_directory(tfds_dir)
    for split in splits:
        info = builder.info.splits[split]
        for path, count in zip(info.filepaths, info.shard_lengths, strict=True):
            if not path.exists():
                problem = "is missing"
            else:
                try:
                    reader = ArrayRecordReader(os.fspath(path))
                    found = reader.num_records()
                    reader.close()
                    problem = None if found == count else f"holds {found} records, not {count}"
                except Exception as e:  # Riegeli's 'Corrupted ... file', a failed open, ...
                    problem = f"is unreadable ({str(e).strip().splitlines()[0][:200]})"
            if problem:
                raise ValueError(
                    f"config.data.tfds_dir={tfds_dir!r}: {path.name} ({split} split) {problem}; "
                    "re-run `python -m usfm_jax.data.ingest --overwrite`"
                )


def organ_datasets(cfg: ml_collections.ConfigDict) -> dict[str, grain.MapDataset]:
    """One MapDataset per organ of the ingested dataset's split (records are grouped by organ)."""
    card = read_card(cfg.tfds_dir)
    ranges = card["organ_ranges"].get(cfg.split)
    if not ranges:
        raise ValueError(
            f"config.data.split={cfg.split!r}: the dataset has "
            f"{[s for s, r in card['organ_ranges'].items() if r]}"
        )
    source = split_source(cfg)
    return {organ: source[start:end] for organ, (start, end) in ranges.items()}


def split_source(cfg: ml_collections.ConfigDict) -> grain.MapDataset:
    """Every record of the ingested split, in record order, each with its ``index``."""
    import tensorflow_datasets as tfds  # imported here: slow, and only this source needs it

    builder = tfds.builder_from_directory(cfg.tfds_dir)
    # PNG bytes as stored (images, and masks / targets of labelled data): ``decode_image`` is
    # ~2x faster than TFDS's own image decoding.
    images = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]
    decoders = {k: tfds.decode.SkipDecoding() for k in images}
    source = grain.MapDataset.source(builder.as_data_source(split=cfg.split, decoders=decoders))
    return _indexed(source)


def _indexed(source: grain.MapDataset) -> grain.MapDataset:
    """``source`` with each example's record position, ``index``: the key of precomputed
    teacher targets. Positions wrap: grain hands a repeated source epoch-wide indices."""
    return source.map_with_index(functools.partial(_with_index, size=len(source)))


def _with_index(index: int, example: dict[str, Any], size: int) -> dict[str, Any]:
    return {**example, "index": np.int64(index % size)}


def decode_image(png: bytes) -> np.ndarray:
    """PNG bytes of an ingested record -> uint8 [H, W, 1] (OpenCV's decoder, the fastest here)."""
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim != 2:
        raise ValueError("an ingested image is not a single-channel PNG")
    return image[..., None]


def _image_and_organ(record: dict[str, Any]) -> dict[str, np.ndarray]:
    """Decodes what training reads of an ingested record (ids and hashes stay on disk)."""
    return {
        "image": decode_image(record["image"]),
        "organ": np.int32(record["organ"]),
        "index": record["index"],
    }


def check_fixed_views(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError unless every record always gives the same view (what precomputed
    teacher targets need): the synthetic source, or ingested data without random augment."""
    if config.data.source == "synthetic":
        return
    if not AugmentConfig.from_mapping(config.image_size, config.data.augment).deterministic:
        raise ValueError(
            "teacher targets can be precomputed only for views that never change: set "
            "config.data.augment to crop_scale=(1, 1), one crop_ratio, hflip=0, gamma=(1, 1), "
            "contrast=(1, 1), brightness=0"
        )


def record_source(config: ml_collections.ConfigDict) -> grain.MapDataset:
    """The examples {"image", "organ", "index"} in record order, as training sees them: for
    precomputing teacher targets, which needs views that do not change from epoch to epoch."""
    cfg = config.data
    if cfg.source == "synthetic":
        source = SyntheticUltrasound(cfg.num_images, tuple(config.image_size), seed=config.seed)
        return _indexed(grain.MapDataset.source(source))
    check_fixed_views(config)
    fixed = Augment(AugmentConfig.from_mapping(config.image_size, cfg.augment))
    return (
        split_source(cfg)
        .map(_image_and_organ)
        .map(lambda ex: fixed.random_map(ex, np.random.default_rng(0)))
    )


class CachedTargets(grain.transforms.Map):
    """Adds each example's precomputed teacher features (``target`` [N, E] float16) from the
    cache's memory-mapped array, opened lazily (in each worker process)."""

    def __init__(self, path: str):
        self.path = path
        self._array = None

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return {**example, "target": np.asarray(self._array[example["index"]])}

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_array": None}


def create_stream(config: ml_collections.ConfigDict) -> grain.MapDataset:
    """The endless, random-access stream of single examples {"image" [H, W, 1], "organ",
    "index"} (+ "target" [N, E] with precomputed teacher targets, ``config.teacher.targets``)."""
    stream = _examples(config)
    targets = config.get("teacher", {}).get("targets")
    return stream.map(CachedTargets(cache_array(targets))) if targets else stream


def _examples(config: ml_collections.ConfigDict) -> grain.MapDataset:
    cfg = config.data
    if cfg.source == "synthetic":
        source = SyntheticUltrasound(cfg.num_images, tuple(config.image_size), seed=config.seed)
        ds = _indexed(grain.MapDataset.source(source))
        return ds.seed(config.seed).shuffle().repeat()
    if cfg.source == "tfds":
        datasets = organ_datasets(cfg)
        weights = organ_weights(
            {organ: len(ds) for organ, ds in datasets.items()},
            cfg.weighting,
            temperature=cfg.temperature,
            explicit=parse_organ_weights(cfg.organ_weights),
        )
        ds = mix_organs(datasets, weights, seed=config.seed)
        ds = ds.map(_image_and_organ)
        augment = AugmentConfig.from_mapping(config.image_size, cfg.augment)
        return ds.random_map(Augment(augment), seed=config.seed)
    raise ValueError(f"config.data.source={cfg.source!r}: expected one of {SOURCES}")


def create_pretrain_dataset(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
) -> grain.IterDataset:
    """This process's share of each global batch from global batch ``start_step`` on: dicts of
    ``image`` uint8 [B_local, H, W, 1], ``organ`` int32 [B_local], ``index`` int64 [B_local]
    (+ ``target`` float16 [B_local, N, E] with precomputed teacher targets)."""
    return process_batches(
        create_stream(config),
        config,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
    )


def process_batches(
    stream: grain.MapDataset,
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
) -> grain.IterDataset:
    """This process's block of rows of every global batch of ``config.batch_size`` consecutive
    examples of the endless ``stream``, from global batch ``start_step`` on, read ahead by
    ``config.data``'s threads (and worker processes)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if config.batch_size % process_count:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by "
            f"the {process_count} processes"
        )
    # Global batch k is items [k B, (k + 1) B) of the stream whatever the number of processes;
    # process p reads its p-th block, which goes to the rows its devices own in the global array
    # (on a multi-host TPU slice not always the p-th block: the batch's rows are then permuted).
    ds = stream.batch(config.batch_size // process_count, drop_remainder=True)
    ds = ds[process_index::process_count][start_step:]
    # Each element is a whole batch, read by one thread: a buffer shorter than the thread count
    # would leave threads idle (grain allows at most that many elements in flight).
    threads = config.data.num_threads
    ids = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=max(config.data.prefetch, threads)
        )
    )
    if config.data.worker_count:
        ids = ids.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.data.worker_count),
            worker_init_fn=leave_ctrl_c_to_the_main_process,
        )
    return ids


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's batch -> one global array per key, sharded over the mesh's batch axes."""
    sharding = parallel.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def global_batch_from_whole(whole: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A global batch that every process holds whole (an evaluation set), row for row: each
    device gets the rows it owns, which on a multi-host TPU slice need not be one contiguous
    block per process (predictions are compared with the host's labels in this order)."""
    sharding = parallel.batch_sharding(mesh)
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
        for k, v in whole.items()
    }


def padded_batches(
    ds: Sequence[dict[str, Any]], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` over a whole evaluation set (a grain MapDataset or a list of
    examples), the last padded by repeating its first example, with ``valid`` (bool [B])
    marking the real rows."""
    for start in range(0, len(ds), batch_size):
        rows = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        valid = np.arange(batch_size) < len(rows)
        rows += [rows[0]] * (batch_size - len(rows))
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        yield {**batch, "valid": valid}
