"""The JSON card written beside converted weights: what they are and how to load them.

A card says the architecture, the input the weights expect (size, channels, normalisation), the
timm class and arguments that build the matching PyTorch model, and for each loader the keys it
will report missing or unexpected, so that users can load with ``strict=True`` knowingly.
"""

from __future__ import annotations

import importlib
from typing import Any

from usfm_jax.convert.adapt import Normalization
from usfm_jax.convert.formats import Architecture

BEIT, VIT = "timm.models.beit.Beit", "timm.models.vision_transformer.VisionTransformer"


def timm_spec(arch: Architecture, fmt: str) -> dict[str, Any]:
    """The timm class and keyword arguments of the encoder (no classifier, cls-token features
    after the final norm), as loadable with ``strict=True`` from ``fmt`` (see the loaders)."""
    kwargs: dict[str, Any] = dict(
        img_size=list(arch.image_size),
        patch_size=arch.patch_size,
        in_chans=arch.in_chans,
        num_classes=0,
        global_pool="token",
        embed_dim=arch.width,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
    )
    if arch.variant == "vit":
        return {"class": VIT, "kwargs": {**kwargs, "qkv_bias": True}}
    shared = fmt == "usfm"
    kwargs.update(
        use_abs_pos_emb=False,
        use_rel_pos_bias=not shared,
        use_shared_rel_pos_bias=shared,
        init_values=0.1,  # layer scale present; its values come from the weights
    )
    return {"class": BEIT, "kwargs": kwargs}


def loaders(fmt: str) -> dict[str, dict[str, Any]]:
    """Per loader: what ``load_state_dict(strict=False)`` reports and what to do about it."""
    timm = {"missing": [], "unexpected": [], "how": "model.load_state_dict(sd, strict=True)"}
    if fmt != "usfm":
        return {"timm (card's class and kwargs)": timm}
    return {
        "timm (card's class and kwargs)": {
            "missing": [],
            "unexpected": ["mask_token"],
            "how": "sd.pop('mask_token'); model.load_state_dict(sd, strict=True)",
        },
        "USFM's PyTorch code (official loader)": {
            "missing": [],
            "unexpected": [],
            "how": "as released USFM_latest.pth: the shared table is copied into every block",
        },
    }


def make_card(
    *,
    fmt: str,
    arch: Architecture,
    normalization: Normalization,
    dropped: list[str],
    adapted: list[str],
    source: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format": fmt,
        "architecture": arch.to_json(),
        "image_size": list(arch.image_size),
        "in_chans": arch.in_chans,
        "normalization": normalization.for_channels(arch.in_chans).to_json(),
        "input": (
            "gray image scaled to [0, 1], "
            + (f"repeated to {arch.in_chans} channels, " if arch.in_chans > 1 else "one channel, ")
            + "then (x - mean) / std per channel"
        ),
        "timm": timm_spec(arch, fmt),
        "loaders": loaders(fmt),
        "not_converted": dropped,
        "adapted": adapted,
        "source": source,
    }


def build_timm_model(card: dict[str, Any]) -> Any:
    """The (randomly initialised) timm model that the card's weights load into."""
    module, name = card["timm"]["class"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**card["timm"]["kwargs"])
