"""PyTorch state-dict layouts of the encoder, and the exact maps between them and ours.

Formats (the keys are PyTorch's; our Flax parameters carry the same names):

* ``timm-beit``: ``timm.models.beit.Beit`` with one relative position table per block.
* ``usfm``: the released USFM_latest.pth layout: one shared table
  (``rel_pos_bias.relative_position_bias_table``) and ``mask_token``; it is also timm's Beit with
  ``use_shared_rel_pos_bias=True`` plus the ``mask_token`` key.
* ``timm-vit``: ``timm.models.vision_transformer.VisionTransformer`` (URFM's layout; the MAE
  decoder keys of URFM's released files are ignored).
* ``open-clip-visual`` (read only): the visual trunk of an open_clip checkpoint such as
  BiomedCLIP, ``visual.trunk.*`` (a timm ViT) plus the ``visual.head.proj`` projection.

Every map is a rename plus a transpose (Linear [out, in] <-> kernel [in, out]; Conv
[O, I, kh, kw] <-> [kh, kw, I, O]; LayerNorm weight <-> scale), so conversions are bit-exact.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from usfm_jax.models.vit import SIZES, VisionTransformer, mlp_ratio_of, relative_position_index

TO_TORCH = ("timm-beit", "usfm", "timm-vit")
FROM_TORCH = (*TO_TORCH, "open-clip-visual")
OPEN_CLIP_TRUNK, OPEN_CLIP_PROJ = "visual.trunk.", "visual.head.proj.weight"
# Heads of the standard ViT widths: a plain ViT's weights do not say how many it has.
STANDARD_HEADS = {width: heads for width, _, heads in SIZES.values() if width >= 192}


class ConversionError(ValueError):
    """A state dict or checkpoint that does not fit the asked format or architecture."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What fixes the shapes and the function of an encoder's weights."""

    variant: str  # "beit" (USFM / BEiT) or "vit" (timm's plain ViT)
    width: int
    depth: int
    num_heads: int
    patch_size: int
    in_chans: int
    image_size: tuple[int, int]
    mlp_ratio: float = 4.0
    rel_pos: str = "shared"  # BEiT only: "shared" or "per_block"

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    def replace(self, **changes: Any) -> Architecture:
        return dataclasses.replace(self, **changes)

    def build(
        self,
        *,
        dtype: Any = jnp.float32,
        attention: str = "auto",
        seed: int = 0,
        rngs: nnx.Rngs | None = None,
        **options: Any,
    ) -> VisionTransformer:
        """A freshly initialised encoder of this architecture; ``options`` are the encoder's
        training-time settings (drop_path_rate, remat, scan, mlp, norm)."""
        return VisionTransformer(
            variant=self.variant,
            image_size=self.image_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            rel_pos=self.rel_pos,
            attention=attention,
            dtype=dtype,
            rngs=rngs or nnx.Rngs(seed),
            **options,
        )

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The flat parameter names and shapes of this encoder (nothing is allocated)."""
        state = nnx.state(nnx.eval_shape(self.build), nnx.Param)
        return {name: tuple(x.shape) for name, x in flatten(nnx.to_pure_dict(state)).items()}

    @property
    def size(self) -> str | None:
        """The named size (``config.model.size``) of this width, depth and head count, if any."""
        dims = (self.width, self.depth, self.num_heads)
        return next((name for name, d in SIZES.items() if d == dims), None)

    def model_config(self) -> dict[str, Any]:
        """The ``config.model`` fields that build this encoder."""
        size = self.size
        if self.mlp_ratio != mlp_ratio_of(size):
            raise ConversionError(
                f"MLP ratio {self.mlp_ratio:g} is not that of a supported size "
                f"(4, or 48/11 for ViT-g/14)"
            )
        explicit = size is None
        return dict(
            variant=self.variant,
            size=size or "base",
            width=self.width if explicit else None,
            depth=self.depth if explicit else None,
            num_heads=self.num_heads if explicit else None,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            rel_pos=self.rel_pos,
        )

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Architecture:
        return cls(**{**d, "image_size": tuple(d["image_size"])})

    @classmethod
    def from_config(cls, model: Mapping[str, Any], image_size: Any) -> Architecture:
        """From a run's ``config.model`` (as saved in a checkpoint) and ``config.image_size``."""
        width, depth, heads = SIZES[model["size"]]
        return cls(
            variant=model["variant"],
            width=model.get("width") or width,
            depth=model.get("depth") or depth,
            num_heads=model.get("num_heads") or heads,
            patch_size=model["patch_size"],
            in_chans=model["in_chans"],
            image_size=tuple(image_size),
            mlp_ratio=mlp_ratio_of(model["size"]),
            rel_pos=model.get("rel_pos", "shared"),
        )


