"""Joining JAX's distributed runtime when a run spans several processes (hosts).

Three ways, chosen by ``--distributed`` (``initialize(mode)``):

- ``auto`` (default): if ``USFM_COORDINATOR`` (host:port), ``USFM_NUM_PROCESSES`` and
  ``USFM_PROCESS_ID`` are set, join that cluster (``launch/local/run.sh`` sets them); otherwise
  run as a single process.
- ``on``: ``jax.distributed.initialize()`` without arguments; JAX finds the cluster itself on
  Cloud TPU pods and slices, under SLURM ``srun`` and Open MPI (``launch/tpu``, ``launch/gpu``).
- ``off``: a single process, whatever the environment says.

Must run before anything touches a JAX backend.
"""

from __future__ import annotations

import os

import jax
from absl import logging

MODES = ("auto", "on", "off")
ENV = ("USFM_COORDINATOR", "USFM_NUM_PROCESSES", "USFM_PROCESS_ID")


class DistributedError(ValueError):
    """The multi-process settings are incomplete or malformed."""


def _explicit_settings() -> dict[str, object] | None:
    """jax.distributed.initialize's arguments from the USFM_* variables, or None if unset."""
    values = {name: os.environ.get(name, "").strip() for name in ENV}
    if not any(values.values()):
        return None
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise DistributedError(f"set all of {', '.join(ENV)} or none; missing {', '.join(missing)}")
    host, _, port = values["USFM_COORDINATOR"].rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(
            f"USFM_COORDINATOR={values['USFM_COORDINATOR']!r}: expected host:port"
        )
    try:
        count, index = int(values["USFM_NUM_PROCESSES"]), int(values["USFM_PROCESS_ID"])
    except ValueError as e:
        raise DistributedError(
            f"USFM_NUM_PROCESSES and USFM_PROCESS_ID must be integers: {e}"
        ) from e
    if not 0 <= index < count:
        raise DistributedError(f"USFM_PROCESS_ID={index} is not in [0, USFM_NUM_PROCESSES={count})")
    return dict(
        coordinator_address=values["USFM_COORDINATOR"], num_processes=count, process_id=index
    )


def initialize(mode: str = "auto") -> None:
    """Joins the distributed runtime as ``mode`` says (see the module docstring)."""
    if mode not in MODES:
        raise DistributedError(f"--distributed={mode!r}: expected one of {MODES}")
    if mode == "off":
        return
    settings = _explicit_settings()
    if settings is None and mode == "auto":
        return
    try:
        jax.distributed.initialize(**(settings or {}))
    except ValueError as e:  # on: JAX found no cluster to describe the processes
        if settings is not None:
            raise
        raise DistributedError(
            f"--distributed=on: JAX detects no cluster here ({e}). Run under a cluster JAX "
            "knows (Cloud TPU, SLURM, Open MPI), set USFM_COORDINATOR, USFM_NUM_PROCESSES and "
            "USFM_PROCESS_ID, or use --distributed=auto / off for one process"
        ) from e
    logging.info(
        "process %d of %d: %d local devices of %d (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
