"""Checks a run config before anything is compiled, naming the offending field."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from etils import epath

from usfm_jax.data.augment import AugmentConfig
from usfm_jax.data.mixing import WEIGHTINGS
from usfm_jax.data.pipeline import (
    SOURCES,
    check_fixed_views,
    check_shards,
    parse_organ_weights,
    read_card,
)
from usfm_jax.models.factory import DTYPES, encoder_dims
from usfm_jax.models.fused_attention import MAX_HEAD_DIM, MAX_TOKENS
from usfm_jax.models.teacher import TARGET_LAYERS
from usfm_jax.models.vit import (
    ATTENTION_IMPLEMENTATIONS,
    MLP_IMPLEMENTATIONS,
    NORM_IMPLEMENTATIONS,
    PALLAS_IMPLEMENTATIONS,
    REMAT_POLICIES,
    half_precision_on_nvidia_gpu,
)
from usfm_jax.objectives import dual
from usfm_jax.objectives.representation import (
    LOSSES,
    STUDENTS,
    TARGET_NORMS,
    create_representation,
)
from usfm_jax.parallel import MESH_AXES, MeshError, batch_shards, mesh_shape
from usfm_jax.paths import PathError, as_path


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def _require(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}={value!r}: {expected}")


# A field only each kind of config has, and the program that runs it.
KINDS = {
    "pre-training": ("objective", "python -m usfm_jax.train"),
    "fine-tuning": ("task", "python -m usfm_jax.finetune"),
}


def require_kind(config: ml_collections.ConfigDict, kind: str, where: str = "--config") -> None:
    """Refuses a config of another kind (``KINDS``) before any of its fields is read."""
    field, _ = KINDS[kind]
    if field in config:
        return
    other = [(name, program) for name, (f, program) in KINDS.items() if f in config]
    found = f"a {other[0][0]} config: run it with {other[0][1]}" if other else "of neither kind"
    raise ConfigError(f"{where} is not a {kind} config (it has no config.{field}); it is {found}")


def check_workdir_kind(root: epath.Path, kind: str) -> None:
    """Refuses a work directory another program wrote (an export; a run of the other kind,
    by its ``config.json``): running there would overwrite that ``config.json`` and mix two
    runs' files."""
    if (root / "export.json").exists():
        raise PathError(f"--workdir {root} holds an export (export.json): use a new --workdir")
    saved = root / "config.json"
    if not saved.exists():
        return
    try:
        fields = json.loads(saved.read_text())
    except ValueError:
        return  # cut short by a crash: this run rewrites it
    for other, (field, program) in KINDS.items():
        if other != kind and field in fields and KINDS[kind][0] not in fields:
            raise PathError(
                f"--workdir {root} holds a {other} run ({program}): use a new --workdir"
            )


def field_value(config: ml_collections.ConfigDict | Mapping[str, Any], field: str) -> Any:
    """The value of a dotted ``field`` ("data.seed") of a config or of its dict (as JSON
    stores it); None if a part of the path is missing."""
    for part in field.split("."):
        config = config.get(part) if hasattr(config, "get") else None
    return config


def _check_seed(config: ml_collections.ConfigDict, field: str = "seed") -> None:
    value = field_value(config, field)
    _require(isinstance(value, int) and 0 <= value < 2**32, field, value,
             "expected an int in [0, 2**32)")  # fmt: skip


def _one_of(config: ml_collections.ConfigDict, field: str, allowed: tuple) -> None:
    value = field_value(config, field)
    _require(value in allowed, field, value, f"expected one of {allowed}")


def _in_range(
    config: ml_collections.ConfigDict, field: str, low: float, high: float, interval: str = "[]"
) -> None:
    """Checks ``low <= value <= high``; ``interval`` says which ends are open, e.g. "[)"."""
    value = field_value(config, field)
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[1] == "]" else value < high
    _require(above and below, field, value, f"expected {interval[0]}{low}, {high}{interval[1]}")


