"""A checkpoint's parameters alone, without the optimizer: for inference and conversion.

    python -m usfm_jax.export --checkpoint runs/demo [--step 600] --out exports/demo-600

``--checkpoint`` names a workdir, its ``checkpoints/`` directory, one step's directory or an
export; the newest step is taken unless ``--step`` says otherwise. ``--ema`` (auto | yes | no)
exports the EMA of the weights where the run kept one (auto: then yes). An export directory
holds ``params/`` (an orbax checkpoint of the model's parameter dict), ``config.json`` (the
run's config) and ``export.json`` (source, step, which weights, parameter count and the
parameters' fingerprint). ``load_params`` reads a training checkpoint or an export alike,
verifying the fingerprint either way.
"""

from __future__ import annotations

import json
import logging as std_logging
import sys
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from etils import epath

from usfm_jax.checkpoint import (
    CheckpointError,
    check_fingerprint,
    describe_error,
    drop_closed_event_loop_noise,
    fingerprint,
    this_process_alone,
)
from usfm_jax.cli import incomplete_output, run_program
from usfm_jax.paths import PathError, as_path, make_directory, new_directory
from usfm_jax.reporting import library_logs_below, quiet_library_logs, strict_json


class Parameters(NamedTuple):
    params: dict[str, Any]  # nested dict of numpy arrays, as in TrainState.params
    config: dict[str, Any]  # the run's config, as saved
    step: int
    source: str  # the step or export directory read
    weights: str = "params"  # "params" (the trained weights) or "ema" (their moving average)


WEIGHTS = ("auto", "ema", "params")  # auto: the EMA where the run kept one
EMA_CHOICES = {"auto": "auto", "yes": "ema", "no": "params"}  # the CLIs' --ema


def find_checkpoint(path: str, step: int | None = None) -> epath.Path:
    """The step directory (holding ``state/``) or export directory (holding ``params/``) that
    ``path`` and ``step`` name; a CheckpointError says what is missing."""
    root = as_path(path)
    if not root.exists():
        raise CheckpointError(f"no checkpoint at {path}: it does not exist")
    if not root.is_dir():
        raise CheckpointError(
            f"{path} is a file: expected a workdir, a step directory or an export (PyTorch "
            "weights load with usfm_jax.pretrained.load_pretrained)"
        )
    if (root / "params").exists() or (root / "state").exists():
        if step is not None and step_of(root) != step:
            raise CheckpointError(f"{path} is the checkpoint of one step; do not pass a step")
        return root
    if (root / "checkpoints").exists():
        root = root / "checkpoints"
    steps = sorted(ocp.path.step.checkpoint_steps(root))  # finalized ones only
    if not steps:
        raise CheckpointError(
            f"no checkpoint in {path} (expected a workdir, its checkpoints/ directory, a step "
            "directory or an export)"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"no step {step} in {root}; it has steps {steps}")
    return root / str(step)


