"""The pure core of pre-training: state initialisation and the train step.

``train_step(state, batch) -> (state, metrics)`` is a function of its arguments only: the state
carries the run's PRNG key, the step's key is ``fold_in(state.rng, state.step)``, masks are drawn
on device from it, and the function is compiled once with ``jax.jit`` over a device mesh with
explicit shardings. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from usfm_jax import parallel
from usfm_jax.models.factory import create_mim_model
from usfm_jax.objectives.dual import BRANCHES, DualMIM, Views, create_objective
from usfm_jax.objectives.pixel import denormalize_patches
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

    def step_key(self) -> jax.Array:
        """The PRNG key of the current step: a function of the run's key and the step alone."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
    """The model's structure without allocating parameters."""
    return nnx.eval_shape(
        lambda: create_mim_model(config.model, tuple(config.image_size), nnx.Rngs(0))
    )


def state_initializer(
    config: ml_collections.ConfigDict, tx: optax.GradientTransformation
) -> Callable[[], TrainState]:
    """The function that creates a fresh train state: jit it with shardings to allocate one,
    or ``jax.eval_shape`` it for the shapes alone (sharding plans, ahead-of-time compiles)."""

    def init() -> TrainState:
        model = create_mim_model(
            config.model, tuple(config.image_size), nnx.Rngs(params=config.seed)
        )
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(config.seed)),
            bad_steps=jnp.zeros((), jnp.int32),
        )

    return init


def init_state(
    config: ml_collections.ConfigDict, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[nnx.GraphDef, TrainState, Any]:
    """Creates the model graph and a freshly initialised, sharded train state.

    Returns (graphdef, state, state_shardings).
    """
    init = state_initializer(config, tx)
    graphdef = nnx.graphdef(abstract_model(config))
    shardings = parallel.state_shardings(jax.eval_shape(init), mesh, config.mesh.fsdp_min_size)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


def _micro_batches(views: Views, num: int) -> Views:
    """[V, ...] -> [num, V / num, ...], micro-batch j holding views j, j + num, ...

    The strided split keeps every micro-batch spread over all devices of the batch axes.
    """
    return jax.tree.map(lambda x: x.reshape(-1, num, *x.shape[1:]).swapaxes(0, 1), views)


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    objective: DualMIM,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Returns the (un-jitted) train step for this run's model, objective and optimizer."""
    accum = config.optimizer.grad_accum_steps

    def loss_fn(params, views: Views, counts: jax.Array, key: jax.Array):
        model = nnx.merge(graphdef, params)
        pred = model(views.inputs, views.token_mask, dropout_key=key)  # [V, N, P]
        return objective.loss(pred, views, counts)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        k_views, k_drop = jax.random.split(state.step_key())
        images = batch["image"].astype(jnp.float32) / 255.0  # [B, H, W, C] in [0, 1]
        views = objective.views(images, k_views, state.step)
        counts = objective.branch_counts(views)
        if accum == 1:
            (loss, sums), grads = grad_fn(state.params, views, counts, k_drop)
        else:

            def body(carry, inputs):
                i, micro = inputs
                out, g = grad_fn(state.params, micro, counts, jax.random.fold_in(k_drop, i))
                return jax.tree.map(jnp.add, carry, (out, g)), None

            micro = _micro_batches(views, accum)
            zeros = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                jax.eval_shape(
                    grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), counts, k_drop
                ),
            )
            ((loss, sums), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient skips the update: parameters and optimizer unchanged.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(applied_updates(state.opt_state)),  # the lr of this update
            "skipped": 1 - finite.astype(jnp.int32),
            **sums,
            **{f"count_{b}": counts[i] for i, b in enumerate(BRANCHES)},
        }
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        )
        return new_state, metrics

    return train_step


def jit_train_step(
    train_step: Callable, state_shardings: Any, mesh: Mesh
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Compiles the step with explicit shardings; the old state's buffers are donated."""
    return parallel.jit_in_mesh(
        train_step,
        mesh,
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )


def create_training(
    config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[
    DualMIM,
    nnx.GraphDef,
    TrainState,
    Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
    Any,
]:
    """Everything a run needs to step: objective, model graph, initial state, compiled step, and
    the state's shardings (for restoring checkpoints onto this mesh)."""
    objective = create_objective(config)
    tx, schedule = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    graphdef, state, shardings = init_state(config, tx, mesh)
    step = make_train_step(config, graphdef, objective, tx, schedule)
    return objective, graphdef, state, jit_train_step(step, shardings, mesh), shardings


def make_preview(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, objective: DualMIM
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
        for name in objective.branches:
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
