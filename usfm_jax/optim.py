"""Optimizer and learning-rate schedule of pre-training and fine-tuning."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

# Parameters that never get weight decay besides every vector (norms, biases, layer scales).
NO_DECAY_NAMES = frozenset({"cls_token", "mask_token", "pos_embed", "relative_position_bias_table"})


def decay_mask(params: Any) -> Any:
    """True for the parameters AdamW decays: matrices and kernels, not tokens or position tables."""

    def decays(path, leaf) -> bool:
        names = set(jax.tree_util.keystr(path, simple=True, separator=".").split("."))
        return leaf.ndim >= 2 and not (names & NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def peak_learning_rate(cfg: ml_collections.ConfigDict, batch_size: int) -> float:
    """The base lr is given per 512 images (linear scaling rule)."""
    return cfg.base_lr * batch_size / 512


def learning_rate_schedule(
    cfg: ml_collections.ConfigDict, batch_size: int, total_steps: int
) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to ``min_lr_ratio`` of the peak."""
    peak = peak_learning_rate(cfg, batch_size)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
        end_value=peak * cfg.min_lr_ratio,
    )


def create_optimizer(
    cfg: ml_collections.ConfigDict,
    batch_size: int,
    total_steps: int,
    lr_scales: Any = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with decoupled weight decay on matrices only, after global-norm gradient clipping.

    ``lr_scales`` (a tree of floats shaped like the parameters) multiplies each parameter's
    update, weight decay included: layer-wise lr decay, and 0 for frozen parameters.
    """
    schedule = learning_rate_schedule(cfg, batch_size, total_steps)
    # always in the chain (0: no limit), so that a resumed run may turn clipping on or off:
    # the optimizer state keeps its structure
    parts = [optax.clip_by_global_norm(cfg.clip_norm or float("inf"))]
    parts.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    )
    if lr_scales is not None:
        parts.append(scale_updates(lr_scales))
    return optax.chain(*parts), schedule


def scale_updates(scales: Any) -> optax.GradientTransformation:
    """Multiplies every update by its parameter's entry of ``scales`` (a matching tree)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def layer_decay_scales(params: Any, depth: int, decay: float, frozen: str = "") -> Any:
    """BEiT's layer-wise lr decay: ``decay ** (depth + 1 - layer)`` with layer 0 the embeddings
    (patch embedding, tokens, absolute position embedding), i + 1 block i (a block's own
    relative position table too), depth + 1 the final norm, the task head and the relative
    position table shared by all blocks (BEiT's ``get_num_layer_for_vit``: every block reads
    it). Parameters under the top-level key ``frozen`` (e.g. "encoder") get 0."""

    def layer(names: list[str]) -> int:
        if names[0] != "encoder" or names[1] in ("norm", "rel_pos_bias"):
            return depth + 1
        return int(names[2]) + 1 if names[1] == "blocks" else 0

    def scale(path, leaf) -> float:
        names = jax.tree_util.keystr(path, simple=True, separator=".").split(".")
        if frozen and names[0] == frozen:
            return 0.0
        return float(decay ** (depth + 1 - layer(names)))

    return jax.tree_util.tree_map_with_path(scale, params)


def applied_updates(opt_state: optax.OptState) -> jax.Array:
    """The schedule's step: how many updates were applied (skipped steps do not count)."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    (state,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(x)]
    return state.count