def check_data_source(config: ml_collections.ConfigDict, sources: tuple[str, ...]) -> None:
    """``data.source`` is one of ``sources``; a ``data.tfds_dir`` given with the synthetic
    source would be ignored (the run would train on generated images), so it is an error."""
    _one_of(config, "data.source", sources)
    d = config.data
    _require(d.source != "synthetic" or not d.tfds_dir, "data.tfds_dir", d.tfds_dir,
             "is set, but data.source='synthetic' draws images from the embedded generator: "
             "add --config.data.source=tfds to use the dataset, or leave data.tfds_dir "
             "empty")  # fmt: skip


def _check_sampling(config: ml_collections.ConfigDict) -> None:
    """The organ weighting and augmentation settings, whatever the source. The synthetic source
    reads none of them (its generator draws the organs uniformly, each image already varied),
    so with it a setting changed from the default is an error rather than silently unused."""
    d = config.data
    _one_of(config, "data.weighting", WEIGHTINGS)
    _require(d.temperature is None or d.weighting == "temperature", "data.temperature",
             d.temperature, f"is used only with data.weighting='temperature' (it is "
             f"{d.weighting!r}): add --config.data.weighting=temperature, or leave it "
             "unset")  # fmt: skip
    _require(d.temperature is None or (math.isfinite(d.temperature) and d.temperature >= 0),
             "data.temperature", d.temperature, "expected a finite value >= 0")  # fmt: skip
    try:
        parse_organ_weights(d.organ_weights)
        augment = AugmentConfig.from_mapping(config.image_size, d.augment)
    except ValueError as e:
        raise ConfigError(f"config.data: {e}") from None
    _require(d.weighting == "explicit" or not d.organ_weights, "data.organ_weights",
             d.organ_weights, f"is used only with data.weighting='explicit' (it is "
             f"{d.weighting!r}): add --config.data.weighting=explicit, or leave it "
             "empty")  # fmt: skip
    if d.source != "synthetic":
        return
    synthetic = ("is read only from ingested data (data.source='tfds'); the synthetic source "
                 "draws its organs uniformly and varies each image itself")  # fmt: skip
    _require(d.weighting == "balanced", "data.weighting", d.weighting, synthetic)
    default = AugmentConfig(augment.image_size)
    for field in dataclasses.fields(default):
        value = getattr(augment, field.name)
        _require(value == getattr(default, field.name), f"data.augment.{field.name}", value,
                 synthetic)  # fmt: skip


