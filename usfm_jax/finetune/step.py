"""The pure core of fine-tuning: task losses, the train step and the prediction function.

``step(state, batch) -> (state, metrics)`` reuses pre-training's ``TrainState`` and its
optimizer update (non-finite steps are skipped); the step's key (drop path) is
``fold_in(state.rng, state.step)``. Batches hold uint8 images [B, H, W, 1] and the task's
target: ``label`` [B], ``mask`` [B, H, W] or ``target`` [B, H, W, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from usfm_jax.data.layout import IGNORE
from usfm_jax.train_step import Batch, Metrics, TrainState, accumulate, apply_gradients


def images_of(batch: Batch) -> jax.Array:
    return batch["image"].astype(jnp.float32) / 255.0  # [B, H, W, 1] in [0, 1]


def classification_loss(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Mean cross-entropy [B, C] x [B] with label smoothing."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def segmentation_loss(
    logits: jax.Array, mask: jax.Array, dice_weight: float
) -> tuple[jax.Array, Metrics]:
    """Pixel cross-entropy over the non-ignored pixels plus ``dice_weight`` times the soft
    Dice loss of the foreground classes (pooled over the batch). logits [B, H, W, C]."""
    valid = mask != IGNORE  # [B, H, W]
    labels = jnp.where(valid, mask, 0).astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    ce = jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)
    probs = jax.nn.softmax(logits)[..., 1:] * valid[..., None]  # [B, H, W, C - 1]
    truth = jax.nn.one_hot(labels, logits.shape[-1])[..., 1:] * valid[..., None]
    inter = jnp.sum(probs * truth, axis=(0, 1, 2))
    dice = (2 * inter + 1.0) / (probs.sum((0, 1, 2)) + truth.sum((0, 1, 2)) + 1.0)
    dice_loss = 1.0 - dice.mean()
    return ce + dice_weight * dice_loss, {"loss_ce": ce, "loss_dice": dice_loss}


def task_loss(
    config: ml_collections.ConfigDict, outputs: jax.Array, batch: Batch
) -> tuple[jax.Array, Metrics]:
    if config.task == "classify":
        return classification_loss(outputs, batch["label"], config.loss.label_smoothing), {}
    if config.task == "segment":
        return segmentation_loss(outputs, batch["mask"], config.loss.dice_weight)
    target = batch["target"].astype(jnp.float32) / 255.0
    return jnp.mean(jnp.abs(outputs - target)), {}  # L1 on [0, 1] intensities


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The (un-jitted) fine-tuning step of ``config.task``. With
    ``optimizer.grad_accum_steps`` = A, the gradient is the mean of those of A micro-batches:
    the whole batch's for classification and enhancement; for segmentation each micro-batch
    normalises its cross-entropy and pools its Dice on its own."""
    accum = config.optimizer.grad_accum_steps

    def loss_fn(params, batch: Batch, key: jax.Array):
        outputs = nnx.merge(graphdef, params)(images_of(batch), dropout_key=key)
        loss, aux = task_loss(config, outputs, batch)
        return loss / accum, jax.tree.map(lambda x: x / accum, aux)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        (loss, aux), grads = accumulate(
            lambda micro, key: grad_fn(state.params, micro, key), batch, accum, state.step_key()
        )
        state, metrics = apply_gradients(state, grads, loss, tx, schedule)
        return state, {**metrics, **aux}

    return train_step


def make_predict(task: str, graphdef: nnx.GraphDef) -> Callable[[dict, jax.Array], jax.Array]:
    """``predict(params, images uint8 [B, H, W, 1])``: class probabilities [B, C], label maps
    int32 [B, H, W] or enhanced images [B, H, W, 1] in [0, 1]."""

    def predict(params: dict, images: jax.Array) -> jax.Array:
        outputs = nnx.merge(graphdef, params)(images.astype(jnp.float32) / 255.0)
        if task == "classify":
            return jax.nn.softmax(outputs.astype(jnp.float32))
        if task == "segment":
            return jnp.argmax(outputs, axis=-1).astype(jnp.int32)
        return jnp.clip(outputs, 0.0, 1.0)

    return predict
