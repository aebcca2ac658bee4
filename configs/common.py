"""Helpers shared by config files."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses a config file's argument string ``"key=value,flag,..."`` against typed defaults.

    A bare ``flag`` sets a boolean default to True; unknown keys are an error, so a typo in
    ``--config=file.py:arg`` never passes silently.
    """
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            result[key] = True
        elif isinstance(default, bool):
            result[key] = value.lower() in ("1", "true", "yes")
        else:
            result[key] = type(default)(value)
    return result


def ablation_base(arg: str | None) -> ml_collections.ConfigDict:
    """The recipe an ablation modifies: the full ViT-B/16 one, or the CPU demo with ``demo``.

    ``--config=configs/ablations/spatial_only.py:demo`` runs an ablation at demo scale.
    """
    from configs.pretrain import demo, usfm_vitb16  # here: both import this module

    args = parse_arg(arg, demo=False)
    return demo.get_config() if args.demo else usfm_vitb16.get_config()
