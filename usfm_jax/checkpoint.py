"""Checkpoints of a run: train state, data-iterator state and config, with orbax (async).

A run started in a workdir that holds checkpoints continues from the newest usable one: the state
is restored into abstract arrays that carry this run's shardings (so the device count may
differ), and the grain iterator to the exact next batch. The step's PRNG key is derived from the
state, so a resumed run draws the same masks and batches as an uninterrupted one.

Each checkpoint also holds a fingerprint of every array (a position-weighted wrapping sum of its
bits), checked after restoring: a truncated or bit-flipped checkpoint is reported by name and set
aside (moved, never deleted), and the one before it is used.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from usfm_jax.paths import as_path

_policies = ocp.checkpoint_managers
UNUSABLE_DIR = "unusable_checkpoints"  # where corrupt checkpoints are moved, beside checkpoints/


class CheckpointError(RuntimeError):
    """No checkpoint in the workdir can be used; the message says why."""


class IncompatibleCheckpoint(CheckpointError):
    """The checkpoint was written by a run with other parameter shapes (another model/optimizer)."""


class CorruptCheckpoint(CheckpointError):
    """The checkpoint's contents differ from what was saved."""


def named_leaves(tree: Any) -> dict[str, Any]:
    """{dotted name: leaf} of a pytree (a train state, or orbax's metadata of one)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): x for p, x in leaves}


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """uint32: sum over elements of bits * (2 * flat_index + 1), wrapping. Any single changed bit
    or zeroed run changes it, and integer sums are exact whatever the sharding."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = jnp.dtype(f"uint{x.dtype.itemsize * 8}")
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(x.ndim)):  # flat index without a reshape (keeps the sharding)
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * np.uint32(stride)
        stride *= x.shape[dim]
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


_fingerprints = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprint(tree: Any) -> dict[str, int]:
    """{leaf name: uint32 fingerprint} of every array in ``tree``, computed on device."""
    sums = named_leaves(_fingerprints(tree))
    return {name: int(np.asarray(x.addressable_data(0))) for name, x in sums.items()}


def check_fingerprint(tree: Any, saved: dict[str, int], where: str) -> None:
    """Raises CorruptCheckpoint naming the arrays of ``tree`` whose fingerprint differs."""
    bad = [name for name, value in fingerprint(tree).items() if saved.get(name) != value]
    if bad:
        raise CorruptCheckpoint(
            f"{len(bad)} array(s) of {where} differ from their saved fingerprint (first: {bad[0]})"
        )


# A checkpoint read's outcome on one process, worst last.
_READ, _DAMAGED, _ENVIRONMENT = 0, 1, 2


