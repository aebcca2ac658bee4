"""Early, field-naming checks of a fine-tuning config (``ConfigError``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from usfm_jax.config_validation import (
    ConfigError,
    _check_seed,
    _in_range,
    _one_of,
    _require,
    check_batch_split,
    check_data_source,
    check_encoder,
    check_image_size,
    check_optimizer,
    require_kind,
)
from usfm_jax.convert import Architecture, Normalization
from usfm_jax.data.layout import IGNORE
from usfm_jax.data.pipeline import read_card
from usfm_jax.finetune.data import DEGRADATIONS, TASKS
from usfm_jax.finetune.evaluate import BASELINES, METRICS

MODES = ("finetune", "linear_probe")


def validate_finetune(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError for the first invalid setting of a fine-tuning config."""
    require_kind(config, "fine-tuning")
    _one_of(config, "task", TASKS)
    for field in ("seed", "data.seed"):
        _check_seed(config, field)
    check_image_size(config, patch=not config.init)  # a checkpoint brings its patch size
    for field in ("batch_size", "total_steps", "log_every", "eval_every", "max_bad_steps"):
        _require(config[field] > 0, field, config[field], "expected > 0")
    _in_range(config, "label_fraction", 0, 1, "(]")
    d = config.data
    check_data_source(config, ("synthetic", "tfds"))
    if d.source == "synthetic":
        for field in ("num_train", "num_val", "num_test"):
            _require(d[field] >= 1, f"data.{field}", d[field], "expected >= 1")
    else:
        _require(bool(d.tfds_dir), "data.tfds_dir", d.tfds_dir, "set it for data.source='tfds'")
        try:
            card = read_card(d.tfds_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
    _in_range(config, "data.hflip", 0, 1)
    _one_of(config, "data.degradation", DEGRADATIONS)
    level = d.degradation_level
    _require(d.degradation != "none" or level == 0, "data.degradation_level", level,
             "is used only with a data.degradation (it is 'none')")  # fmt: skip
    if d.degradation != "none":
        _require(config.task == "enhance", "data.degradation", d.degradation,
                 "synthesised noisy inputs are for task='enhance'")  # fmt: skip
        low = 1.0 if d.degradation == "downsample" else 0.0
        _require(level == 0 or level > low, "data.degradation_level", level,
                 f"expected > {low:g} for {d.degradation} (0: its default)")  # fmt: skip
        if d.degradation == "speckle":  # beyond 1 the mixture goes negative: black pixels
            _require(level <= 1, "data.degradation_level", level,
                     "expected in (0, 1] for speckle (0: its default)")  # fmt: skip
    if d.source == "tfds":
        _check_labels(config, card)
    for field in ("num_threads", "prefetch", "worker_count"):
        _require(d[field] >= 0, f"data.{field}", d[field], "expected >= 0")
    _require(config.init_num_heads >= 0, "init_num_heads", config.init_num_heads,
             "expected >= 0 (0: the card's or the standard sizes')")  # fmt: skip
    if not config.init:  # else checked once the checkpoint's architecture is known (run.py)
        check_encoder(config)
    h = config.head
    _one_of(config, "head.mode", MODES)
    _one_of(config, "head.pool", ("mean", "cls"))
    _one_of(config, "head.decoder", ("upernet", "linear"))
    _in_range(config, "head.layer_decay", 0, 1, "(]")
    _require(h.channels > 0, "head.channels", h.channels, "expected > 0")
    _require(h.refine_width > 0, "head.refine_width", h.refine_width, "expected > 0")
    _in_range(config, "loss.label_smoothing", 0, 1, "[)")
    _require(config.loss.dice_weight >= 0, "loss.dice_weight", config.loss.dice_weight, ">= 0")
    check_optimizer(config)
    _require(config.eval.num_overlays >= 0, "eval.num_overlays", config.eval.num_overlays, ">= 0")
    if config.eval.select:
        metrics = [m for m in METRICS[config.task] if m not in BASELINES]
        _require(config.eval.select in metrics, "eval.select", config.eval.select,
                 f"expected one of {metrics} for task={config.task!r}"
                 + (" (the *_input metrics score the inputs, not the model)"
                    if config.eval.select in BASELINES else ""))  # fmt: skip
    if num_devices is not None:
        check_batch_split(
            config, num_devices, config.batch_size // config.optimizer.grad_accum_steps
        )


def _check_labels(config: ml_collections.ConfigDict, card: dict) -> None:
    """An ingested dataset has something to learn for the task: two classes or more; masks,
    with a foreground class; noisy / clean pairs, or clean images and a degradation."""
    d = config.data
    if config.task == "classify":
        classes = [c for c, r in card["organ_ranges"].get("train", {}).items() if r[1] > r[0]]
        _require(len(classes) >= 2, "data.tfds_dir", d.tfds_dir,
                 f"classification needs two classes or more in train, the dataset has "
                 f"{classes} (one folder per class at ingest)")  # fmt: skip
    fields = card.get("fields", [])
    _require(config.task != "segment" or "mask" in fields, "data.tfds_dir", d.tfds_dir,
             "holds no masks: ingest it with --masks DIR")  # fmt: skip
    if config.task == "enhance":
        paired = "target" in fields
        _require(paired or d.degradation != "none", "data.tfds_dir", d.tfds_dir,
                 "holds no targets (--targets at ingest): set config.data.degradation to one of "
                 f"{DEGRADATIONS[1:]} to synthesise noisy inputs")  # fmt: skip
        _require(not paired or d.degradation == "none", "data.degradation", d.degradation,
                 "would replace the real noisy inputs of the dataset's noisy / clean pairs "
                 "(--targets at ingest) by synthesised ones: leave it 'none' (or ingest the "
                 "clean images alone)")  # fmt: skip
    if config.task == "segment":
        values = sorted(card.get("mask_values", []))
        _require(any(v not in (0, IGNORE) for v in values), "data.tfds_dir", d.tfds_dir,
                 f"its masks hold only the values {values}: background (0) and ignore "
                 f"({IGNORE}), no class to learn. Masks saved as 0/255 must hold class ids "
                 "(0/1: mask // 255) before ingest")  # fmt: skip


# What a checkpoint given as config.init brings: its architecture, input normalisation and
# weights (whose initial value layer_scale_init sets for a random encoder).
INIT_FIELDS = (
    *(f"model.{field}" for field in ("variant", "size", "width", "depth", "num_heads",
                                     "patch_size", "in_chans", "rel_pos", "layer_scale_init")),
    "normalization.mean",
    "normalization.std",
)  # fmt: skip


def init_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The command-line values that a checkpoint given as ``config.init`` must agree with."""
    return {field: value for field, value in overrides.items() if field in INIT_FIELDS}


def check_init_overrides(
    config: ml_collections.ConfigDict,
    overrides: Mapping[str, Any],
    arch: Architecture,
    normalization: Normalization,
    source: str = "",
) -> None:
    """With ``config.init``, the checkpoint (``source``: how the user named it, by default
    ``--config.init=PATH``) brings the architecture, the input normalisation and the weights: a
    command-line value (``overrides``, flat as ``{"model.depth": 24}``) of one of those fields
    that differs from the checkpoint's would be silently ignored, so it is an error. Training
    settings (dtype, attention, drop path, remat...) are not checked."""
    if not config.init:
        return
    source = source or f"--config.init={config.init}"
    found = {
        "model.variant": arch.variant,
        "model.size": arch.size or f"none ({arch.width}, {arch.depth}, {arch.num_heads})",
        "model.width": arch.width,
        "model.depth": arch.depth,
        "model.num_heads": arch.num_heads,
        "model.patch_size": arch.patch_size,
        "model.in_chans": arch.in_chans,
        "model.rel_pos": arch.rel_pos if arch.variant == "beit" else None,
    }
    for field, value in init_overrides(overrides).items():
        name = field.partition(".")[2]
        if field == "model.layer_scale_init":
            _init_conflict(field, value, source, "trained layer scale weights (the initial "
                           "value is for a random encoder)")  # fmt: skip
        elif field.startswith("normalization."):
            expected = np.asarray(getattr(normalization, name))
            given = np.atleast_1d(np.asarray(value, np.float64))
            if given.size == 1:
                given = np.repeat(given, expected.size)
            if given.shape != expected.shape or not np.allclose(given, expected, rtol=1e-6):
                _init_conflict(field, value, source, f"input normalisation {normalization}")
        elif found[field] is not None and value is not None and value != found[field]:
            _init_conflict(field, value, source, f"{name} {found[field]!r}")


def _init_conflict(field: str, value: Any, source: str, has: str) -> None:
    raise ConfigError(
        f"--config.{field}={value!r} differs from {source}, whose encoder has {has}: a "
        "checkpoint brings its own architecture, weights and input normalisation (PyTorch "
        "weights without a card: --config.init_normalization); drop the override, or train "
        "from scratch"
    )
