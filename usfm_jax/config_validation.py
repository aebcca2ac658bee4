"""Checks a run config before anything is compiled, naming the offending field."""

from __future__ import annotations

import ml_collections

from usfm_jax.models.factory import DTYPES, encoder_dims
from usfm_jax.objectives import dual
from usfm_jax.parallel import mesh_shape


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def _require(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}={value!r}: {expected}")


def _one_of(config: ml_collections.ConfigDict, field: str, allowed: tuple) -> None:
    value = config
    for part in field.split("."):
        value = value[part]
    _require(value in allowed, field, value, f"expected one of {allowed}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError for the first invalid setting of a pre-training config."""
    size = tuple(config.image_size)
    _require(
        len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size),
        "image_size",
        config.image_size,
        "expected (height, width) of positive ints",
    )
    patch = config.model.patch_size
    _require(isinstance(patch, int) and patch > 0, "model.patch_size", patch, "expected an int > 0")
    _require(
        size[0] % patch == 0 and size[1] % patch == 0,
        "image_size",
        size,
        f"must be a multiple of config.model.patch_size={patch}",
    )
    for field in ("batch_size", "total_steps", "log_every"):
        _require(config[field] > 0, field, config[field], "expected > 0")
    _require(config.image_every >= 0, "image_every", config.image_every, "expected >= 0")

    m = config.model
    _one_of(config, "model.variant", ("beit", "vit"))
    _one_of(config, "model.rel_pos", ("shared", "per_block"))
    _one_of(config, "model.head", ("linear", "transformer"))
    _one_of(config, "model.dtype", tuple(DTYPES))
    _one_of(config, "model.in_chans", (1, 3))
    try:
        width, _, heads = encoder_dims(m)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(width % heads == 0, "model.width", width, f"must be divisible by num_heads={heads}")
    _require(0 <= m.drop_path_rate < 1, "model.drop_path_rate", m.drop_path_rate, "expected [0, 1)")

    s = config.spatial
    if s.enabled:
        _require(0 <= s.ratio < 1, "spatial.ratio", s.ratio, "mask ratio must be in [0, 1)")
        _require(
            s.mask_patch_size > 0 and s.mask_patch_size % patch == 0,
            "spatial.mask_patch_size",
            s.mask_patch_size,
            f"must be a positive multiple of config.model.patch_size={patch}",
        )
        _require(
            size[0] % s.mask_patch_size == 0 and size[1] % s.mask_patch_size == 0,
            "spatial.mask_patch_size",
            s.mask_patch_size,
            f"must divide config.image_size={size}",
        )
    f = config.frequency
    if f.enabled:
        _one_of(config, "frequency.kind", ("band_stop", "low_high_pass"))
        _one_of(config, "frequency.output", ("abs", "real"))
        if f.kind == "band_stop":
            _require(0 < f.ratio <= 1, "frequency.ratio", f.ratio, "expected (0, 1]")
    _require(
        s.enabled or f.enabled,
        "spatial.enabled",
        s.enabled,
        "at least one of spatial.enabled and frequency.enabled must be True",
    )

    o = config.optimizer
    _require(o.base_lr > 0, "optimizer.base_lr", o.base_lr, "expected > 0")
    _require(
        0 <= o.warmup_steps < config.total_steps,
        "optimizer.warmup_steps",
        o.warmup_steps,
        f"expected [0, total_steps={config.total_steps})",
    )
    _require(o.grad_accum_steps >= 1, "optimizer.grad_accum_steps", o.grad_accum_steps, ">= 1")
    _require(
        config.batch_size % o.grad_accum_steps == 0,
        "optimizer.grad_accum_steps",
        o.grad_accum_steps,
        f"must divide config.batch_size={config.batch_size}",
    )

    # What the field checks above do not cover, e.g. the band-stop ring geometry.
    built = {}
    for section, build in (("spatial", dual.create_spatial), ("frequency", dual.create_frequency)):
        try:
            built[section] = build(config)
        except ValueError as e:
            raise ConfigError(f"config.{section}: {e}") from None
    try:
        objective = dual.create_objective(config, **built)
    except ValueError as e:
        raise ConfigError(f"config.objective: {e}") from None
    if num_devices is not None:
        try:
            shape = mesh_shape(config.mesh, num_devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        shards = shape[0] * shape[1]
        views = objective.num_views(config.batch_size) // o.grad_accum_steps
        _require(
            config.batch_size % shards == 0 and views % shards == 0,
            "batch_size",
            config.batch_size,
            f"must split evenly over {shards} devices (per micro-batch of views too)",
        )
