"""Pre-training entry point.

    python -m usfm_jax.train --config configs/pretrain/demo.py --workdir runs/demo \
        [--config.total_steps=1000 ...] [--stop_after=N]

A workdir that holds checkpoints is resumed from its newest usable one. SIGTERM saves the
current step and exits 0.

Reads top to bottom as one run: config -> mesh -> objective, optimizer, state -> compiled step ->
loop over the data (log, preview) -> summary.
"""

from __future__ import annotations

import contextlib
import sys
import time

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from usfm_jax import distributed, parallel
from usfm_jax.checkpoint import Checkpointer, CheckpointError, PreemptionGuard
from usfm_jax.cli import exit_if_out_of_memory, run_program, start_jax
from usfm_jax.config_validation import ConfigError, check_workdir_kind, validate
from usfm_jax.convert.formats import ConversionError
from usfm_jax.data.pipeline import create_pretrain_dataset, global_batch
from usfm_jax.distributed import DistributedError
from usfm_jax.models.factory import encoder_dims
from usfm_jax.parallel import MeshError
from usfm_jax.paths import PathError, make_directory, replace_text, work_directory
from usfm_jax.probe import OrganProbe
from usfm_jax.reporting import (
    Reporter,
    TrainingDiverged,
    divergence,
    quiet_library_logs,
    strict_json,
)
from usfm_jax.train_step import create_training, make_preview


def train(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None
) -> dict[str, float]:
    """Runs pre-training (resuming from the workdir's latest checkpoint if there is one);
    returns the metrics of the last logging window. ``stop_after`` ends this invocation after
    that many steps, with a checkpoint (a time-sliced job)."""
    distributed.check_same_run(
        {"config": config.to_dict(), "workdir": workdir, "stop_after": stop_after}
    )
    validate(config, jax.device_count())
    root = work_directory(workdir)  # local, or gs://...
    check_workdir_kind(root, "pre-training")
    if jax.process_index() == 0:
        make_directory(root, "--workdir")

    mesh = parallel.create_mesh(config.mesh)
    objective, graphdef, state, train_step, shardings = create_training(config, mesh)
    preview = parallel.jit_in_mesh(
        make_preview(config, graphdef, objective), mesh, out_shardings=parallel.replicated(mesh)
    )
    logging.info(
        "mesh %s, %d parameters, branches %s",
        dict(mesh.shape),
        sum(x.size for x in jax.tree.leaves(state.params)),
        (objective.branches if objective is not None else ())
        + (("representation",) if config.representation.enabled else ()),
    )
    fsdp = mesh.shape["fsdp"]
    if missed := parallel.fsdp_misses(state.params, fsdp, config.mesh.fsdp_min_size):
        logging.warning(
            "the mesh's fsdp axis (%d devices) divides no dimension of arrays holding %.0f%% of "
            "the parameters: they are replicated on every device (an fsdp size dividing the "
            "model width, %d, shards them)",
            fsdp, 100 * missed, encoder_dims(config.model)[0],
        )  # fmt: skip

    batch_keys = ("image", "target") if config.teacher.targets else ("image",)
    # however the run ends: saves in flight complete, data workers stop, logs are flushed
    with contextlib.ExitStack() as cleanup:
        checkpointer = cleanup.enter_context(Checkpointer(workdir, config.checkpoint))
        state, data = checkpointer.restore_latest(
            state,
            shardings,
            lambda step: iter(create_pretrain_dataset(config, start_step=step)),
            config,
        )
        cleanup.callback(data.close)
        if jax.process_index() == 0:  # once the checkpoint is known to fit this config
            replace_text(root / "config.json", config.to_json_best_effort(indent=2))
        start = int(state.step)  # 0, or the restored checkpoint's step
        end = (
            config.total_steps
            if stop_after is None
            else min(config.total_steps, start + stop_after)
        )
        if start >= config.total_steps:
            logging.info("%s already holds step %d of %d: nothing to do", workdir, start, end)
            return {}
        reporter = Reporter(
            workdir, total_steps=config.total_steps, start_step=start, batch_size=config.batch_size
        )
        cleanup.callback(reporter.close)
        compile_start = time.perf_counter()
        means, probe = {}, None  # the probe's held-out set is built at its first use
        preemption = cleanup.enter_context(PreemptionGuard())
        for step in range(start + 1, end + 1):
            local = next(data)
            batch = global_batch({k: local[k] for k in batch_keys}, mesh)
            state, metrics = train_step(state, batch)
            reporter.step(metrics)
            if step == start + 1:
                jax.block_until_ready(metrics)
                elapsed = time.perf_counter() - compile_start
                logging.info("first step (compile + run): %.1f s", elapsed)
                reporter.restart_timer(step)  # keep compilation out of images/s
            preempted = step != end and preemption.reached(step)
            last = step == end or preempted
            if step % config.log_every == 0 or last:
                means = reporter.flush(step)
                # the longest run in the window: one that ended since the last flush counts too
                last_good = f"the last checkpoint in {workdir}/checkpoints is from before them"
                if error := divergence(means, config.max_bad_steps, last_good):
                    raise error  # the last good checkpoint stays the latest
            if not preempted:  # a notice's grace period is for the checkpoint alone
                # probes every `every` steps, at the end, and after the first step (the baseline)
                if config.probe.every and (step % config.probe.every == 0 or last or step == 1):
                    probe = probe or OrganProbe(config, graphdef, shardings.params, mesh)
                    reporter.evaluation("probe", probe(state.params), step)
                    reporter.restart_timer(step)  # keep the probes out of images/s
                if config.image_every and (step % config.image_every == 0 or last):
                    reporter.images(step, preview(state, batch))
                    reporter.restart_timer(step)  # keep previews out of images/s
            checkpointer.save(step, state, data, config, force=last)
            if last:
                end = step
                break
    if jax.process_index() == 0:
        replace_text(root / "summary.json", strict_json({"step": end, **means}, indent=2))
    return means


def define_flags() -> None:
    """The command line (defined only when run as a program: other entry points import this
    module)."""
    config_flags.DEFINE_config_file("config", None, "Run config file (python).")
    flags.DEFINE_string("workdir", None, "Directory for logs and outputs.")
    flags.DEFINE_enum(
        "distributed",
        "auto",
        distributed.MODES,
        "Multi-process runs. auto: join the cluster that USFM_COORDINATOR, USFM_NUM_PROCESSES "
        "and USFM_PROCESS_ID describe, if set; on: let JAX find it (Cloud TPU, SLURM, Open "
        "MPI); off: one process.",
    )
    flags.DEFINE_integer(
        "stop_after",
        None,
        "Stop this invocation after N steps, with a checkpoint (for time-sliced jobs); the next "
        "invocation in the same workdir continues.",
        lower_bound=1,
    )


def main(argv: list[str]) -> None:
    del argv  # parse_flags refuses positional arguments
    quiet_library_logs()
    f = flags.FLAGS
    try:
        start_jax(f.distributed)
        train(f.config, f.workdir, stop_after=f.stop_after)
    except (
        CheckpointError,
        ConfigError,
        ConversionError,  # a teacher file that is not what config.teacher says
        DistributedError,
        MeshError,
        PathError,
        TrainingDiverged,
    ) as e:
        sys.exit(f"error: {e}")
    except jax.errors.JaxRuntimeError as e:
        exit_if_out_of_memory(e)
        raise


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    run_program(main, lambda: "the next run of this --workdir resumes from its newest checkpoint")
