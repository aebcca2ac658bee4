"""Checkpoints of a run: train state, data-iterator state and config, with orbax (async).

A run started in a workdir that holds checkpoints continues from the latest one: the state is
restored into abstract arrays that carry this run's shardings (so the device count may differ),
and the grain iterator into the exact next batch. The step's PRNG key is derived from the state,
so a resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    """Saves every ``config.checkpoint.every`` steps (and at the end), keeps the last ``keep``."""

    def __init__(self, workdir: str, cfg: ml_collections.ConfigDict):
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=cfg.every,
                max_to_keep=cfg.keep,
                enable_async_checkpointing=True,
            ),
        )

    def restore_latest(
        self, state: Any, shardings: Any, data: grain.DatasetIterator
    ) -> tuple[Any, bool]:
        """(restored state, True) from the latest checkpoint, or (``state``, False) if none.

        ``data`` is moved to the saved position in place.
        """
        step = self.manager.latest_step()
        if step is None:
            return state, False
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=grain.checkpoint.CheckpointRestore(data),
            ),
        )
        logging.info("resumed from %s, step %d", self.manager.directory, step)
        return restored.state, True

    def save(
        self,
        step: int,
        state: Any,
        data: grain.DatasetIterator,
        config: ml_collections.ConfigDict,
        *,
        force: bool = False,
    ) -> bool:
        """Saves if the interval (or ``force``) says so; returns whether a save started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data),
                config=ocp.args.JsonSave(config.to_dict()),
            ),
            force=force,
        )

    def close(self) -> None:
        """Waits for pending saves to finish."""
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionGuard:
    """Turns SIGTERM (a pre-emption notice) into a request to stop at the next step boundary.

    The train loop checks ``requested`` after each step, saves a checkpoint of that step, waits
    for it and returns normally, so the process exits 0 and the next run resumes there.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