def _read_numpy(directory: epath.Path, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """An orbax PyTree checkpoint (or its entries ``keys``) as numpy arrays on the host."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = _tree_metadata(directory)
    if keys:
        tree = {key: tree[key] for key in keys}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    args = ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=True)
    return checkpointer.restore(directory, args=args)


def _tree_metadata(directory: epath.Path) -> dict[str, Any]:
    """The tree of an orbax PyTree checkpoint's metadata, or a CheckpointError if unreadable."""
    metadata = ocp.PyTreeCheckpointer().metadata(directory).item_metadata
    if metadata is None:  # orbax returns None where its metadata files are damaged
        raise CheckpointError(f"cannot read {directory}: its metadata is missing or damaged")
    return metadata.tree


def load_params(path: str, step: int | None = None, weights: str = "auto") -> Parameters:
    """The model parameters of a training checkpoint or an export, fingerprint-checked:
    ``weights`` "params", "ema" (the moving average, if the run kept one) or "auto" (the EMA
    where there is one)."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights={weights!r}: expected one of {WEIGHTS}")
    source = find_checkpoint(path, step)
    drop_closed_event_loop_noise()  # a damaged checkpoint's error comes alone
    # orbax warns that a manager's item has no metadata file of its own: noise for the reader
    with library_logs_below(std_logging.ERROR):
        return _load_params(source, weights)


class Record(NamedTuple):
    """What a training step or an export records beside its arrays."""

    step: int
    config: dict[str, Any]
    fingerprint: dict[str, int]  # per array (checkpoint.fingerprint)


def read_record(source: epath.Path) -> Record:
    """The record of ``source`` (a step directory or an export, as ``find_checkpoint`` gives
    it), read without its arrays; unreadable: a one-line CheckpointError."""
    # orbax warns that a manager's item has no metadata file of its own: noise for the reader
    with library_logs_below(std_logging.ERROR):
        try:
            if (source / "params").exists():  # an export
                info = json.loads((source / "export.json").read_text())
                config = json.loads((source / "config.json").read_text())
                return Record(info["step"], config, info["fingerprint"])
            read_json = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore
            config, saved = read_json(source / "config"), read_json(source / "fingerprint")
            step = step_of(source)
            if step is None:
                raise ValueError(f"{source.name!r} is not the name of a step's directory")
            return Record(step, config, saved)
        except Exception as e:
            raise CheckpointError(f"cannot read {source}: {describe_error(e)}") from e


def step_of(directory: epath.Path) -> int | None:
    """The step a directory's name says, as orbax writes it (``400``) or as an unusable
    checkpoint is set aside (``400-20261125-042646``); None for another name (an export's)."""
    head = directory.name.partition("-")[0]
    return int(head) if head.isdigit() else None


def _load_params(source: epath.Path, weights: str) -> Parameters:
    step, config, saved = read_record(source)
    try:
        if (source / "params").exists():  # an export: one set of weights, as exported
            info = json.loads((source / "export.json").read_text())
            params = {"params": _read_numpy(source / "params")}
            kind = info.get("weights", "params")
            if weights != "auto" and weights != kind:
                raise CheckpointError(f"{source} holds the {kind} weights, not {weights}")
            name = "params"
        else:
            tree = _tree_metadata(source / "state")
            has_ema = bool(tree.get("ema_params"))
            if weights == "ema" and not has_ema:
                raise CheckpointError(f"{source} holds no EMA weights (config.ema_decay was 0)")
            kind = "ema" if weights == "ema" or (weights == "auto" and has_ema) else "params"
            name = "ema_params" if kind == "ema" else "params"
            params = {name: _read_numpy(source / "state", (name,))[name]}
    except CheckpointError:
        raise
    except Exception as e:  # unreadable: say which checkpoint and why, in one line
        raise CheckpointError(f"cannot read {source}: {describe_error(e)}") from e
    check_fingerprint(params, saved, str(source))
    return Parameters(params[name], config, step, str(source), kind)


def check_new_directory(out: str) -> epath.Path:
    """``paths.new_directory``, its error a CheckpointError."""
    try:
        return new_directory(out)
    except PathError as e:
        raise CheckpointError(str(e)) from None


def write_export(
    out: str, params: dict[str, Any], config: dict[str, Any], **info: Any
) -> dict[str, Any]:
    """Writes ``params`` (numpy arrays) as an export directory that ``load_params`` reads;
    ``info`` (source, step, ...) goes into export.json with the count and the fingerprint.
    Written by the calling process alone: in a run of several, one process calls it."""
    destination = check_new_directory(out)
    try:
        make_directory(destination, "--out")
    except PathError as e:
        raise CheckpointError(str(e)) from None
    with ocp.StandardCheckpointer(multiprocessing_options=this_process_alone()) as checkpointer:
        checkpointer.save(destination / "params", params)
    (destination / "config.json").write_text(strict_json(config, indent=2))
    info = {
        **info,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "fingerprint": fingerprint({"params": params}),
    }
    (destination / "export.json").write_text(strict_json(info, indent=2))  # val scores: NaN
    return info


def export_params(
    path: str, out: str, step: int | None = None, weights: str = "auto"
) -> dict[str, Any]:
    """Writes the parameters of ``path`` (at ``step``, default newest; the EMA ones if the
    run kept them, unless ``weights`` says otherwise) to a new directory ``out``; returns the
    contents of its export.json."""
    check_new_directory(out)
    loaded = load_params(path, step, weights)
    return write_export(
        out,
        loaded.params,
        loaded.config,
        source=loaded.source,
        step=loaded.step,
        weights=loaded.weights,
    )


def main(argv: list[str]) -> None:
    del argv  # parse_flags refuses positional arguments
    quiet_library_logs(std_logging.ERROR)  # orbax warns of missing optional metadata files
    try:
        f = flags.FLAGS
        info = export_params(f.checkpoint, f.out, f.step, EMA_CHOICES[f.ema])
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(
        f"exported {info['num_params']:,} parameters ({info['weights']}) of step {info['step']} "
        f"to {flags.FLAGS.out}"
    )


if __name__ == "__main__":  # flags defined here: other entry points import this module
    flags.DEFINE_string(
        "checkpoint",
        None,
        "A workdir, its checkpoints/ directory, one step's directory or an export.",
    )
    flags.DEFINE_integer("step", None, "The step to export (default: the newest).")
    flags.DEFINE_string("out", None, "New directory for the export.")
    flags.DEFINE_enum(
        "ema",
        "auto",
        list(EMA_CHOICES),
        "Export the EMA weights: auto (if the run kept them), yes, no.",
    )
    flags.mark_flags_as_required(["checkpoint", "out"])
    run_program(main, incomplete_output("out"))
