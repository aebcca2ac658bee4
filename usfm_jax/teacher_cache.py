"""Precomputed teacher targets (URFM), for data whose views never change.

    python -m usfm_jax.teacher_cache --config configs/pretrain/urfm_vitb16.py:demo \\
        --config.teacher.path=teacher.bin --out caches/teacher
    python -m usfm_jax.train --config ... --config.teacher.targets=caches/teacher

Running the teacher costs a forward pass per image and step. Without random augmentation
(the synthetic source, or ingested data with ``config.data.augment`` set to the identity) its
features of a record never change, so they can be computed once: the cache holds the raw
features (before the target normalisation, which stays a training setting) of every record,
float16 [num_records, N, E] in ``targets.npy`` (memory-mapped by the input pipeline, a local
path), and ``cache.json`` saying what made them. The teacher runs data-parallel over the
process's devices. Training refuses a cache made by another teacher (its bytes: the SHA-256 of
the file, and of the card beside it), layer, normalisation or dtype, image size or data (an
ingested dataset also when ingested again in place).
"""

from __future__ import annotations

import hashlib
import json
import logging as std_logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_flags
from tqdm import tqdm

from usfm_jax.cli import incomplete_output, run_program, start_jax
from usfm_jax.config_validation import (
    ConfigError,
    check_cacheable_views,
    field_value,
    require_kind,
    validate,
)
from usfm_jax.convert import ConversionError
from usfm_jax.convert.files import card_path
from usfm_jax.data.pipeline import CACHE_ARRAY, read_card, record_source
from usfm_jax.models.teacher import grid_mismatch, teacher_from_config
from usfm_jax.paths import PathError, make_directory, new_directory
from usfm_jax.reporting import quiet_library_logs

CACHE_INFO = "cache.json"


