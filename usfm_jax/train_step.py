"""The pure core of pre-training: state initialisation and the train step.

``train_step(state, batch) -> (state, metrics)`` is a function of its arguments only: the state
carries the run's PRNG key, the step's key is ``fold_in(state.rng, state.step)``, masks are drawn
on device from it, and the function is compiled once with ``jax.jit`` over a device mesh with
explicit shardings. With the representation objective (URFM) the frozen teacher's weights are a
third argument of the compiled step (data, never differentiated nor updated); ``create_training``
binds them. Nothing here does I/O except ``create_training`` reading the teacher's file (or the
description of its precomputed targets).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from usfm_jax import parallel
from usfm_jax.config_validation import ConfigError
from usfm_jax.models.factory import create_pretrain_model
from usfm_jax.models.teacher import grid_mismatch, teacher_from_config
from usfm_jax.objectives.dual import BRANCHES, DualMIM, create_objective
from usfm_jax.objectives.pixel import denormalize_patches
from usfm_jax.objectives.representation import RepresentationMIM, create_representation
from usfm_jax.optim import applied_updates, create_optimizer
from usfm_jax.patches import patchify, unpatchify

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: dict[str, Any]  # pure nested dict of float32 arrays
    opt_state: optax.OptState
    rng: jax.Array  # uint32 [2]: raw data of the run's key; step keys are fold_in(rng, step)
    bad_steps: jax.Array  # int32: consecutive steps skipped for a non-finite loss or gradient
    ema_params: dict[str, Any] | None = None  # exponential moving average of params (ema_decay)

    def step_key(self) -> jax.Array:
        """The PRNG key of the current step: a function of the run's key and the step alone."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def abstract_model(config: ml_collections.ConfigDict, features: int | None = None) -> nnx.Module:
    """The model's structure without allocating parameters (``features``: the teacher's
    feature width, with the representation objective)."""
    return nnx.eval_shape(lambda: create_pretrain_model(config, nnx.Rngs(0), features))


def state_initializer(
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    features: int | None = None,
) -> Callable[[], TrainState]:
    """The function that creates a fresh train state: jit it with shardings to allocate one,
    or ``jax.eval_shape`` it for the shapes alone (sharding plans, ahead-of-time compiles)."""

    def init() -> TrainState:
        model = create_pretrain_model(config, nnx.Rngs(params=config.seed), features)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return fresh_state(params, tx, config.seed, ema=bool(config.ema_decay))

    return init


