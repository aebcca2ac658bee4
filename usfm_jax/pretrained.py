"""Pre-trained encoders for feature extraction: ``load_pretrained(path) -> VisionTransformer``.

``path`` may be a usfm_jax workdir, step directory or export, a PyTorch weights file in any
format of ``usfm_jax.convert`` (with or without its card), or a directory downloaded from a
model hub holding one (timm's ``config.json`` or open_clip's ``open_clip_config.json`` give the
input normalisation). The model has no head: ``model(images)`` returns the normalised tokens
[B, 1 + N, D], the cls token first. Feed it gray images in [0, 1], [B, H, W, 1], normalised with
``model.normalization`` ((x - mean) / std); a 3-channel model replicates them itself.
"""

from __future__ import annotations

import json
from typing import Any

from absl import logging
from etils import epath
from flax import nnx

from usfm_jax.convert import Architecture, ConversionError, Normalization, import_torch_weights
from usfm_jax.convert.adapt import adapt_encoder
from usfm_jax.convert.files import PICKLES, SAFETENSORS
from usfm_jax.convert.formats import flatten, unflatten
from usfm_jax.models.factory import DTYPES
from usfm_jax.models.vit import VisionTransformer
from usfm_jax.paths import as_path

# Weight files looked for in a hub directory, in this order.
HUB_WEIGHTS = ("*.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin", "*.pth", "*.pt")


def build_encoder(
    arch: Architecture,
    params: dict[str, Any],
    *,
    dtype: str = "float32",
    attention: str = "auto",
    norm: str = "auto",
) -> VisionTransformer:
    """An encoder of ``arch`` holding ``params`` (nested numpy arrays, our names)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {list(DTYPES)}")
    model = arch.build(dtype=DTYPES[dtype], attention=attention, norm=norm)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, unflatten(flatten(params)))  # block keys as ints
    nnx.update(model, state)
    return model


def load_pretrained(
    path: str,
    *,
    image_size: int | tuple[int, int] | None = None,
    dtype: str = "float32",
    attention: str = "auto",
    norm: str = "auto",
    step: int | None = None,
    weights: str = "auto",
    fmt: str = "auto",
    num_heads: int | None = None,
    input_normalization: str | Normalization | None = None,
) -> VisionTransformer:
    """The encoder stored at ``path`` (see the module doc), for inputs of ``image_size``
    (default: its own; position tables are resampled otherwise).

    Call it on float images [B, H, W, C], gray in [0, 1] then normalised with
    ``model.normalization`` (the input normalisation it expects): it returns the tokens
    [B, 1 + N, D] (cls first). ``step`` and ``weights`` ("params", "ema" or "auto") pick from a
    usfm_jax checkpoint; ``fmt``, ``num_heads`` and ``input_normalization`` (the one the
    weights were trained with) describe PyTorch weights (``usfm_jax.convert``), where a card
    beside them does not."""
    params, arch, normalization = load_encoder_weights(
        path,
        image_size=image_size,
        step=step,
        weights=weights,
        fmt=fmt,
        num_heads=num_heads,
        input_normalization=input_normalization,
    )
    model = build_encoder(arch, params, dtype=dtype, attention=attention, norm=norm)
    model.normalization = normalization
    return model


def load_encoder_weights(
    path: str,
    *,
    image_size: int | tuple[int, int] | None = None,
    step: int | None = None,
    weights: str = "auto",
    fmt: str = "auto",
    num_heads: int | None = None,
    input_normalization: str | Normalization | None = None,
) -> tuple[dict[str, Any], Architecture, Normalization]:
    """The encoder parameters at ``path`` (nested numpy arrays) for inputs of ``image_size``,
    their architecture and the input normalisation they expect (arguments as in
    ``load_pretrained``). What was not a one-to-one copy (position tables resampled, an input
    normalisation assumed, keys ignored) is logged, one line each."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    root = as_path(path)
    if not root.exists():
        raise ConversionError(f"no pre-trained model at {path}")
    torch_file = torch_weights_file(root)
    if torch_file is None:  # a usfm_jax checkpoint or export
        from usfm_jax.export import load_params

        if fmt != "auto" or num_heads is not None or input_normalization is not None:
            raise ConversionError(f"{path} is a usfm_jax checkpoint: fmt, num_heads and "
                                  "input_normalization describe PyTorch weights")  # fmt: skip
        loaded = load_params(path, step, weights)
        arch = Architecture.from_config(loaded.config["model"], loaded.config["image_size"])
        normalization = Normalization.from_json(loaded.config["normalization"])
        params, arch, notes = adapt_encoder(
            loaded.params["encoder"], arch, source=normalization, image_size=image_size
        )
    else:
        if step is not None or weights != "auto":
            raise ConversionError(f"{path} holds PyTorch weights: step and weights pick from a "
                                  "usfm_jax checkpoint")  # fmt: skip
        imported = import_torch_weights(
            torch_file,
            fmt,
            num_heads=num_heads,
            image_size=image_size,
            input_normalization=input_normalization or _hub_normalization(torch_file.parent),
        )
        params, arch, normalization = (
            imported.params["encoder"],
            imported.arch,
            imported.normalization,
        )
        notes = imported.notes
    for note in notes:  # what was not a one-to-one copy: resampled tables, assumptions
        logging.info("%s: %s", path, note)
    return params, arch, normalization


def torch_weights_file(root: epath.Path) -> epath.Path | None:
    """The PyTorch weights file that ``root`` is or holds, or None for a usfm_jax directory."""
    if root.is_file():
        if root.suffix not in (SAFETENSORS, *PICKLES):
            raise ConversionError(f"{root}: expected .safetensors, .pth, .pt or .bin weights")
        return root
    if any((root / name).exists() for name in ("params", "state", "checkpoints")) or any(
        root.glob("[0-9]*/state")
    ):
        return None
    for pattern in HUB_WEIGHTS:
        found = sorted(root.glob(pattern))
        if len(found) > 1:
            raise ConversionError(f"{root} holds several weights files {found}: name one")
        if found:
            return found[0]
    raise ConversionError(
        f"{root} is neither a usfm_jax checkpoint / export nor a directory with PyTorch weights"
    )


def _hub_normalization(directory: epath.Path) -> Normalization | None:
    """The input normalisation from a hub directory's timm or open_clip config, if any."""
    for name, section in (("config.json", "pretrained_cfg"), ("open_clip_config.json", None)):
        path = directory / name
        if not path.exists():
            continue
        try:
            cfg = json.loads(path.read_text())
        except ValueError as e:
            raise ConversionError(f"{path}: not a JSON config ({e})") from None
        cfg = cfg.get(section, {}) if section else cfg.get("preprocess_cfg", {})
        if "mean" in cfg and "std" in cfg:
            return Normalization.from_json(cfg)
    return None


__all__ = ["build_encoder", "load_encoder_weights", "load_pretrained"]
