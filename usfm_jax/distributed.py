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

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from usfm_jax.checkpoint import config_changes

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


def check_same_run(run: dict[str, Any]) -> None:
    """Raises DistributedError on every process unless every process was given the same
    ``run`` (its config, workdir, ...: what the command line says). A host started with
    another command would otherwise train replicated parameters of its own, unnoticed, or
    wait forever in a collective the others never reach. Each process calls it."""
    if jax.process_count() == 1:
        return
    mine = np.frombuffer(json.dumps(run, sort_keys=True, default=str).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(mine.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: mine.size] = mine
    every = np.asarray(multihost_utils.process_allgather(padded))  # [processes, bytes]
    runs = [json.loads(row[:size].tobytes()) for row, size in zip(every, sizes, strict=True)]
    differing = [(i, config_changes(runs[0], r)) for i, r in enumerate(runs) if r != runs[0]]
    if differing:
        shown = "; ".join(f"process {i}: {', '.join(c[:3])}" for i, c in differing[:3])
        raise DistributedError(
            f"{len(differing)} of {len(runs)} processes were started with another command "
            f"than process 0 ({shown}{'; ...' if len(differing) > 3 else ''}): give every "
            "process the same config, overrides and flags"
        )