def fresh_state(
    params: dict[str, Any], tx: optax.GradientTransformation, seed: int, ema: bool = False
) -> TrainState:
    """Step 0 of training ``params`` with ``tx``; the run's key from ``seed``."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        bad_steps=jnp.zeros((), jnp.int32),
        ema_params=params if ema else None,
    )


def init_state(
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    features: int | None = None,
) -> tuple[nnx.GraphDef, TrainState, Any]:
    """Creates the model graph and a freshly initialised, sharded train state.

    Returns (graphdef, state, state_shardings).
    """
    init = state_initializer(config, tx, features)
    graphdef = nnx.graphdef(abstract_model(config, features))
    state, shardings = parallel.create_sharded(init, mesh, config.mesh.fsdp_min_size)
    return graphdef, state, shardings


def _micro_batches(inputs: Any, num: int) -> Any:
    """Every array [V, ...] -> [num, V / num, ...], micro-batch j holding rows j, j + num, ...

    The strided split keeps every micro-batch spread over all devices of the batch axes.
    """
    return jax.tree.map(lambda x: x.reshape(-1, num, *x.shape[1:]).swapaxes(0, 1), inputs)


def accumulate(fn: Callable[[Any, jax.Array], Any], inputs: Any, num: int, key: jax.Array) -> Any:
    """Gradient accumulation: ``fn(inputs, key)`` for ``num`` = 1, else the sum over ``num``
    strided micro-batches j of ``inputs`` of ``fn(micro_batch, fold_in(key, j))``, run as a
    scan so that one micro-batch's activations are live at a time."""
    if num == 1:
        return fn(inputs, key)

    def body(total, xs):
        i, micro = xs
        return jax.tree.map(jnp.add, total, fn(micro, jax.random.fold_in(key, i))), None

    micro = _micro_batches(inputs, num)
    shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro), key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(num), micro))
    return total


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    objective: DualMIM | None,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    representation: RepresentationMIM | None = None,
    teacher_graphdef: nnx.GraphDef | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Returns the (un-jitted) train step for this run's model, objectives and optimizer:
    ``step(state, batch)``, or ``step(state, batch, teacher_params)`` with a representation
    objective."""
    accum = config.optimizer.grad_accum_steps

    def loss_fn(params, inputs, counts: jax.Array, key: jax.Array):
        """``inputs`` = (pixel views or None, (representation views, targets) or None), of
        the whole batch or of one micro-batch; losses are scaled so that micro-batches add up
        to the whole batch's."""
        views, rep = inputs
        model = nnx.merge(graphdef, params)
        k_pixel, k_rep = jax.random.split(key)
        total, metrics = jnp.zeros((), jnp.float32), {}
        if objective is not None:
            pred = model(views.inputs, views.token_mask, dropout_key=k_pixel)  # [V, N, P]
            total, metrics = objective.loss(pred, views, counts)
        if representation is not None:
            rep_views, target = rep
            pred = model.features(
                rep_views.inputs, rep_views.token_mask, rep_views.keep, dropout_key=k_rep
            )  # [B, N, E]
            per_image = representation.loss(pred, target, rep_views.weight)  # [B]
            rep_loss = per_image.sum() / config.batch_size
            total = total + representation.weight * rep_loss
            metrics = {**metrics, "loss_representation": rep_loss}
        return total, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(
        state: TrainState, batch: Batch, teacher: nnx.State | None = None
    ) -> tuple[TrainState, Metrics]:
        k_views, k_drop = jax.random.split(state.step_key())
        images = batch["image"].astype(jnp.float32) / 255.0  # [B, H, W, C] in [0, 1]
        views = counts = rep = None
        if objective is not None:
            views = objective.views(images, k_views, state.step)
            counts = objective.branch_counts(views)
        if representation is not None:  # the teacher sees the clean image; no gradient
            if "target" in batch:  # precomputed (usfm_jax.teacher_cache)
                features = batch["target"].astype(jnp.float32)  # [B, N, E]
            else:
                features = nnx.merge(teacher_graphdef, teacher)(images)  # [B, N, E]
            target = jax.lax.stop_gradient(representation.targets(features))
            rep = (representation.views(images, jax.random.fold_in(k_views, 2)), target)
        (loss, sums), grads = accumulate(
            lambda micro, key: grad_fn(state.params, micro, counts, key),
            (views, rep),
            accum,
            k_drop,
        )
        new_state, metrics = apply_gradients(state, grads, loss, tx, schedule, config.ema_decay)
        metrics.update(sums)
        if counts is not None:
            metrics.update({f"count_{b}": counts[i] for i, b in enumerate(BRANCHES)})
        return new_state, metrics

    return train_step


def apply_gradients(
    state: TrainState,
    grads: Any,
    loss: jax.Array,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_decay: float = 0.0,
) -> tuple[TrainState, Metrics]:
    """One optimizer update (and EMA update) of ``state``; a non-finite loss or gradient skips
    it, leaving parameters and optimizer state unchanged and counting a bad step. Returns the
    new state and the metrics loss, grad_norm, lr, skipped and bad_steps (the run of
    consecutive skipped steps after this one)."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    bad_steps = jnp.where(finite, 0, state.bad_steps + 1)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": schedule(applied_updates(state.opt_state)),  # the lr of this update
        "skipped": 1 - finite.astype(jnp.int32),
        "bad_steps": bad_steps,
    }
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        bad_steps=bad_steps,
    )
    if state.ema_params is not None:  # ema <- decay * ema + (1 - decay) * params
        # warmed up as TensorFlow's ExponentialMovingAverage(num_updates): min(decay, (1 + n) /
        # (10 + n)) at the n-th applied update, so that the random initial weights fade within
        # a few hundred steps, not 1 / (1 - decay) (10,000 at 0.9999: a short run's EMA would
        # still be a third initial weights)
        n = applied_updates(state.opt_state).astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
        ema = optax.incremental_update(params, state.ema_params, 1.0 - decay)
        new_state = new_state.replace(ema_params=keep(ema, state.ema_params))
    return new_state, metrics


def jit_train_step(
    train_step: Callable, state_shardings: Any, mesh: Mesh, teacher_shardings: Any = None
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Compiles the step with explicit shardings; the old state's buffers are donated."""
    in_shardings = (state_shardings, parallel.batch_sharding(mesh))
    if teacher_shardings is not None:
        in_shardings += (teacher_shardings,)
    return parallel.jit_in_mesh(
        train_step,
        mesh,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )


def create_teacher(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[nnx.GraphDef, Any]:
    """The frozen teacher of ``config.teacher``, its weights placed on the mesh (sharded like
    parameters); its patch grid must be the student's."""
    loaded = teacher_from_config(config)
    if problem := grid_mismatch(config, loaded.arch):
        raise ConfigError(problem)
    shardings = parallel.state_shardings(loaded.params, mesh, config.mesh.fsdp_min_size)
    return loaded.graphdef, jax.device_put(loaded.params, shardings)


class Training(NamedTuple):
    """Everything a run needs to step."""

    objective: DualMIM | None  # the pixel objective; None without a pixel branch
    graphdef: nnx.GraphDef
    state: TrainState  # freshly initialised, sharded
    train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]  # compiled
    shardings: Any  # the state's (for restoring checkpoints onto this mesh)


def create_training(config: ml_collections.ConfigDict, mesh: Mesh) -> Training:
    """The objective, model and initial state of ``config`` on ``mesh``, and its compiled step
    ``train_step(state, batch)`` (the teacher, if any, bound to it)."""
    pixel = config.spatial.enabled or config.frequency.enabled
    objective = create_objective(config) if pixel else None
    representation = create_representation(config)
    tx, schedule = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    teacher_graphdef = teacher = features = None
    if representation is not None and config.teacher.targets:  # the batches bring them
        from usfm_jax.teacher_cache import read_cache_info  # validate() checked it

        _, tokens, features = read_cache_info(config.teacher.targets)["shape"]
        grid = tuple(s // config.model.patch_size for s in config.image_size)
        if tokens != grid[0] * grid[1]:
            raise ConfigError(
                f"config.teacher.targets={config.teacher.targets!r} holds {tokens} tokens per "
                f"image; the student has {grid[0]}x{grid[1]}: rebuild it for this image size"
            )
    elif representation is not None:
        teacher_graphdef, teacher = create_teacher(config, mesh)
        features = nnx.merge(teacher_graphdef, teacher).features
    graphdef, state, shardings = init_state(config, tx, mesh, features)
    step = make_train_step(
        config, graphdef, objective, tx, schedule, representation, teacher_graphdef
    )
    if teacher is None:
        compiled = jit_train_step(step, shardings, mesh)
        return Training(objective, graphdef, state, compiled, shardings)
    compiled = jit_train_step(step, shardings, mesh, jax.tree.map(lambda x: x.sharding, teacher))
    return Training(objective, graphdef, state, lambda s, b: compiled(s, b, teacher), shardings)


def make_preview(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, objective: DualMIM | None
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Returns fn(state, batch) -> {branch: [4, n, H, W, C]}: rows input / corrupted input /
    prediction / target in [0, 1] for the first ``config.num_preview_images`` images, for image
    summaries. Deterministic in the step; no dropout."""
    patch = config.model.patch_size

    def preview(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, state.params)
        images = batch["image"][: config.num_preview_images].astype(jnp.float32) / 255.0
        grid = (images.shape[1] // patch, images.shape[2] // patch)
        key = jax.random.fold_in(state.step_key(), 1)  # not the training step's masks
        out = {}
        for name in objective.branches if objective is not None else ():
            view_fn = objective.spatial_view if name == "spatial" else objective.frequency_view
            views = view_fn(images, key)
            pred = model(views.inputs, views.token_mask)  # [n, N, P]
            if objective.norm_pix:  # back from per-patch standardised to image values
                pred = denormalize_patches(pred, patchify(views.target, patch))
            rows = [
                images,
                objective.denormalize(views.inputs),
                objective.denormalize(unpatchify(pred, patch, grid)),
                objective.denormalize(views.target),
            ]
            out[name] = jnp.clip(jnp.stack(rows), 0.0, 1.0)
        return out

    return preview
