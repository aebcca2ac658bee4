"""One fine-tuning run, top to bottom: config -> data -> encoder (pre-trained or random) + task
head -> sharded state and compiled step -> train, evaluating on val every ``eval_every`` steps
and keeping the best parameters -> test evaluation of the best -> results and overlays.

Outputs in the workdir: ``config.json``, ``metrics.jsonl`` (training curves),
``evaluations.jsonl`` (validation metrics), ``tensorboard/`` (both), ``best/`` (an export of
the best parameters, readable by ``usfm_jax.export.load_params`` and
``usfm_jax.pretrained.load_pretrained``), ``results.json`` and ``results.md`` (val at the best
step, test), ``test_predictions/`` (PNG overlays).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from usfm_jax import distributed, parallel
from usfm_jax.config_validation import check_encoder, check_workdir_kind
from usfm_jax.convert import Architecture, Normalization
from usfm_jax.data.pipeline import (
    global_batch,
    global_batch_from_whole,
    padded_batches,
    process_batches,
)
from usfm_jax.export import write_export
from usfm_jax.finetune import data as task_data
from usfm_jax.finetune import evaluate
from usfm_jax.finetune.models import Classifier, Enhancer, Normalize, Segmenter, TaskModel
from usfm_jax.finetune.step import make_predict, make_train_step
from usfm_jax.finetune.validation import check_init_overrides, validate_finetune
from usfm_jax.models.factory import DTYPES
from usfm_jax.optim import create_optimizer, layer_decay_scales
from usfm_jax.paths import make_directory, replace_text, work_directory
from usfm_jax.pretrained import load_encoder_weights
from usfm_jax.reporting import Reporter, divergence, strict_json
from usfm_jax.train_step import TrainState, fresh_state


def initial_encoder(
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, Any] | None, Architecture, Normalization]:
    """(pre-trained encoder parameters or None, architecture, input normalisation): from
    ``config.init`` (a usfm_jax checkpoint or export, or PyTorch weights; position tables
    resampled to ``config.image_size``), or random from ``config.model``."""
    if config.init:
        params, arch, normalization = load_encoder_weights(
            config.init,
            image_size=tuple(config.image_size),
            fmt=config.init_format,
            input_normalization=config.init_normalization or None,
            num_heads=config.init_num_heads or None,
        )
        return params, arch, normalization
    arch = Architecture.from_config(config.model, tuple(config.image_size))
    return None, arch, Normalization.from_json(config.normalization)


def create_model(
    config: ml_collections.ConfigDict,
    arch: Architecture,
    normalization: Normalization,
    num_classes: int,
    rngs: nnx.Rngs,
) -> TaskModel:
    """The task model: ``arch``'s encoder with ``config.model``'s training settings, and the
    head of ``config.task``."""
    m, h = config.model, config.head
    # layer_scale_init sets the initial weights of a random encoder; a checkpoint has its own
    scratch = {} if config.init else {"layer_scale_init": m.layer_scale_init}
    encoder = arch.build(dtype=DTYPES[m.dtype], attention=m.attention, mlp=m.mlp, norm=m.norm,
                         rngs=rngs, drop_path_rate=m.drop_path_rate, remat=m.remat,
                         scan=m.scan_layers, **scratch)  # fmt: skip
    normalize = Normalize(normalization, arch.in_chans)
    frozen = h.mode == "linear_probe"
    if config.task == "classify":
        return Classifier(encoder, normalize, num_classes, pool=h.pool, frozen=frozen, rngs=rngs)
    if config.task == "segment":
        return Segmenter(encoder, normalize, num_classes, decoder=h.decoder, channels=h.channels,
                         frozen=frozen, rngs=rngs)  # fmt: skip
    return Enhancer(encoder, normalize, refine_width=h.refine_width, frozen=frozen, rngs=rngs)


def finetune(
    config: ml_collections.ConfigDict, workdir: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Runs one fine-tuning; returns the results written to ``workdir/results.json``.
    ``overrides``: the command line's ``--config.FIELD`` values, checked against what
    ``config.init`` brings (``check_init_overrides``)."""
    distributed.check_same_run({"config": config.to_dict(), "workdir": workdir})
    validate_finetune(config, jax.device_count())
    root = work_directory(workdir)
    check_workdir_kind(root, "fine-tuning")
    is_main = jax.process_index() == 0
    if (root / "results.json").exists():
        raise FileExistsError(f"{workdir} already holds a finished run (results.json)")

    encoder_params, arch, normalization = initial_encoder(config)
    check_init_overrides(config, overrides or {}, arch, normalization)
    data = task_data.load_task(config)
    num_classes = len(data.classes) if config.task != "enhance" else 0
    config = copy.deepcopy(config)
    config.unlock()
    config.model.update(arch.model_config())  # the architecture actually trained, for exports
    config.normalization = ml_collections.ConfigDict(normalization.to_json())
    if config.init:  # the training settings (dtype, attention, drop path, ...) with its encoder
        check_encoder(config)
    if is_main:
        make_directory(root, "--workdir")
        replace_text(root / "config.json", config.to_json_best_effort(indent=2))

    mesh = parallel.create_mesh(config.mesh)
    model = nnx.eval_shape(
        lambda: create_model(config, arch, normalization, num_classes, nnx.Rngs(0))
    )
    graphdef = nnx.graphdef(model)
    abstract_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    frozen = "encoder" if config.head.mode == "linear_probe" else ""
    scales = layer_decay_scales(abstract_params, arch.depth, config.head.layer_decay, frozen)
    tx, schedule = create_optimizer(config.optimizer, config.batch_size, config.total_steps,
                                    lr_scales=scales)  # fmt: skip

    def init() -> TrainState:
        model = create_model(config, arch, normalization, num_classes, nnx.Rngs(config.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        if encoder_params is not None:
            params["encoder"] = jax.tree.map(jnp.asarray, encoder_params)
        return fresh_state(params, tx, config.seed)

    state, shardings = parallel.create_sharded(init, mesh, config.mesh.fsdp_min_size)
    train_step = parallel.jit_in_mesh(
        make_train_step(config, graphdef, tx, schedule), mesh,
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0,
    )  # fmt: skip
    predict_fn = parallel.jit_in_mesh(
        make_predict(config.task, graphdef), mesh,
        in_shardings=(shardings.params, parallel.batch_sharding(mesh)),
        out_shardings=parallel.replicated(mesh),
    )  # fmt: skip

    def predict(params: Any, batch: dict[str, np.ndarray]) -> jax.Array:
        images = global_batch_from_whole({"image": batch["image"]}, mesh)["image"]
        return predict_fn(params, images)

    subset = task_data.label_subset(data.groups, config.label_fraction, config.seed)
    logging.info(
        "task %s: %d labelled training images (%.0f%% of %d), init %s, %d parameters",
        config.task, len(subset), 100 * config.label_fraction,
        sum(len(g) for g in data.groups.values()), config.init or "random",
        sum(x.size for x in jax.tree.leaves(state.params)),
    )  # fmt: skip
    batches = iter(process_batches(task_data.train_stream(config, data), config))
    val = task_data.eval_split(config, data, "val")
    select = config.eval.select or evaluate.METRICS[config.task][0]

    def run_eval(params: Any, split: grain.MapDataset) -> dict[str, np.ndarray]:
        batches = padded_batches(split, config.batch_size)
        return evaluate.collect(lambda b: predict(params, b), batches, config.task)

    reporter = Reporter(workdir, total_steps=config.total_steps, start_step=0,
                        batch_size=config.batch_size)  # fmt: skip
    best, best_step, best_val, last_val, skipped = None, 0, {}, {}, 0
    keys = ("image", task_data.TARGET_KEY[config.task])
    start = time.perf_counter()
    for step in range(1, config.total_steps + 1):
        local = next(batches)
        state, metrics = train_step(state, global_batch({k: local[k] for k in keys}, mesh))
        reporter.step(metrics)
        if step == 1:
            jax.block_until_ready(metrics)
            logging.info("first step (compile + run): %.1f s", time.perf_counter() - start)
            reporter.restart_timer(step)
        if step % config.log_every == 0 or step == config.total_steps:
            means = reporter.flush(step)
            skipped += int(means["skipped"])
            if error := divergence(means, config.max_bad_steps, "no results were written"):
                reporter.close()
                raise error
        if step % config.eval_every == 0 or step == config.total_steps:
            scores = evaluate.compute_metrics(config.task, run_eval(state.params, val), num_classes)
            improved = evaluate.is_better(select, scores[select], best_val.get(select))
            last_val = scores
            if improved:
                best, best_step, best_val = _host_copy(state.params), step, scores
                if is_main:
                    _save_best(root, best, config, step, scores)
            reporter.evaluation("val", scores, step, " (best)" if improved else "")
            reporter.restart_timer(step)  # keep evaluation out of images/s
    reporter.close()
    if skipped:
        logging.warning("%d of %d steps were skipped (a non-finite loss or gradient)", skipped,
                        config.total_steps)  # fmt: skip

    selected_by = select
    if best is None:  # the metric was undefined (NaN) at every evaluation: the last parameters
        logging.warning(
            "validation %s was undefined at every evaluation (e.g. AUC of a val split with one "
            "class): nothing to select by, so the last step's parameters are tested and "
            "exported to best/", select,
        )  # fmt: skip
        best, best_step, best_val = _host_copy(state.params), config.total_steps, last_val
        selected_by = None
        if is_main:
            _save_best(root, best, config, best_step, best_val)
    best = jax.device_put(best, shardings.params)
    test = run_eval(best, task_data.eval_split(config, data, "test"))
    test_scores = evaluate.compute_metrics(config.task, test, num_classes)
    results = {
        "task": config.task,
        "init": config.init or "random",
        "mode": config.head.mode,
        "label_fraction": config.label_fraction,
        "seed": config.seed,
        "train_images": len(subset),
        "steps": config.total_steps,
        "skipped_steps": skipped,
        "best_step": best_step,
        "selected_by": selected_by,  # None: the metric was undefined, the last step is kept
        "val": best_val,
        "test": test_scores,
        "test_images": len(test["image"]),
    }
    if is_main:
        written = evaluate.write_overlays(
            root / "test_predictions", config.task, test, data.classes, config.eval.num_overlays
        )
        results["overlays"] = written
        replace_text(root / "results.json", strict_json(results, indent=2))
        replace_text(root / "results.md", results_markdown(results))
        print(results_markdown(results))
    return results


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: the run in one line, then val (best step) and test metrics as a table."""
    names = list(results["test"])
    skipped = results.get("skipped_steps", 0)  # absent in results of earlier versions
    rows = [{"split": "val (best)", **results["val"]}, {"split": "test", **results["test"]}]
    header = (
        f"# {results['task']}: init {results['init']}, {results['mode']}, "
        f"{results['train_images']} labelled images (fraction {results['label_fraction']:g}), "
        f"seed {results['seed']}\n\n"
        + (
            f"best step {results['best_step']} of {results['steps']} by validation "
            f"{results['selected_by']}"
            if results["selected_by"]
            else f"last step {results['steps']} (the selection metric was undefined on val)"
        )
        + f"; {results['test_images']} test images."
        + (f" {skipped} steps skipped (non-finite).\n\n" if skipped else "\n\n")
    )
    return header + evaluate.markdown_table(rows, ["split", *names])


def _host_copy(params: Any) -> Any:
    """The parameters as numpy arrays on every process, gathered from the devices of all
    processes (a collective: every process calls it); a copy the next, donating step keeps."""
    return multihost_utils.process_allgather(params, tiled=True)


def _save_best(
    root: Any, params: Any, config: ml_collections.ConfigDict, step: int, scores: dict
) -> None:
    """Replaces ``best/`` by an export of ``params`` (written aside, then swapped in)."""
    staging, best = root / "best.tmp", root / "best"
    if staging.exists():  # left by a killed run
        staging.rmtree()
    write_export(str(staging), jax.tree.map(np.asarray, params), config.to_dict(), step=step,
                 weights="params", source="finetune", val=scores)  # fmt: skip
    if best.exists():
        best.rmtree()
    staging.rename(best)