def _check_tfds_data(config: ml_collections.ConfigDict) -> None:
    """The ingested dataset exists and has the splits and organs the settings name."""
    d = config.data
    try:
        card = read_card(d.tfds_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    splits = [split for split, ranges in card["organ_ranges"].items() if ranges]
    _require(d.split in splits, "data.split", d.split, f"the dataset has {splits}")
    read = {d.split, config.probe.split} if config.probe.every else {d.split}
    try:
        check_shards(d.tfds_dir, sorted(read & set(splits)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    weights = parse_organ_weights(d.organ_weights)  # valid: _check_sampling
    if d.weighting == "explicit":
        organs = sorted(card["organ_ranges"][d.split])
        named = set(weights or ())
        unknown, missing = sorted(named - set(organs)), sorted(set(organs) - named)
        _require(
            not unknown and not missing,
            "data.organ_weights",
            d.organ_weights,
            f"name a weight for each of {organs}"
            + (f"; not in the dataset: {unknown}" if unknown else "")
            + (f"; missing: {missing}" if missing else ""),
        )


def _check_mask_patch_size(config: ml_collections.ConfigDict, section: str) -> None:
    """``config.SECTION.mask_patch_size``: a multiple of the model patch dividing the image."""
    value, patch = config[section].mask_patch_size, config.model.patch_size
    size = tuple(config.image_size)
    field = f"{section}.mask_patch_size"
    _require(
        value > 0 and value % patch == 0,
        field,
        value,
        f"must be a positive multiple of config.model.patch_size={patch}",
    )
    _require(
        size[0] % value == 0 and size[1] % value == 0,
        field,
        value,
        f"must divide config.image_size={size}",
    )


def _check_representation(config: ml_collections.ConfigDict) -> None:
    """URFM's objective and its teacher."""
    r, t = config.representation, config.teacher
    _one_of(config, "representation.student", STUDENTS)
    _one_of(config, "representation.target_norm", TARGET_NORMS)
    _one_of(config, "representation.loss", LOSSES)
    _one_of(config, "representation.loss_on", ("masked", "all"))
    _in_range(config, "representation.ratio", 0, 1, "()")
    _require(r.weight > 0, "representation.weight", r.weight, "expected > 0")
    _require(r.beta > 0, "representation.beta", r.beta, "expected > 0")
    _check_mask_patch_size(config, "representation")
    units = math.prod(s // r.mask_patch_size for s in config.image_size)
    _require(
        math.ceil(r.ratio * units) < units,
        "representation.ratio",
        r.ratio,
        f"masks all {units} mask patches ({r.mask_patch_size} px) of the image, leaving the "
        f"student nothing to see: expected at most {(units - 1) / units:.4g}",
    )
    if r.student == "mae":
        _require(
            config.model.variant == "vit",
            "model.variant",
            config.model.variant,
            "the MAE student encodes the visible patches alone, which needs absolute positions: "
            "use 'vit' (or representation.student='simmim')",
        )
        d = r.decoder
        _require(
            d.depth >= 1 and d.width > 0 and d.num_heads > 0 and d.width % d.num_heads == 0,
            "representation.decoder",
            dict(d),
            "expected depth >= 1 and a width divisible by num_heads",
        )
    _require(
        bool(t.path),
        "teacher.path",
        t.path,
        "the representation objective needs a teacher: an open_clip checkpoint (BiomedCLIP) "
        "or a timm ViT state dict",
    )
    _require(as_path(t.path).exists(), "teacher.path", t.path, "no such file")
    _one_of(config, "teacher.format", ("auto", "open-clip-visual", "timm-vit"))
    _one_of(config, "teacher.layer", TARGET_LAYERS)
    _require(t.num_heads is None or t.num_heads >= 1, "teacher.num_heads", t.num_heads,
             "expected >= 1 (or None: the card's, or the standard one of the width)")  # fmt: skip
    if t.dtype:
        _one_of(config, "teacher.dtype", tuple(DTYPES))
    if t.targets:
        from usfm_jax.teacher_cache import check_cache  # it imports this module

        check_cacheable_views(config)
        try:
            check_cache(config)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_cacheable_views(config: ml_collections.ConfigDict) -> None:
    """Teacher targets can be cached only for views that never change (``check_fixed_views``)."""
    try:
        check_fixed_views(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_training_probe(config: ml_collections.ConfigDict) -> None:
    """``config.probe``: the in-training kNN / linear probes."""
    p = config.probe
    _require(p.every >= 0, "probe.every", p.every, "expected >= 0 (0: off)")
    if p.every:
        check_probe(config, "probe.every=0")


def check_probe(config: ml_collections.ConfigDict, off: str = "") -> None:
    """``config.probe``'s settings and held-out set (``data``, ``seed``, ``image_size``), for
    the kNN / linear probes of pre-training (``off`` names the way to turn them off) or of
    ``python -m usfm_jax.probe``."""
    p = config.probe
    _require(p.num_train >= 2, "probe.num_train", p.num_train, "expected >= 2")
    _require(p.num_test >= 1, "probe.num_test", p.num_test, "expected >= 1")
    _require(p.k >= 1, "probe.k", p.k, "expected >= 1")
    _require(p.temperature > 0, "probe.temperature", p.temperature, "expected > 0")
    _require(p.linear_steps >= 1, "probe.linear_steps", p.linear_steps, "expected >= 1")
    if config.data.source == "tfds":
        card = read_card(config.data.tfds_dir)
        counts = card["images"].get(p.split, {})  # images per organ
        size = sum(counts.values())
        _require(
            size >= p.num_train + p.num_test,
            "probe.split",
            p.split,
            f"holds {size} images, fewer than probe.num_train + num_test: ingest with "
            "--val_fraction, choose another split, lower probe.num_train / num_test"
            + (f", or set {off}" if off else ""),
        )
        organs = sorted(organ for organ, n in counts.items() if n)
        _require(
            len(organs) >= 2,
            "probe.split",
            p.split,
            f"holds one organ ({organs[0]}): the probes classify organs, and would score 1.0 "
            "whatever the encoder learnt; choose another split" + (f" or set {off}" if off else ""),
        )


def check_image_size(config: ml_collections.ConfigDict, patch: bool = True) -> None:
    """``config.image_size``: (height, width), multiples of ``config.model.patch_size`` (unless
    ``patch`` is False: a fine-tuning checkpoint brings its own patch size)."""
    size = tuple(config.image_size)
    _require(
        len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size),
        "image_size",
        config.image_size,
        "expected (height, width) of positive ints, e.g. --config.image_size='(224, 224)'",
    )
    if not patch:
        return
    patch = config.model.patch_size
    _require(isinstance(patch, int) and patch > 0, "model.patch_size", patch, "expected an int > 0")
    _require(
        size[0] % patch == 0 and size[1] % patch == 0,
        "image_size",
        size,
        f"must be a multiple of config.model.patch_size={patch}",
    )


def check_encoder(config: ml_collections.ConfigDict, backend: str | None = None) -> None:
    """The encoder fields of ``config.model``, for running on ``backend`` (default: JAX's
    default backend; an ahead-of-time compile names its target's)."""
    m = config.model
    backend = backend or jax.default_backend()
    _one_of(config, "model.variant", ("beit", "vit"))
    _one_of(config, "model.rel_pos", ("shared", "per_block"))
    _one_of(config, "model.dtype", tuple(DTYPES))
    _one_of(config, "model.remat", tuple(REMAT_POLICIES))
    _one_of(config, "model.attention", ATTENTION_IMPLEMENTATIONS)
    if m.attention == "cudnn":
        _require(
            half_precision_on_nvidia_gpu(DTYPES[m.dtype], backend),
            "model.attention",
            m.attention,
            f"cuDNN attention needs an NVIDIA GPU and bf16 / fp16 compute "
            f"(backend {backend!r}, model.dtype={m.dtype!r}); use 'xla'",
        )
    _one_of(config, "model.mlp", MLP_IMPLEMENTATIONS)
    _one_of(config, "model.norm", NORM_IMPLEMENTATIONS)
    for field in ("attention", "mlp", "norm"):
        _require(
            m[field] not in PALLAS_IMPLEMENTATIONS or backend == "gpu",
            f"model.{field}",
            m[field],
            f"the Pallas (Triton) kernels run on NVIDIA GPUs (backend "
            f"{backend!r}; elsewhere only in Pallas' slow interpreter); use 'xla'",
        )
    _one_of(config, "model.in_chans", (1, 3))
    for field in ("width", "depth", "num_heads"):
        value = m.get(field)
        _require(value is None or value > 0, f"model.{field}", value, "expected > 0 (or None)")
    try:
        width, _, heads = encoder_dims(m)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(width % heads == 0, "model.width", width, f"must be divisible by num_heads={heads}")
    _in_range(config, "model.drop_path_rate", 0, 1, "[)")
    if m.attention == "pallas":
        (h, w), patch = config.image_size, m.patch_size
        tokens = (h // patch) * (w // patch) + 1
        _require(
            tokens <= MAX_TOKENS,
            "model.attention",
            m.attention,
            f"the Pallas attention kernels take up to {MAX_TOKENS} tokens; "
            f"config.image_size={tuple(config.image_size)} makes {tokens}: use 'cudnn' or 'xla'",
        )
        _require(
            width // heads <= MAX_HEAD_DIM,
            "model.attention",
            m.attention,
            f"the Pallas attention kernels take heads up to {MAX_HEAD_DIM} wide; this encoder's "
            f"are {width // heads} (width {width}, {heads} heads): use 'cudnn' or 'xla'",
        )


def check_optimizer(config: ml_collections.ConfigDict) -> None:
    """``config.optimizer`` against the run's length and batch (gradient accumulation
    included)."""
    o = config.optimizer
    _require(o.base_lr > 0, "optimizer.base_lr", o.base_lr, "expected > 0")
    _require(o.clip_norm >= 0, "optimizer.clip_norm", o.clip_norm, "expected >= 0 (0: off)")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "expected >= 0")
    _in_range(config, "optimizer.b1", 0, 1, "[)")
    _in_range(config, "optimizer.b2", 0, 1, "[)")
    _in_range(config, "optimizer.min_lr_ratio", 0, 1)
    _require(
        0 <= o.warmup_steps < config.total_steps,
        "optimizer.warmup_steps",
        o.warmup_steps,
        f"expected [0, total_steps={config.total_steps}); lower it with "
        "--config.optimizer.warmup_steps, or use the config's `:steps=N` argument where it has "
        "one (it sets both)",
    )
    _require(o.grad_accum_steps >= 1, "optimizer.grad_accum_steps", o.grad_accum_steps, ">= 1")
    _require(
        config.batch_size % o.grad_accum_steps == 0,
        "optimizer.grad_accum_steps",
        o.grad_accum_steps,
        f"must divide config.batch_size={config.batch_size}",
    )


def check_batch_split(
    config: ml_collections.ConfigDict, num_devices: int, *micro_batches: int
) -> None:
    """The batch, and each of the ``micro_batches`` (model inputs per micro-batch: views of a
    pixel objective, images of the representation one), divide over the batch axes."""
    try:
        shape = mesh_shape(config.mesh, num_devices)
    except MeshError as e:
        raise ConfigError(str(e)) from None
    shards = batch_shards(dict(zip(MESH_AXES, shape, strict=True)))
    _require(
        all(size % shards == 0 for size in (config.batch_size, *micro_batches)),
        "batch_size",
        config.batch_size,
        f"must split evenly over {shards} devices (per micro-batch of views too)",
    )


def validate(
    config: ml_collections.ConfigDict, num_devices: int | None = None, backend: str | None = None
) -> None:
    """Raises ConfigError for the first invalid setting of a pre-training config, for
    ``num_devices`` devices of ``backend`` (default: JAX's default backend)."""
    require_kind(config, "pre-training")
    _check_seed(config)
    check_image_size(config)
    for field in ("batch_size", "total_steps", "log_every", "max_bad_steps"):
        _require(config[field] > 0, field, config[field], "expected > 0")
    _require(config.image_every >= 0, "image_every", config.image_every, "expected >= 0")
    _in_range(config, "ema_decay", 0, 1, "[)")
    for field in ("every", "keep"):
        value = config.checkpoint[field]
        _require(value > 0, f"checkpoint.{field}", value, "expected > 0")
    keep_every = config.checkpoint.keep_every
    _require(keep_every >= 0, "checkpoint.keep_every", keep_every, "expected >= 0 (0: none)")
    every = config.checkpoint.every
    _require(keep_every % every == 0, "checkpoint.keep_every", keep_every,
             f"must be a multiple of checkpoint.every={every}: only saved steps can be kept, "
             f"so the steps kept would be the multiples of {math.lcm(keep_every, every)}, not "
             f"of {keep_every}")  # fmt: skip
    if config.image_every:
        _require(
            1 <= config.num_preview_images <= config.batch_size,
            "num_preview_images",
            config.num_preview_images,
            f"expected [1, batch_size={config.batch_size}] (or image_every=0)",
        )

    check_data_source(config, SOURCES)
    _check_sampling(config)
    if config.data.source == "tfds":
        _check_tfds_data(config)
    if config.data.source == "synthetic":
        _require(config.data.num_images >= 1, "data.num_images", config.data.num_images, ">= 1")
    for field in ("num_threads", "prefetch", "worker_count"):
        _require(config.data[field] >= 0, f"data.{field}", config.data[field], "expected >= 0")

    m = config.model
    check_encoder(config, backend)
    _one_of(config, "model.head", ("linear", "transformer"))
    _one_of(config, "model.out_chans", (1,))  # the images are single-channel
    if m.head == "transformer":
        d = m.decoder
        _require(d.depth >= 1, "model.decoder.depth", d.depth, "expected >= 1")
        _require(
            d.width > 0 and d.num_heads > 0 and d.width % d.num_heads == 0,
            "model.decoder.width",
            d.width,
            f"must be divisible by decoder.num_heads={d.num_heads}",
        )

    s = config.spatial
    if s.enabled:
        _in_range(config, "spatial.ratio", 0, 1, "[)")
        _require(
            s.ratio > 0 or config.objective.spatial_loss_on == "all",
            "spatial.ratio",
            s.ratio,
            "masks nothing, so the masked-pixel loss is always 0 "
            "(use a ratio > 0 or objective.spatial_loss_on='all')",
        )
        _require(s.sigma >= 0, "spatial.sigma", s.sigma, "expected >= 0")
        _check_mask_patch_size(config, "spatial")
    f = config.frequency
    if f.enabled:
        _one_of(config, "frequency.kind", ("band_stop", "low_high_pass"))
        _one_of(config, "frequency.output", ("abs", "real"))
        if f.kind == "band_stop":
            _in_range(config, "frequency.ratio", 0, 1, "(]")
    r = config.representation
    if r.enabled:
        _check_representation(config)
    for field in ("path", "targets"):  # else a teacher would be loaded, or read, for nothing
        value = config.teacher[field]
        _require(r.enabled or not value, f"teacher.{field}", value,
                 "is set, but representation.enabled=False: the teacher gives URFM's targets "
                 "(configs/pretrain/urfm_vitb16.py, or --config.representation.enabled=True), "
                 "or leave it empty")  # fmt: skip
    _require(
        s.enabled or f.enabled or r.enabled,
        "spatial.enabled",
        s.enabled,
        "at least one of spatial, frequency and representation must be enabled",
    )

    ob = config.objective
    for field in ("spatial_weight", "frequency_weight", "frequency_pixel_weight",
                  "frequency_fft_weight"):  # fmt: skip
        _require(ob[field] >= 0, f"objective.{field}", ob[field], "expected >= 0")
    if f.enabled:
        _require(
            ob.frequency_pixel_weight + ob.frequency_fft_weight > 0,
            "objective.frequency_pixel_weight",
            ob.frequency_pixel_weight,
            "the frequency branch needs a pixel or a spectral loss (frequency_fft_weight)",
        )
    if s.enabled and f.enabled and ob.combine == "split":
        _require(
            config.batch_size % 2 == 0,
            "batch_size",
            config.batch_size,
            "must be even with objective.combine='split'",
        )

    o = config.optimizer
    check_optimizer(config)

    # What the field checks above do not cover, e.g. the band-stop ring geometry.
    built = {}
    for section, build in (("spatial", dual.create_spatial), ("frequency", dual.create_frequency)):
        try:
            built[section] = build(config)
        except ValueError as e:
            raise ConfigError(f"config.{section}: {e}") from None
    objective = None
    if s.enabled or f.enabled:
        try:
            objective = dual.create_objective(config, **built)
        except ValueError as e:
            raise ConfigError(f"config.objective: {e}") from None
    if r.enabled:
        try:
            create_representation(config)
        except ValueError as e:
            raise ConfigError(f"config.{e}") from None
    _check_training_probe(config)
    if num_devices is not None:
        inputs = [] if objective is None else [objective.num_views(config.batch_size)]
        if r.enabled:
            inputs.append(config.batch_size)  # the representation branch's images
        check_batch_split(config, num_devices, *[n // o.grad_accum_steps for n in inputs])