def _every_process(value: int) -> np.ndarray:
    """[processes]: every process's ``value`` (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return np.asarray([value])
    return np.asarray(multihost_utils.process_allgather(np.asarray(value))).reshape(-1)


def this_process_alone() -> ocp.options.MultiprocessingOptions:
    """Orbax options for reads and writes by the calling process alone: no barrier waits for
    the other processes (which may never reach it)."""
    return ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()}
    )


def _item_handlers() -> dict[str, Any]:
    """What a checkpoint holds, by item."""
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "fingerprint": ocp.JsonCheckpointHandler(),
    }


# Status codes (TensorStore's, XLA's, gRPC's) of failures of the reader, not of what it reads: a
# busy or unreachable bucket, a missing permission, no memory. Setting a checkpoint aside for one
# of these would throw away the run's progress.
_ENVIRONMENT_CODES = re.compile(
    r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|PERMISSION_DENIED|UNAUTHENTICATED|RESOURCE_EXHAUSTED"
    r"|CANCELLED|ABORTED)\b|Out of memory"
)


def is_environment_failure(error: BaseException) -> bool:
    """Whether ``error`` (or its cause, or one of a group) is a problem of the machine or the
    store, not damage."""
    seen, pending = set(), [error]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, (MemoryError, PermissionError, TimeoutError, ConnectionError)):
            return True
        if _ENVIRONMENT_CODES.search(str(error)):
            return True
        pending += [error.__cause__, error.__context__]
        pending += list(error.exceptions) if isinstance(error, BaseExceptionGroup) else []
    return False


def describe_error(error: BaseException) -> str:
    """One line about ``error`` for a warning (TensorStore's messages run to pages)."""
    lines = str(error).strip().splitlines()
    first = lines[0].split(" See full TensorStore details")[0] if lines else ""
    text = f"{type(error).__name__}: {first}"
    # long ones nest the cause last ("...: Failed to write ...: File too large"): keep both ends
    text = text if len(text) <= 300 else f"{text[:120]} ... {text[-170:]}"
    code = re.search(r"\[os_error_code='(\d+)'\]", first)  # TensorStore's errno, said in words
    return f"{text}: {os.strerror(int(code.group(1)))}" if code else text


def drop_closed_event_loop_noise() -> None:
    """When a restore fails, TensorStore reads still in flight complete onto orbax's closed
    event loop, each printing an 'Event loop is closed' traceback; orbax's other read
    coroutines, closed unfinished, raise again; and its failed read tasks, collected later,
    are logged by asyncio as 'Task exception was never retrieved' (in the middle of the run
    that goes on from an older checkpoint): tracebacks around the error or warning that says
    what is damaged. Drops exactly those, process-wide; installed once."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_event_loop_noise", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
        if not (closed_loop or (code is not None and _is_orbax(code.co_filename))):
            previous(unraisable)

    def orbax_task_noise(record: std_logging.LogRecord) -> bool:
        message = record.getMessage()
        unretrieved = message.startswith("Task exception was never retrieved")
        return not (unretrieved and _is_orbax(message.partition("\n")[2].partition(">")[0]))

    hook.drops_closed_event_loop_noise = True
    sys.unraisablehook = hook
    std_logging.getLogger("asyncio").addFilter(orbax_task_noise)


def _is_orbax(where: str) -> bool:
    """Whether a source path (or a task's repr) is orbax's."""
    return f"{os.sep}orbax{os.sep}" in where


class Checkpointer:
    """Saves every ``cfg.every`` steps, at the first step of a fresh run (an unwritable directory
    shows at once) and on pre-emption; keeps the last ``cfg.keep`` plus every multiple of
    ``cfg.keep_every`` (if > 0). Saves are asynchronous: training continues while they write."""

    def __init__(self, workdir: str, cfg: ml_collections.ConfigDict):
        self._written = False  # whether a save of this invocation has completed
        self.directory = as_path(workdir) / "checkpoints"
        self.unusable_directory = as_path(workdir) / UNUSABLE_DIR
        preserve = [_policies.LatestN(cfg.keep)]
        if cfg.keep_every:
            preserve.append(_policies.EveryNSteps(cfg.keep_every))
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers=_item_handlers(),
            options=ocp.CheckpointManagerOptions(
                save_decision_policy=_policies.AnySavePolicy(
                    [
                        _policies.InitialSavePolicy(),
                        _policies.FixedIntervalPolicy(cfg.every),
                        _policies.PreemptionCheckpointingPolicy(),
                    ]
                ),
                preservation_policy=_policies.AnyPreservationPolicy(preserve),
                cleanup_tmp_directories=True,  # what a save killed midway left behind
                enable_async_checkpointing=True,
            ),
        )
        # Reads by this process alone: orbax's restore ends in a barrier of all processes, which
        # a process whose read failed never reaches (the others then hang, or meet it in a
        # collective of another shape and abort). Processes agree on a read's outcome after it.
        self.reader = ocp.CheckpointManager(
            self.directory,
            item_handlers=_item_handlers(),
            options=ocp.CheckpointManagerOptions(
                create=False,  # never saves through (orbax's read_only warns at every start)
                multiprocessing_options=this_process_alone(),
            ),
        )

    def step_path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def restore_latest(
        self,
        state: Any,
        shardings: Any,
        make_data: Callable[[int], grain.DatasetIterator],
        config: ml_collections.ConfigDict | None = None,
    ) -> tuple[Any, grain.DatasetIterator]:
        """(state, data iterator) at the newest usable checkpoint, or (``state``,
        ``make_data(0)``) if there is none. ``make_data(step)`` opens this process's data
        stream at a global step; the saved iterator position is restored into
        ``make_data(0)``, unless the checkpoint was written by another number of processes or
        another ``config.data``:
        then the stream is opened at the restored step (global batches do not depend on the
        process count). A ``config`` that differs from the one the checkpoint was written with
        is logged, field by field: a resumed run may change its length or data on purpose, but
        never unnoticed.

        Unreadable or corrupt checkpoints are reported, skipped and moved to
        ``unusable_checkpoints/``; one written for other parameter shapes is an error, and so
        is a read that fails for want of memory, permission or a reachable store (the
        checkpoint is then left where it is).
        """
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
        data = make_data(0)
        try:
            restored = self._restore_newest_usable(target, data, make_data, config)
        except BaseException:
            data.close()  # its worker processes, if any
            raise
        return restored or (state, data)

    def _restore_newest_usable(
        self,
        target: Any,
        data: grain.DatasetIterator,
        make_data: Callable[[int], grain.DatasetIterator],
        config: ml_collections.ConfigDict | None,
    ) -> tuple[Any, grain.DatasetIterator] | None:
        """(state, data) at the newest usable checkpoint; None if there is none."""
        unusable = []
        drop_closed_event_loop_noise()  # a damaged checkpoint's warning comes alone
        for step in sorted(self.reader.all_steps(), reverse=True):
            try:
                self._check_compatible(step, target, config)
                restored, failure, outcome = self._read(step, target), None, _READ
            except IncompatibleCheckpoint:
                raise
            except Exception as e:  # anything unreadable: fall back to the one before
                restored, failure = None, e
                outcome = _ENVIRONMENT if is_environment_failure(e) else _DAMAGED
            problem = None if failure is None else describe_error(failure)
            worst = int(_every_process(outcome).max())  # all processes take the same checkpoint
            if worst == _ENVIRONMENT:  # not damage: keep it, and every newer one
                raise CheckpointError(
                    f"could not read checkpoint {self.step_path(step)} "
                    f"({problem if outcome == _ENVIRONMENT else 'failed on another process'}): "
                    "a problem of this machine or the storage (memory, permission, network), "
                    "not of the checkpoint, so nothing was set aside. Run again once it is "
                    "solved."
                ) from failure
            if worst == _READ:  # the same global arrays everywhere: the same verdict
                try:
                    where = str(self.step_path(step))
                    check_fingerprint(restored.state, restored.fingerprint, where)
                except CorruptCheckpoint as e:
                    worst, problem = _DAMAGED, describe_error(e)
            if worst == _DAMAGED:
                problem = problem or "unreadable on another process"
                logging.warning(
                    "checkpoint %s is unusable (%s); trying the one before it",
                    self.step_path(step),
                    problem,
                )
                unusable.append((step, problem))
                continue
            self._set_aside([s for s, _ in unusable])
            logging.info("resumed from %s", self.step_path(step))
            changes = [] if config is None else config_changes(restored.config, config.to_dict())
            if changes and jax.process_index() == 0:
                logging.warning(
                    "resuming from %s with a config that differs from the one it was written "
                    "with (each checkpoint keeps its own): %s",
                    self.step_path(step), "; ".join(changes),
                )  # fmt: skip
            data_changes = [c.split(":")[0] for c in changes if c.startswith("data.")]
            reason = self._restore_data(step, data, data_changes)
            if reason is not None:
                logging.info(
                    "%s: %s, so the data stream is opened at global step %d instead",
                    self.step_path(step), reason, step,
                )  # fmt: skip
                data.close()
                data = make_data(step)
            return restored.state, data
        if unusable:
            details = "; ".join(f"{self.step_path(s)}: {p}" for s, p in unusable)
            raise CheckpointError(
                f"no usable checkpoint in {self.directory} ({details}). Move the directory away "
                "to start afresh."
            )
        return None

    def _check_compatible(
        self, step: int, target: Any, config: ml_collections.ConfigDict | None
    ) -> None:
        metadata = self.reader.item_metadata(step)["state"]
        if metadata is None:
            raise CorruptCheckpoint("its state metadata is missing")
        saved, wanted = named_leaves(metadata), named_leaves(target)
        path = self.step_path(step)
        for name in sorted(saved.keys() | wanted.keys()):
            was, now = saved.get(name), wanted.get(name)
            if was is None or now is None:
                where = "this run's state" if now is not None else str(path)
                problem = f"{name} is only in {where}"
            elif tuple(was.shape) != tuple(now.shape) or np.dtype(was.dtype) != np.dtype(now.dtype):
                problem = (
                    f"{name} is {np.dtype(was.dtype).name}{list(was.shape)} there and "
                    f"{np.dtype(now.dtype).name}{list(now.shape)} here"
                )
            else:
                continue
            raise IncompatibleCheckpoint(
                f"checkpoint {path} does not fit this run: {problem}. "
                f"{self._saved_config_hint(step, config)} Use a new --workdir, or the config "
                "the checkpoint was written with."
            )

    def _saved_config_hint(self, step: int, config: ml_collections.ConfigDict | None) -> str:
        """Which fields of ``config`` differ from those the checkpoint at ``step`` was written
        with, as far as its saved config can be read."""
        generic = "Was it written with another model or optimizer config?"
        if config is None:
            return generic
        try:
            restore = ocp.args.Composite(config=ocp.args.JsonRestore())
            saved = self.reader.restore(step, args=restore).config
        except Exception:  # the shapes already say enough
            return generic
        changes = config_changes(saved, config.to_dict())
        if not changes:
            return generic
        return f"It was written with another config ({'; '.join(changes)})."

    def _read(self, step: int, target: Any) -> Any:
        """The checkpoint's ``.state``, and the ``.config`` and ``.fingerprint`` saved with it,
        read by this process alone."""
        items = {
            "state": ocp.args.StandardRestore(target),
            "config": ocp.args.JsonRestore(),
            "fingerprint": ocp.args.JsonRestore(),
        }
        return self.reader.restore(step, args=ocp.args.Composite(**items))

    def _restore_data(
        self, step: int, data: grain.DatasetIterator, data_changes: list[str]
    ) -> str | None:
        """Moves ``data`` to the position saved at ``step``; returns why it could not (None if
        it did). The position fits only the pipeline that saved it (a grain iterator's state
        depends on its worker count, among others): after any change to ``config.data``
        (``data_changes``: the fields), or of the process count, the caller opens the stream
        at the step instead, whose batches depend on neither. A position that cannot be read
        never costs the checkpoint."""
        # grain saves one file per process: process_{i}-of-{n}.json
        layout = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not (self.step_path(step) / "data" / layout).exists():
            reason = "it was written by another number of processes"
        elif data_changes:
            reason = f"config.data changed ({', '.join(data_changes)})"
        else:
            try:
                restore = ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data))
                self.reader.restore(step, args=restore)
                reason = None
            except Exception as e:
                reason = f"its data position is unreadable ({describe_error(e)})"
        if _every_process(reason is not None).any():  # all processes read the stream alike
            reason = reason or "another process could not restore its data position"
        return reason

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unusable checkpoints out of the way (kept for inspection, never deleted)."""
        if not steps:
            return
        if jax.process_index() == 0:
            self.unusable_directory.mkdir(parents=True, exist_ok=True)
            for step in steps:
                destination = self.unusable_directory / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                self.step_path(step).rename(destination)
                logging.warning(
                    "moved unusable checkpoint %s to %s", self.step_path(step), destination
                )
        multihost_utils.sync_global_devices("usfm_jax: unusable checkpoints set aside")
        self.manager.reload()
        self.reader.reload()

    def save(
        self,
        step: int,
        state: Any,
        data: grain.DatasetIterator,
        config: ml_collections.ConfigDict,
        *,
        force: bool = False,
    ) -> bool:
        """Saves if the policies (or ``force``) say so; returns whether a save started. Returns
        as soon as the state is copied to host memory; the write continues in the background.

        Interval saves wait while non-finite steps are being skipped, so that the latest
        checkpoint stays the last good one if the run diverges.
        """
        if not (force or self.manager.should_save(step)):
            return False
        if not force and int(state.bad_steps):
            logging.warning("step %d: not saving during a run of skipped (non-finite) steps", step)
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data),
            config=ocp.args.JsonSave(config.to_dict()),
            fingerprint=ocp.args.JsonSave(fingerprint(state)),
        )
        # a failed background write surfaces at the next save or wait: one line, not pages
        started = self._checked(lambda: self.manager.save(step, args=args, force=True))
        if started and not self._written:  # the invocation's first save: wait, to fail now
            self._checked(self.manager.wait_until_finished)
            self._written = True
        return started

    def close(self) -> None:
        """Waits for pending saves to finish."""
        self._checked(self.manager.wait_until_finished)
        self.manager.close()
        self.reader.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _) -> None:
        """Closes; when the run stopped on an error, a save in flight still completes (the
        next run resumes from it), and a failure to write it is logged beside that error.
        Nothing is waited for after Ctrl-C, which asks to stop at once, nor in a run of several
        processes, where the others may never join the save's last barrier."""
        if kind is None:
            self.close()
        elif not issubclass(kind, KeyboardInterrupt) and jax.process_count() == 1:
            try:
                self.close()
            except CheckpointError as e:
                logging.error("%s", e)

    def _checked(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as e:
            raise CheckpointError(
                f"writing a checkpoint to {self.directory} failed ({describe_error(e)}): is "
                "the disk or bucket full, read-only or unreachable? The checkpoints already "
                "there are intact; the run resumes from the newest."
            ) from e


def config_changes(before: dict, after: dict) -> list[str]:
    """``"field: old -> new"`` for every field whose value differs, as JSON would store it."""

    def flat(tree: dict) -> dict[str, Any]:
        return traverse_util.flatten_dict(json.loads(json.dumps(tree, default=str)), sep=".")

    old, new = flat(before), flat(after)
    return [
        f"{key}: {old.get(key, 'unset')!r} -> {new.get(key, 'unset')!r}"
        for key in sorted(old.keys() | new.keys())
        if key not in old or key not in new or old[key] != new[key]
    ]


class PreemptionGuard:
    """Turns a pre-emption notice (SIGTERM), or Ctrl-C in a single process, into a stop at a
    step boundary.

    The train loop asks ``reached(step)`` after each step; when it says so, the loop saves a
    checkpoint of that step, waits for it and returns normally: exit status 0, and the next run
    resumes there. With several processes, JAX's distributed runtime receives the notice and
    agrees on the step at which all processes stop (``reached_preemption_sync_point``); in a
    single process a signal handler sets a flag. A second Ctrl-C stops at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> PreemptionGuard:
        single = jax.process_count() == 1
        if single and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.requested:  # the second Ctrl-C: the user does not want to wait
                signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
                raise KeyboardInterrupt
            logging.warning(
                "Ctrl-C: saving a checkpoint at the end of this step, then stopping "
                "(Ctrl-C again to stop at once, without it)"
            )
        else:
            logging.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to checkpoint ``step`` and stop (every process gets the same answer)."""
        if self.requested or jax.process_count() == 1:
            return self.requested
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # preemption service disabled: no notices
            return False

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