def describe(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the cached features depend on: teacher (by content), its settings, image size,
    data (an ingested dataset by its card's creation time: ingesting again in place changes
    it); as JSON stores it."""
    t, d = config.teacher, config.data
    data = {"source": d.source, "seed": config.seed}
    if d.source == "synthetic":
        data["num_images"] = d.num_images
    else:
        data.update(
            tfds_dir=os.path.abspath(d.tfds_dir),
            created=read_card(d.tfds_dir).get("created"),
            split=d.split,
            augment=d.augment.to_dict(),
        )
    card = card_path(t.path)  # where the teacher's heads, normalisation, grid may come from
    description = {
        "teacher": {
            "path": os.path.abspath(t.path),
            "sha256": _sha256(t.path),
            "card_sha256": _sha256(card) if card.exists() else None,
            "format": t.format,
            "num_heads": t.num_heads,
            "layer": t.layer,
            "normalization": t.normalization,
            "dtype": t.dtype or config.model.dtype,
        },
        "image_size": list(config.image_size),
        "data": data,
    }
    return json.loads(json.dumps(description))  # tuples as lists, as read back from cache.json


def _sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def build_cache(
    config: ml_collections.ConfigDict,
    out: str,
    batch: int = 64,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Runs the teacher over every record of the config's data, data-parallel over ``devices``
    (default: this process's), ``batch`` images a pass rounded up to a whole share per
    device; returns cache.json's content."""
    if batch < 1:
        raise ValueError(f"batch={batch}: expected >= 1")
    devices = list(devices if devices is not None else jax.local_devices())
    mesh = Mesh(np.asarray(devices), ("data",))
    batch = -(-batch // len(devices)) * len(devices)
    destination = new_directory(out)
    loaded = teacher_from_config(config)
    if problem := grid_mismatch(config, loaded.arch):  # the tokens would not line up
        raise ConfigError(problem)
    params = jax.device_put(loaded.params, NamedSharding(mesh, PartitionSpec()))  # replicated
    teacher = nnx.merge(loaded.graphdef, params)
    forward = jax.jit(lambda t, x: t(x.astype(np.float32) / 255.0))
    split = NamedSharding(mesh, PartitionSpec("data"))  # the images along the batch
    records = record_source(config)
    count = len(records)
    tokens = loaded.arch.grid[0] * loaded.arch.grid[1]
    make_directory(destination, "--out")
    array = np.lib.format.open_memmap(
        os.path.join(out, CACHE_ARRAY), "w+", np.float16, (count, tokens, teacher.features)
    )
    progress = tqdm(
        range(0, count, batch), desc=f"teacher targets ({len(devices)} devices)", unit="batch"
    )
    for start in progress:
        n = min(batch, count - start)
        images = np.stack([records[i]["image"] for i in range(start, start + n)])
        if n < batch:  # the last pass, padded to the others' shape (one compile)
            images = np.pad(images, [(0, batch - n)] + [(0, 0)] * (images.ndim - 1))
        features = forward(teacher, jax.device_put(images, split))
        array[start : start + n] = np.asarray(features[:n], np.float16)
    array.flush()
    info = {**describe(config), "count": count, "shape": list(array.shape), "dtype": "float16"}
    with open(os.path.join(out, CACHE_INFO), "w") as f:
        json.dump(info, f, indent=2)
    return info


# what a described setting is called where users set it (the rest: config.<same name>)
_SETTING = {
    "data.seed": "config.seed",
    "data.created": "the dataset's creation time (dataset_card.json)",
    "teacher.sha256": "the teacher file's SHA-256",
    "teacher.card_sha256": "the SHA-256 of the teacher's card (the JSON file beside it)",
    "teacher.dtype": "config.teacher.dtype (or config.model.dtype)",
}


def check_cache(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """cache.json of ``config.teacher.targets``, if it was made for this config; else a
    ValueError naming the first setting that differs."""
    directory = config.teacher.targets
    info = read_cache_info(directory)
    expected = describe(config)
    for section, values in expected.items():
        got = info.get(section)
        if isinstance(values, dict) and isinstance(got, dict):  # a key added since: None
            got = {key: got.get(key) for key in values}
        if got != values:
            differs = (
                [k for k in values if got is None or got.get(k) != values[k]]
                if isinstance(values, dict)
                else []
            )
            field = f"{section}.{differs[0]}" if differs else section
            raise ValueError(
                f"config.teacher.targets={directory!r} was made with "
                f"{_SETTING.get(field, 'config.' + field)}={field_value(info, field)!r}, "
                f"this run has {field_value(expected, field)!r}: rebuild it"
            )
    array = os.path.join(directory, CACHE_ARRAY)
    try:  # reads the header and maps the data: a cut file fails here, not in a reader thread
        targets = np.load(array, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ValueError(f"{array} is damaged ({e}): rebuild the cache") from None
    if list(targets.shape) != info["shape"] or str(targets.dtype) != info["dtype"]:
        raise ValueError(
            f"{array} holds {targets.dtype} {list(targets.shape)}, {CACHE_INFO} says "
            f"{info['dtype']} {info['shape']}: rebuild the cache"
        )
    return info


def read_cache_info(directory: str) -> dict[str, Any]:
    """cache.json of the cache in ``directory``, unchecked (``check_cache`` checks it)."""
    path = os.path.join(directory, CACHE_INFO)
    if not os.path.exists(path) or not os.path.exists(os.path.join(directory, CACHE_ARRAY)):
        raise ValueError(
            f"config.teacher.targets={directory!r}: no teacher-target cache there (write one "
            "with python -m usfm_jax.teacher_cache)"
        )
    with open(path) as f:
        return json.load(f)


def main(argv: list[str]) -> None:
    del argv  # parse_flags refuses positional arguments
    quiet_library_logs(std_logging.ERROR)
    config, out = flags.FLAGS.config, flags.FLAGS.out
    try:
        require_kind(config, "pre-training")
        if not config.representation.enabled:
            raise ConfigError("config.representation.enabled is False: no teacher to run")
        config.teacher.targets = ""  # validate the rest: the cache is what we build
        config.probe.every = 0  # pre-training's probes play no part in the cache
        validate(config)
        check_cacheable_views(config)  # before the teacher is loaded
        start_jax()
        info = build_cache(config, out, flags.FLAGS.batch)
    except (ConfigError, ConversionError, PathError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}: teacher targets {info['shape']} float16")


if __name__ == "__main__":  # flags defined here: the module is also imported beside train.py's
    config_flags.DEFINE_config_file("config", None, "Run config file (python).")
    flags.DEFINE_string("out", None, "New directory for the cache.")
    flags.DEFINE_integer(
        "batch", 64, "Images per teacher pass (a whole share per device).", lower_bound=1
    )
    flags.mark_flags_as_required(["config", "out"])
    run_program(main, incomplete_output("out"))
