"""What the command-line entry points share."""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections
from absl import flags

from usfm_jax import cpu_runtime, distributed


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line error for a bad ``--config.field=value`` override."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e).replace("\\n", " ").replace("\\", "").replace("'", "")
        sys.exit(f"error: invalid --config override: {message}")


def start_jax(distributed_mode: str = "off") -> None:
    """What a program does before its first JAX computation: the CPU runtime settings (some
    must precede the backend's start), then joining the distributed runtime per
    ``distributed_mode`` (``usfm_jax.distributed.MODES``)."""
    try:
        cpu_runtime.execute_inline()
    except ValueError as e:  # a bad USFM_CPU_RUNTIME
        sys.exit(f"error: {e}")
    distributed.initialize(distributed_mode)
    cpu_runtime.configure_for_backend()


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config of ``"path/to/config.py[:arg]"``, as ``--config=...`` would load it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    name = "usfm_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
