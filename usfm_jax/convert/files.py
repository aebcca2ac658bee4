"""Reading and writing PyTorch state dicts (safetensors or torch pickles) and their cards."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from usfm_jax.convert.formats import ConversionError
from usfm_jax.paths import as_path

# Where training scripts nest the weights inside a saved dict (URFM: 'ema_state_dict'), in the
# order they are taken: EMA weights first where a file also holds the raw ones, as timm's
# load_state_dict(use_ema=True) does (the released weights of MAE, BEiT and URFM are the EMA's).
NESTED_KEYS = (
    "ema_state_dict", "model_ema", "state_dict_ema", "state_dict", "model", "module", "params"
)  # fmt: skip
SAFETENSORS = ".safetensors"
PICKLES = (".pth", ".pt", ".bin")


def card_path(weights: str | epath.Path) -> epath.Path:
    """The card beside a weights file: ``model.safetensors`` -> ``model.json``."""
    path = as_path(weights)
    return path.with_suffix(".json")


def check_weights_name(path: str | epath.Path) -> epath.Path:
    """``path`` as a path, if its suffix names a weights format we write."""
    path = as_path(path)
    if path.suffix not in (SAFETENSORS, *PICKLES):
        raise ConversionError(
            f"--out {path}: name it *.safetensors (the default choice) or *.pth / *.pt / *.bin"
        )
    return path


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: str | epath.Path) -> None:
    """Writes ``state_dict`` as safetensors (``.safetensors``) or a torch pickle (``.pth``)."""
    path = check_weights_name(path)
    arrays = {name: np.ascontiguousarray(value) for name, value in state_dict.items()}
    if path.suffix == SAFETENSORS:
        from safetensors.numpy import save

        path.write_bytes(save(arrays, metadata={"format": "pt"}))  # "pt": loadable by timm / HF
    else:
        import torch

        with path.open("wb") as f:
            torch.save({name: torch.from_numpy(value) for name, value in arrays.items()}, f)


def read_state_dict(
    path: str | epath.Path, notes: list[str] | None = None
) -> dict[str, np.ndarray]:
    """A flat state dict as numpy arrays, from safetensors or a torch pickle (read with
    ``weights_only=True``: no code runs). Weights nested under a training script's key
    (``NESTED_KEYS``: the EMA's first) or prefixed 'module.' are unwrapped, and floating-point
    weights (fp16 and bf16 releases too) come as float32: the parameters that training and
    fine-tuning update are float32 whatever the compute dtype. Where a file holds several sets
    of weights, ``notes`` (if given) gets which one was read."""
    path = as_path(path)
    if not path.exists():
        raise ConversionError(f"no weights file at {path}")
    try:
        if path.suffix == SAFETENSORS:  # through torch: numpy has no bfloat16
            from safetensors.torch import load

            obj = load(path.read_bytes())
        else:
            import torch

            with path.open("rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except Exception as e:  # unreadable: name the file and the reason in one line
        raise ConversionError(f"cannot read {path} as PyTorch weights: {_reason(e)}") from e
    return _as_state_dict(obj, str(path), [] if notes is None else notes)


def _as_state_dict(obj: Any, source: str, notes: list[str]) -> dict[str, np.ndarray]:
    while isinstance(obj, Mapping) and not _is_flat(obj):
        found = [k for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)]
        nested = found[0] if found else None
        if len(found) > 1:
            notes.append(
                f"the file holds weights under {', '.join(map(repr, found))}: read "
                f"{nested!r}" + (" (the EMA's)" if "ema" in nested else "")
            )
        if nested is None:
            raise ConversionError(
                f"{source} is not a state dict: a dict of {len(obj)} entries "
                f"({', '.join(map(str, list(obj)[:4]))}) that are not all tensors and none of "
                f"{NESTED_KEYS} holding one"
            )
        obj = obj[nested]
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{source} is not a state dict: it holds a {type(obj).__name__}")
    out = {}
    for name, tensor in obj.items():
        name = name[len("module.") :] if name.startswith("module.") else name
        if tensor.is_floating_point():
            tensor = tensor.float()
        out[name] = tensor.detach().cpu().numpy()
    return out


def _is_flat(obj: Mapping) -> bool:
    import torch

    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def write_card(card: Mapping[str, Any], weights: str | epath.Path) -> epath.Path:
    path = card_path(weights)
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def write_weights_and_card(
    state_dict: Mapping[str, np.ndarray], card: Mapping[str, Any], weights: epath.Path
) -> None:
    """Writes both, or neither: a failed write (a full disk, a read-only mount) is a
    ConversionError, and what it had begun is removed (the files did not exist before)."""
    try:
        write_state_dict(state_dict, weights)
        write_card(card, weights)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        for path in (weights, card_path(weights)):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise ConversionError(f"cannot write {weights}: {reason}") from e


def read_card(weights: str | epath.Path) -> dict[str, Any] | None:
    """The card beside ``weights``, if there is one."""
    path = card_path(weights)
    if not path.exists():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read the card {path} of {weights}: {e}") from e
    if not isinstance(card, dict):
        raise ConversionError(f"the card {path} of {weights} is not a JSON object")
    return card


def _reason(error: Exception) -> str:
    """Why torch.load (weights_only) failed, in one line, without PyTorch's advice to load
    with ``weights_only=False``: that runs arbitrary code from the file."""
    text = str(error).strip()
    if "Weights only load failed" in text and "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:")[1].split("Check the documentation")[0]
        detail = " ".join(detail.split()).split(". Please use")[0]
        if detail.startswith("Unsupported global"):
            return (
                f"it holds Python objects besides tensors ({detail}), which are not loaded, "
                "for safety; save the state dict alone, e.g. torch.save(ckpt['model'], path) "
                "(or the EMA weights' entry, where there is one)"
            )
        return f"not a PyTorch weights file ({detail})"
    if isinstance(error, KeyError):  # the unpickler met a byte that starts no opcode
        return f"not a PyTorch weights file (unknown pickle opcode {text})"
    return text.splitlines()[0] if text else type(error).__name__