# ------------------------------------------------------------------------------------------
# Flat names
# ------------------------------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"blocks.0.attn.qkv.kernel": array, ...}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten`; numeric keys (block indices) become ints, as in
    ``nnx.to_pure_dict``."""
    tree: dict[Any, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = (int(k) if k.isdigit() else k for k in name.split("."))
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _torch_layout(name: str, ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """PyTorch's name for our parameter ``name`` and the transpose taking ours to theirs."""
    if name.endswith(".kernel"):
        axes = (3, 2, 0, 1) if ndim == 4 else (1, 0)  # Conv or Linear
        return name[: -len("kernel")] + "weight", axes
    if name.endswith(".scale"):  # LayerNorm
        return name[: -len("scale")] + "weight", None
    return name, None


def _flax_to_torch(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    torch_name, axes = _torch_layout(name, value.ndim)
    return torch_name, value if axes is None else np.ascontiguousarray(value.transpose(axes))


def _torch_to_flax(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if name.endswith(".weight"):
        base = name[: -len("weight")]
        if value.ndim == 1:
            return base + "scale", value
        axes = (2, 3, 1, 0) if value.ndim == 4 else (1, 0)
        return base + "kernel", np.ascontiguousarray(value.transpose(axes))
    return name, value


SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
BLOCK_TABLE = "blocks.{}.attn.relative_position_bias_table"


# ------------------------------------------------------------------------------------------
# Flax -> PyTorch
# ------------------------------------------------------------------------------------------


def to_torch(
    params: Mapping[str, Any], arch: Architecture, fmt: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Encoder parameters (nested, ours) -> (PyTorch state dict in ``fmt``, dropped names)."""
    if fmt not in TO_TORCH:
        raise ConversionError(f"cannot write format {fmt!r}: expected one of {TO_TORCH}")
    wanted = "vit" if fmt == "timm-vit" else "beit"
    if arch.variant != wanted:
        raise ConversionError(
            f"format {fmt} holds the {_LAYOUT[wanted]}; this checkpoint is the "
            f"{_LAYOUT[arch.variant]} (model.variant={arch.variant!r}): use "
            f"{'timm-vit' if arch.variant == 'vit' else 'timm-beit or usfm'}"
        )
    flat = flatten(params)
    _check_shapes(flat, arch.param_shapes(), "checkpoint")
    state = dict(_flax_to_torch(name, np.asarray(value)) for name, value in flat.items())
    dropped = []
    if fmt != "usfm":
        del state["mask_token"]  # SimMIM's; timm's models have none
        dropped.append("mask_token")
    if fmt == "usfm" and arch.rel_pos != "shared":
        raise ConversionError(
            "format usfm has one relative position table shared by all blocks; this model has "
            "one per block (model.rel_pos='per_block'): use timm-beit"
        )
    if fmt == "timm-beit" and arch.rel_pos == "shared":
        table = state.pop(SHARED_TABLE)
        state.update({BLOCK_TABLE.format(i): table for i in range(arch.depth)})
    return state, dropped


_LAYOUT = {
    "beit": "BEiT / USFM layout (relative position bias, q/v biases, layer scale)",
    "vit": "plain ViT layout (absolute position embedding, qkv bias)",
}


# ------------------------------------------------------------------------------------------
# PyTorch -> Flax
# ------------------------------------------------------------------------------------------


def detect_format(keys: Any) -> str | None:
    """The format a state dict's keys look like, or None."""
    keys = set(keys)
    if OPEN_CLIP_TRUNK + "cls_token" in keys:
        return "open-clip-visual"
    if SHARED_TABLE in keys:
        return "usfm"
    if BLOCK_TABLE.format(0) in keys:
        return "timm-beit"
    if "pos_embed" in keys and "blocks.0.attn.qkv.bias" in keys:
        return "timm-vit"
    return None


def from_torch(
    state_dict: Mapping[str, np.ndarray],
    fmt: str,
    num_heads: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> tuple[dict[str, Any], Architecture, list[str]]:
    """A PyTorch state dict in ``fmt`` -> (our nested encoder parameters, their architecture,
    notes on what was not a one-to-one copy). ``num_heads`` is needed for a plain ViT whose
    width is not a standard one, ``image_size`` (the size the weights were made for) when
    their grid of patches is not square."""
    if fmt not in FROM_TORCH:
        raise ConversionError(f"cannot read format {fmt!r}: expected one of {FROM_TORCH}")
    sd = {name: np.asarray(value) for name, value in state_dict.items()}
    notes: list[str] = []
    extra: dict[str, np.ndarray] = {}
    if fmt == "open-clip-visual":
        sd, extra, ignored = _open_clip_trunk(sd)
        if ignored:
            notes.append(f"ignored {ignored} keys outside the visual trunk (text tower, ...)")
        fmt = "timm-vit"
    if fmt == "timm-vit":  # an MAE checkpoint (URFM's release): the encoder is a timm ViT
        mae = [k for k in sd if k.startswith("decoder") or k == "mask_token"]
        if mae:
            sd = {k: v for k, v in sd.items() if k not in mae}
            notes.append(f"ignored {len(mae)} MAE decoder keys (decoder*, mask_token)")
    sd = _without_classifier(sd, notes)
    index_buffers = {k: sd.pop(k) for k in list(sd) if k.endswith(INDEX_BUFFER)}
    arch = _infer_architecture(sd, fmt, num_heads, image_size, notes)
    _check_index_buffers(index_buffers, arch, notes)
    flat = {}
    torch_name = {}
    for name, value in sd.items():
        new, converted = _torch_to_flax(name, value)
        flat[new], torch_name[new] = converted, name
    if fmt == "timm-beit":
        tables = [flat.get(BLOCK_TABLE.format(i)) for i in range(arch.depth)]
        if all(t is not None and np.array_equal(t, tables[0]) for t in tables):
            for i in range(arch.depth):
                del flat[BLOCK_TABLE.format(i)]
            flat[SHARED_TABLE] = tables[0]
            torch_name[SHARED_TABLE] = BLOCK_TABLE.format(0)
            notes.append("the per-block relative position tables are identical: kept as one")
        else:
            arch = arch.replace(rel_pos="per_block")
    if "mask_token" not in flat:
        flat["mask_token"] = np.zeros((1, 1, arch.width), np.float32)
        notes.append("mask_token is not in this format: initialised to zeros")
    _check_shapes(flat, arch.param_shapes(), f"{fmt} state dict", torch_name)
    return {"encoder": unflatten(flat), **extra}, arch, notes


# BEiT's and SimMIM's models save the index into the relative position table as a buffer
# (timm's do not); we compute it (models.vit.relative_position_index).
INDEX_BUFFER = "relative_position_index"


def _check_index_buffers(
    buffers: Mapping[str, np.ndarray], arch: Architecture, notes: list[str]
) -> None:
    """Drops saved position-index buffers after checking they index the table as we do: a
    file whose tokens are ordered otherwise would load into a silently different model."""
    if not buffers:
        return
    want = relative_position_index(arch.grid)
    for name, index in sorted(buffers.items()):
        if np.shape(index) != want.shape or not np.array_equal(index, want):
            raise ConversionError(
                f"{name} (shape {np.shape(index)}) is not the BEiT index of a {arch.grid} grid "
                f"of patches with a leading cls token (shape {want.shape}): this file's "
                "relative position table is laid out otherwise and cannot be read"
            )
    notes.append(f"ignored {len(buffers)} {INDEX_BUFFER} buffers (the index usfm_jax computes)")


def _without_classifier(sd: dict[str, np.ndarray], notes: list[str]) -> dict[str, np.ndarray]:
    """A timm classification checkpoint's encoder: its ImageNet head dropped (fine-tuning fits
    its own) and, where the model pools first and normalises after (``fc_norm``, with no final
    norm of each token: timm's mean-pooling Beit and ViT), ``fc_norm`` as the final norm."""
    sd = dict(sd)
    head = sorted(k for k in sd if k.startswith("head."))
    for k in head:
        del sd[k]
    if head:
        notes.append(f"ignored the classification head ({', '.join(head)})")
    fc_norm = {k.removeprefix("fc_norm."): sd.pop(k) for k in list(sd) if k.startswith("fc_norm.")}
    if fc_norm and any(k.startswith("norm.") for k in sd):
        notes.append("ignored fc_norm (a norm of the pooled tokens after the final norm)")
    elif fc_norm:
        sd.update({f"norm.{k}": v for k, v in fc_norm.items()})
        notes.append(
            "fc_norm (in timm a LayerNorm of the mean-pooled tokens, with no norm of each token) "
            "is the final norm of each token here: the tokens differ from timm's, the blocks "
            "are the same (a start for fine-tuning)"
        )
    return sd


def _open_clip_trunk(
    sd: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """The ``visual.trunk.`` keys without their prefix, the projection (as our ``projection``
    kernel [D, E]) and the number of other keys."""
    if OPEN_CLIP_TRUNK + "cls_token" not in sd:
        raise ConversionError(
            f"not an open_clip visual trunk: no key {OPEN_CLIP_TRUNK}cls_token "
            f"(keys start {_first_keys(sd)})"
        )
    trunk = {k[len(OPEN_CLIP_TRUNK) :]: v for k, v in sd.items() if k.startswith(OPEN_CLIP_TRUNK)}
    unread = [
        k
        for k in sd
        if k.startswith("visual.") and not k.startswith(OPEN_CLIP_TRUNK) and k != OPEN_CLIP_PROJ
    ]
    if unread:  # the image features would come out without them
        raise ConversionError(
            f"the visual tower has keys that are neither its trunk nor a linear projection "
            f"without bias ({_first_keys(dict.fromkeys(unread))}): not supported"
        )
    extra = {}
    if OPEN_CLIP_PROJ in sd:
        extra["projection"] = {"kernel": np.ascontiguousarray(sd[OPEN_CLIP_PROJ].T)}
    ignored = len(sd) - len(trunk) - len(extra)
    return trunk, extra, ignored


def _first_keys(sd: Mapping[str, Any], n: int = 3) -> str:
    return ", ".join(list(sd)[:n]) + (", ..." if len(sd) > n else "")


def _require_key(sd: Mapping[str, Any], key: str, fmt: str) -> np.ndarray:
    if key not in sd:
        found = detect_format(sd)
        hint = f"; it looks like {found}" if found and found != fmt else ""
        raise ConversionError(
            f"not a {fmt} state dict: no key {key!r}{hint} (keys start {_first_keys(sd)})"
        )
    return sd[key]


def heads_for(num_heads: int | None, card: Mapping[str, Any], source: str) -> int | None:
    """The number of heads of weights: the one given, else their card's; the two must agree."""
    carded = card.get("architecture", {}).get("num_heads")
    if num_heads is not None and carded is not None and num_heads != carded:
        raise ConversionError(f"{source}: num_heads={num_heads}, but its card says {carded}")
    return carded if num_heads is None else num_heads


def _infer_architecture(
    sd: Mapping[str, Any],
    fmt: str,
    num_heads: int | None,
    image_size: tuple[int, int] | None,
    notes: list[str],
) -> Architecture:
    """The architecture the weights' shapes tell; what they cannot tell and was assumed (a
    plain ViT's heads, a square grid) is added to ``notes``."""
    cls = _require_key(sd, "cls_token", fmt)
    proj = _require_key(sd, "patch_embed.proj.weight", fmt)
    fc1 = _require_key(sd, "blocks.0.mlp.fc1.weight", fmt)
    width, in_chans, patch = cls.shape[-1], proj.shape[1], proj.shape[-1]
    if num_heads is not None and (num_heads < 1 or width % num_heads):
        raise ConversionError(f"num_heads={num_heads}: expected a positive divisor of {width}")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    if fmt == "timm-vit":
        variant = "vit"
        key = "pos_embed"
        positions = _require_key(sd, key, fmt).shape[1] - 1  # patches
        heads = num_heads or STANDARD_HEADS.get(width)
        if heads is None:
            raise ConversionError(
                f"a plain ViT of width {width} does not say its number of heads: pass num_heads "
                "(convert: --num-heads; fine-tuning: --config.init_num_heads; a URFM teacher: "
                "--config.teacher.num_heads)"
            )
        if num_heads is None:  # the weights cannot tell, and a wrong guess loads silently
            notes.append(
                f"num_heads={heads} assumed (the standard for width {width}); if the weights "
                "were trained with another, pass it (convert: --num-heads)"
            )
    else:
        variant = "beit"
        key = SHARED_TABLE if fmt == "usfm" else BLOCK_TABLE.format(0)
        table = _require_key(sd, key, fmt)
        heads, positions = table.shape[1], table.shape[0] - 3  # (2 gh - 1)(2 gw - 1) offsets
        if num_heads is not None and num_heads != heads:
            raise ConversionError(f"num_heads={num_heads}, but {key} is for {heads} heads")
    if image_size is not None:
        grid = (image_size[0] // patch, image_size[1] // patch)
    else:  # a square grid, unless told otherwise
        side = math.isqrt(positions)
        grid = (side, side) if variant == "vit" else ((side + 1) // 2,) * 2
        if grid[0] * grid[1] > 1:  # 4x16 patches hold as many positions as 8x8
            notes.append(
                f"a square grid of {grid[0]}x{grid[1]} patches assumed "
                f"({grid[0] * patch}x{grid[1] * patch} images); if the weights were made for "
                "another shape, pass it (convert: --source-image-size HxW)"
            )
    made = Architecture(variant, width, depth, heads, patch, in_chans, (0, 0))
    expected = grid[0] * grid[1] if variant == "vit" else (2 * grid[0] - 1) * (2 * grid[1] - 1)
    if positions != expected:
        raise ConversionError(
            f"{key} of shape {tuple(sd[key].shape)} does not fit a {grid[0]}x{grid[1]} grid of "
            "patches (a square grid is assumed without a card naming the image size)"
        )
    return made.replace(
        image_size=(grid[0] * patch, grid[1] * patch), mlp_ratio=fc1.shape[0] / width
    )


def _check_shapes(
    flat: Mapping[str, Any], expected: Mapping[str, tuple], what: str, torch_name=None
) -> None:
    """Every expected parameter present with its shape and nothing else; the error names the
    first key that does not fit, in the source's names and layout (PyTorch's if
    ``torch_name`` maps our names to the source's)."""

    def source(key: str, shape: tuple) -> tuple[str, tuple]:
        if torch_name is None:
            return key, shape
        name, axes = _torch_layout(key, len(shape))
        return torch_name.get(key, name), shape if axes is None else tuple(shape[a] for a in axes)

    for key, shape in expected.items():
        name, want = source(key, shape)
        if key not in flat:
            raise ConversionError(f"{what} lacks {name!r} (shape {want})")
        if tuple(flat[key].shape) != shape:
            got = source(key, tuple(flat[key].shape))[1]
            raise ConversionError(f"{what}: {name!r} has shape {got}, expected {want}")
    for key in flat:
        if key not in expected:
            name = source(key, tuple(flat[key].shape))[0]
            raise ConversionError(f"{what} has an unexpected key {name!r}")
