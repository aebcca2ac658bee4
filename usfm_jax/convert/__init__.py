"""Conversion between usfm_jax checkpoints and PyTorch weights (timm, USFM, open_clip).

    python -m usfm_jax.convert to-torch --checkpoint WORKDIR_OR_STEP --format timm-beit --out F
    python -m usfm_jax.convert from-torch --weights FILE --format usfm --out DIR

The formats and their maps are in ``formats``; input adaptation (channels, normalisation,
image size) in ``adapt``; file I/O in ``files``; the card beside each file in ``cards``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from etils import epath

from usfm_jax.convert.adapt import Normalization, adapt_encoder, parse_normalization
from usfm_jax.convert.cards import make_card
from usfm_jax.convert.files import (
    card_path,
    check_weights_name,
    read_card,
    read_state_dict,
    write_weights_and_card,
)
from usfm_jax.convert.formats import (
    FROM_TORCH,
    TO_TORCH,
    Architecture,
    ConversionError,
    detect_format,
    from_torch,
    heads_for,
    to_torch,
)
from usfm_jax.paths import PathError, new_file

__all__ = [
    "FROM_TORCH",
    "TO_TORCH",
    "Architecture",
    "ConversionError",
    "Imported",
    "Normalization",
    "checkpoint_to_torch",
    "import_torch_weights",
    "torch_to_export",
    "weights_normalization",
]

# What each format's own pipeline normalises with (the USFM code and open_clip's BiomedCLIP).
FORMAT_DEFAULTS: dict[str, dict[str, Any]] = {
    "usfm": dict(normalization="imagenet", in_chans=3),
    "open-clip-visual": dict(normalization="clip"),
}
# Our pre-training configs' normalisation of the gray image; imports that cannot keep theirs
# (one mean / std per channel) are re-expressed for this one.
DEFAULT_NORMALIZATION = Normalization((0.5,), (0.25,))


def _normalization(value: str | Normalization | None) -> Normalization | None:
    if value is None or isinstance(value, Normalization):
        return value
    try:
        return parse_normalization(value)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def weights_normalization(
    fmt: str, card: dict[str, Any], given: str | Normalization | None, notes: list[str]
) -> Normalization:
    """The input normalisation PyTorch weights were trained with: ``given``, else their
    card's, else their format's pipeline's (timm formats: ImageNet's, assumed and noted)."""
    source = _normalization(given)
    if source is None and "normalization" in card:
        source = Normalization.from_json(card["normalization"])
    if source is None:
        default = FORMAT_DEFAULTS.get(fmt, {}).get("normalization", "imagenet")
        if fmt not in FORMAT_DEFAULTS:
            notes.append(f"input normalisation not given: {default}'s assumed")
        source = parse_normalization(default)
    return source


def _adapt(params, arch, **kw) -> tuple[dict[str, Any], Architecture, list[str]]:
    try:
        return adapt_encoder(params, arch, **kw)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def checkpoint_to_torch(
    checkpoint: str,
    fmt: str,
    out: str,
    *,
    step: int | None = None,
    image_size: tuple[int, int] | None = None,
    in_chans: int | None = None,
    normalization: str | Normalization | None = None,
    weights: str = "auto",
) -> dict[str, Any]:
    """Writes the encoder of a checkpoint or export as a PyTorch state dict in ``fmt`` (file
    type from ``out``'s suffix) with its card beside it; returns the card. Unless given, the
    channels and normalisation are the checkpoint's (``usfm``: 3 channels, ImageNet's, as
    USFM's own code feeds its model); the weights are the EMA ones where the run kept them,
    unless ``weights`` says "params"."""
    from usfm_jax.export import load_params  # orbax: only for this direction

    if fmt not in TO_TORCH:
        raise ConversionError(f"--format {fmt!r}: to-torch writes one of {TO_TORCH}")
    destination = check_weights_name(out)
    try:
        new_file(out, "--out")
    except PathError as e:
        raise ConversionError(str(e)) from None
    if (card := card_path(destination)).exists():  # m.safetensors and m.pth share m.json
        raise ConversionError(
            f"--out {out}: its card would be {card}, which exists (another file's card?); "
            "choose another file name"
        )
    loaded = load_params(checkpoint, step, weights)
    if "encoder" not in loaded.params:
        raise ConversionError(f"{loaded.source} holds no encoder (keys {sorted(loaded.params)})")
    config = loaded.config
    arch = Architecture.from_config(config["model"], config["image_size"])
    source = Normalization.from_json(config["normalization"])
    defaults = FORMAT_DEFAULTS.get(fmt, {})
    target = _normalization(normalization or defaults.get("normalization")) or source
    chans = in_chans or defaults.get("in_chans") or arch.in_chans
    if normalization is None and len(target.mean) not in (1, chans):
        raise ConversionError(
            f"--in-chans {chans}: the normalisation {fmt} defaults to "
            f"({defaults.get('normalization', 'the checkpoint')}'s) has {len(target.mean)} "
            f"channels; pass --normalization for {chans} channel(s), e.g. 0.5/0.25"
        )
    params, arch, adapted = _adapt(
        loaded.params["encoder"],
        arch,
        source=source,
        target=target,
        in_chans=in_chans or defaults.get("in_chans"),
        image_size=image_size,
    )
    state, dropped = to_torch(params, arch, fmt)
    dropped += [f"{key}.* (not the encoder's)" for key in loaded.params if key != "encoder"]
    card = make_card(
        fmt=fmt,
        arch=arch,
        normalization=target,
        dropped=dropped,
        adapted=adapted,
        source={"checkpoint": loaded.source, "step": loaded.step, "weights": loaded.weights},
    )
    write_weights_and_card(state, card, destination)
    return card


class Imported(NamedTuple):
    params: dict[str, Any]  # {"encoder": nested numpy arrays, "projection": ... if any}
    arch: Architecture
    normalization: Normalization  # of the gray input, one mean / std
    notes: list[str]
    format: str
    step: int


class TorchWeights(NamedTuple):
    """PyTorch weights read as our parameters, before any adaptation."""

    params: dict[str, Any]  # {"encoder": ..., "projection"?: ...}
    arch: Architecture
    normalization: Normalization  # the input normalisation they were trained with
    format: str
    card: dict[str, Any]  # the card beside the file ({} if none)
    notes: list[str]


def read_torch_weights(
    weights: str | epath.Path,
    fmt: str = "auto",
    *,
    num_heads: int | None = None,
    source_image_size: tuple[int, int] | None = None,
    normalization: str | Normalization | None = None,
    formats: tuple[str, ...] = FROM_TORCH,
) -> TorchWeights:
    """PyTorch weights (a file, or a directory with its card) in one of ``formats`` ("auto":
    the card's, else detected from the keys), with the input normalisation they were trained
    with: ``normalization``, else their card's, else the format's pipeline's. Without a card,
    ``num_heads`` and ``source_image_size`` (the size they were made for) say what the shapes
    cannot: the heads of a plain ViT, a grid of patches that is not square."""
    notes: list[str] = []
    sd = read_state_dict(weights, notes)
    card = read_card(weights) or {}
    if fmt == "auto":
        fmt = card.get("format") or detect_format(sd)
        if fmt is None:
            raise ConversionError(
                f"{weights}: not a state dict of a known format {formats} "
                f"(keys start {', '.join(list(sd)[:3])}); pass the format"
            )
    if fmt not in formats:
        raise ConversionError(f"{weights}: format {fmt!r}; expected one of {formats}")
    carded = card.get("architecture", {}).get("image_size")  # exact where the file has a card
    if source_image_size and carded and tuple(source_image_size) != tuple(carded):
        raise ConversionError(
            f"{weights}: source image size {source_image_size}, but its card says {carded}"
        )
    heads = heads_for(num_heads, card, str(weights))
    params, arch, more = from_torch(sd, fmt, heads, carded or source_image_size)
    notes += more
    source = weights_normalization(fmt, card, normalization, notes)
    return TorchWeights(params, arch, source, fmt, card, notes)


def import_torch_weights(
    weights: str | epath.Path,
    fmt: str = "auto",
    *,
    num_heads: int | None = None,
    source_image_size: tuple[int, int] | None = None,
    image_size: tuple[int, int] | None = None,
    in_chans: int | None = None,
    input_normalization: str | Normalization | None = None,
    normalization: str | Normalization | None = None,
) -> Imported:
    """PyTorch weights as our encoder parameters, adapted to one normalisation of the gray
    input (``normalization``; default: the weights' own if it is one mean / std, else ours).

    The weights' own normalisation is ``input_normalization``, else their card's, else the
    format's pipeline's (usfm: ImageNet, open-clip-visual: CLIP); for timm formats without a
    card, ImageNet's is assumed and noted."""
    params, arch, source, fmt, card, notes = read_torch_weights(
        weights,
        fmt,
        num_heads=num_heads,
        source_image_size=source_image_size,
        normalization=input_normalization,
    )
    if len(source.mean) not in (1, arch.in_chans):
        raise ConversionError(
            f"{weights}: the weights take {arch.in_chans} channel(s), but the input "
            f"normalisation assumed for them has {len(source.mean)} ({source.to_json()}). Give "
            "the one they were trained with: --input-normalization / input_normalization= / "
            "config.init_normalization, e.g. 0.5/0.25 (or keep the card beside the weights)"
        )
    target = _normalization(normalization)
    if target is None:
        target = source if source.is_uniform else DEFAULT_NORMALIZATION
    if not target.is_uniform:
        raise ConversionError(
            f"normalization {target.to_json()}: usfm_jax models take one mean and std for the "
            "gray image"
        )
    target = Normalization(target.mean[:1], target.std[:1])
    encoder, arch, adapted = _adapt(
        params["encoder"],
        arch,
        source=source,
        target=target,
        in_chans=in_chans,
        image_size=image_size,
    )
    step = int(card.get("source", {}).get("step", 0))
    notes = notes + adapted
    return Imported({**params, "encoder": encoder}, arch, target, notes, fmt, step)


def torch_to_export(weights: str, fmt: str, out: str, **options: Any) -> dict[str, Any]:
    """Writes PyTorch weights as an export directory (``params/``, ``config.json``,
    ``export.json``) that ``usfm_jax.export.load_params`` and ``load_pretrained`` read."""
    from usfm_jax.export import check_new_directory, write_export

    check_new_directory(out)
    imported = import_torch_weights(weights, fmt, **options)
    config = {
        "model": imported.arch.model_config(),
        "image_size": list(imported.arch.image_size),
        "normalization": {
            "mean": imported.normalization.mean[0],
            "std": imported.normalization.std[0],
        },
    }
    return write_export(
        out,
        imported.params,
        config,
        source=str(weights),
        format=imported.format,
        step=imported.step,
        notes=imported.notes,
    )
