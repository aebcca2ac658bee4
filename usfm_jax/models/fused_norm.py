"""LayerNorm fused with the residual add before it, as Pallas (Triton) kernels.

Why: with the Pallas attention and MLP, LayerNorm and the residual adds are the largest
memory-bound work left in the ViT-B/16 dual step on an H100 (docs/benchmarks.md, "Compiled for
an H100 without one"). XLA reads a LayerNorm's input twice, once for the row statistics and
once to apply them, in the forward pass and again in the backward one, and the residual add
before it is a kernel of its own. Here one kernel does each direction, a row of D values per
token held in registers:

- forward: x_new = x + s * (delta + c) (``s`` stochastic depth's per-example factor, ``c`` the
  bias of the layer that computed delta, if given), written once, and y = LayerNorm(x_new) *
  gamma + beta; the rows' mean and 1 / std are kept (float32, one value a token) for the
  backward pass;
- backward: dx = g + LayerNorm'(dy), where g is the gradient that reaches x_new from the
  residual stream, so the add of the two gradients is not a kernel of its own either; the
  gradient of delta, s * dx, is written only where there is an ``s``; gamma's, beta's (and
  c's) gradients are summed per program (one float32 row each) and the programs' sums by XLA,
  so that no other kernel reads the gradients again to sum them.

Without ``delta`` the op is a plain LayerNorm that passes x through: (x, LayerNorm(x)). A
caller that carries on with the returned x, not its own, gets the residual gradient added in
the backward kernel (see ``vit.Block``).

Statistics are float32 and two-pass (the row is in registers, so that costs nothing), x_new is
rounded to x's dtype once and normalised as rounded. Where the program is not lowered for a GPU
the kernels run in Pallas' interpreter: correct, slow, for tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from usfm_jax.models.triton_tiles import KernelTiling, load, pallas_call, within


@dataclasses.dataclass(frozen=True)
class NormTiling(KernelTiling):
    """Rows per program and launch parameters of both kernels (each row is the whole width, as
    the next power of two, masked beyond it)."""

    rows: int = 4  # forward: token rows per program; backward: rows per step of its loop
    row_steps: int = 32  # backward: loop steps per program (one gamma / beta partial sum each)
    warps: int = 4
    stages: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.rows & (self.rows - 1):
            raise ValueError(f"NormTiling.rows must be a power of two, got {self.rows}")


DEFAULT_NORM_TILING = NormTiling()  # benchmarks may replace it


def residual_layer_norm(
    x: jax.Array,
    delta: jax.Array | None,
    scale: jax.Array | None,
    gamma: jax.Array,
    beta: jax.Array,
    delta_bias: jax.Array | None = None,
    *,
    eps: float,
    tiling: NormTiling | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(x_new, LayerNorm(x_new) * gamma + beta) for x_new = x + scale * (delta + delta_bias),
    over x [B, ..., D].

    ``delta``: like x, or None (x_new is x); ``scale``: [B], one factor per example (stochastic
    depth), or None; it is a constant here (no gradient flows to it) and applied in float32
    (XLA's ``x + delta * scale`` in bf16 rounds 1 / 0.9 to 1.109). ``delta_bias``: [D], the
    bias of the linear layer that computed delta (added here, so that its gradient is summed
    in the backward kernel), or None. ``gamma``, ``beta``: [D], used as given (float32
    parameters stay float32). Both results are in x's dtype. ``tiling`` defaults to
    DEFAULT_NORM_TILING; ``interpret`` None: Triton when lowered for a GPU, the interpreter
    elsewhere.
    """
    d = x.shape[-1]
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"residual_layer_norm: x must be floating point, got {x.dtype}")
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype):
        raise ValueError(
            f"residual_layer_norm: delta must match x {x.dtype}{list(x.shape)}, "
            f"got {delta.dtype}{list(delta.shape)}"
        )
    if scale is not None and (delta is None or scale.shape != x.shape[:1]):
        raise ValueError(
            f"residual_layer_norm: scale must be [{x.shape[0]}] (one factor per example) and "
            f"comes with a delta, got {None if scale is None else list(scale.shape)}"
        )
    if delta_bias is not None and delta is None:
        raise ValueError("residual_layer_norm: delta_bias comes with a delta")
    for name, param in (("gamma", gamma), ("beta", beta), ("delta_bias", delta_bias)):
        if param is not None and param.shape != (d,):
            raise ValueError(f"residual_layer_norm: {name} must be [{d}], got {list(param.shape)}")
    rows = x.size // d
    if scale is not None:  # one factor per token row, as the kernels read it
        scale = jnp.repeat(jax.lax.stop_gradient(scale).astype(jnp.float32), rows // x.shape[0])
    flat = (None if a is None else a.reshape(rows, d) for a in (x, delta))
    tiling = tiling or DEFAULT_NORM_TILING
    x_new, y = _norm(*flat, scale, gamma, beta, delta_bias, eps, tiling, interpret)
    return x_new.reshape(x.shape), y.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _norm(x, delta, scale, gamma, beta, delta_bias, eps, tiling, interpret):
    return _forward(x, delta, scale, gamma, beta, delta_bias, eps, tiling, interpret)[0]


def _blocks(rows: int, d: int, tiling: NormTiling, steps: int = 1):
    """(block, [block * steps, Dp] tiles, [block * steps] per-row values, the [Dp] parameters):
    each program's rows (``steps`` loop steps of ``block`` rows), the width as the next power
    of two."""
    dp = pl.next_power_of_2(d)
    block = min(tiling.rows, pl.next_power_of_2(rows))
    chunk = block * steps
    tile = pl.BlockSpec((chunk, dp), lambda i: (i, 0))
    per_row = pl.BlockSpec((chunk,), lambda i: (i,))
    return block, tile, per_row, pl.BlockSpec((dp,), lambda i: (0,))


def _forward(x, delta, scale, gamma, beta, delta_bias, eps, tiling, interpret):
    rows, d = x.shape
    block, tile, per_row, whole = _blocks(rows, d, tiling)
    out_specs = [tile, per_row, per_row]
    out_shape = [jax.ShapeDtypeStruct((rows, d), x.dtype)]  # y
    out_shape += [jax.ShapeDtypeStruct((rows,), jnp.float32)] * 2  # mean, 1 / std
    if delta is not None:
        out_specs.insert(0, tile)
        out_shape.insert(0, jax.ShapeDtypeStruct((rows, d), x.dtype))  # x_new
    outputs = pallas_call(
        functools.partial(_forward_kernel, rows=rows, d=d, eps=eps, residual=delta is not None),
        grid=(pl.cdiv(rows, block),),
        in_specs=[  # x, delta, scale, gamma, beta, delta_bias
            tile,
            None if delta is None else tile,
            None if scale is None else per_row,
            whole,
            whole,
            None if delta_bias is None else whole,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tiling.compiler_params(tiling.warps),
        interpret=interpret,
        name="usfm_norm_residual_forward" if delta is not None else "usfm_norm_forward",
    )(x, delta, scale, gamma, beta, delta_bias)
    x_new, y, mean, rstd = outputs if delta is not None else (x, *outputs)
    return (x_new, y), (x_new, delta is None, scale, gamma, beta, delta_bias, mean, rstd)


def _backward(eps, tiling, interpret, residuals, cotangents):
    x_new, plain, scale, gamma, beta, delta_bias, mean, rstd = residuals
    g, dy = cotangents  # the gradients of x_new (from the residual stream) and of y
    rows, d = x_new.shape
    block, tile, per_row, whole = _blocks(rows, d, tiling, tiling.row_steps)
    programs = pl.cdiv(rows, block * tiling.row_steps)
    partial = pl.BlockSpec((None, pl.next_power_of_2(d)), lambda i: (i, 0))
    sums = 2 if delta_bias is None else 3  # partial sums of gamma's, beta's, delta_bias's
    out_specs = [tile] + [partial] * sums
    out_shape = [jax.ShapeDtypeStruct((rows, d), x_new.dtype)]  # dx
    out_shape += [jax.ShapeDtypeStruct((programs, d), jnp.float32)] * sums
    if scale is not None:
        out_specs.insert(1, tile)
        out_shape.insert(1, jax.ShapeDtypeStruct((rows, d), x_new.dtype))  # d delta
    outputs = pallas_call(
        functools.partial(_backward_kernel, rows=rows, d=d, block=block, sums=sums),
        grid=(programs,),
        in_specs=[  # dy, x_new, g, scale, gamma, mean, 1 / std
            tile,
            tile,
            tile,
            None if scale is None else per_row,
            whole,
            per_row,
            per_row,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tiling.compiler_params(tiling.warps),
        interpret=interpret,
        name="usfm_norm_scaled_backward" if scale is not None else "usfm_norm_backward",
    )(dy.astype(x_new.dtype), x_new, g.astype(x_new.dtype), scale, gamma, mean, rstd)
    dx, d_delta, *partials = outputs if scale is not None else (outputs[0], *outputs)
    params = [p for p in (gamma, beta, delta_bias) if p is not None]
    d_gamma, d_beta, *d_bias = (
        jnp.sum(part, axis=0).astype(p.dtype) for p, part in zip(params, partials, strict=True)
    )
    d_bias = d_bias[0] if d_bias else None
    d_scale = None if scale is None else jnp.zeros_like(scale)
    return dx, None if plain else d_delta, d_scale, d_gamma, d_beta, d_bias


_norm.defvjp(_forward, _backward)


def _forward_kernel(
    x_ref, delta_ref, scale_ref, gamma_ref, beta_ref, bias_ref, *out_refs, rows, d, eps, residual
):
    # x_ref, delta_ref [block, Dp]; scale_ref [block] or None; gamma_ref, beta_ref [Dp];
    # bias_ref [Dp] or None; outputs: x_new [block, Dp] (with a delta), y [block, Dp], mean and
    # 1 / std [block]
    x_new_ref, y_ref, mean_ref, rstd_ref = out_refs if residual else (None, *out_refs)
    block, dp = x_ref.shape
    row_ok = within(pl.program_id(0) * block, block, rows)
    col_ok = within(0, dp, d)
    mask = row_ok[:, None] & col_ok[None, :]
    x = _load(x_ref, mask)
    if residual:
        delta = _load(delta_ref, mask)
        if bias_ref is not None:
            delta += _load(bias_ref, col_ok)[None, :]
        if scale_ref is not None:
            delta = delta * _load(scale_ref, row_ok)[:, None]
        x_new = (x + delta).astype(x_new_ref.dtype)  # normalised as stored
        plgpu.store(x_new_ref, x_new, mask=mask)
        x = x_new.astype(jnp.float32)
    mean = jnp.sum(x, axis=1) / d
    centered = jnp.where(mask, x - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(centered * centered, axis=1) / d + eps)
    y = centered * rstd[:, None] * _load(gamma_ref, col_ok)[None, :]
    y += _load(beta_ref, col_ok)[None, :]
    plgpu.store(y_ref, y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref, mean, mask=row_ok)
    plgpu.store(rstd_ref, rstd, mask=row_ok)


def _backward_kernel(
    dy_ref, x_ref, g_ref, scale_ref, gamma_ref, mean_ref, rstd_ref, *out_refs, rows, d, block, sums
):
    # dy_ref, x_ref, g_ref [chunk, Dp]: this program's rows of y's and x_new's gradients and
    # of x_new; scale_ref, mean_ref, rstd_ref [chunk]; gamma_ref [Dp]; outputs: dx (and
    # d delta, with a scale) [chunk, Dp], the partial sums [Dp] of gamma's and beta's gradients
    # (and of delta_bias's, d delta's sum over the rows, if ``sums`` is 3)
    scaled = scale_ref is not None
    dx_ref, d_delta_ref, *sum_refs = out_refs if scaled else (out_refs[0], None, *out_refs[1:])
    chunk, dp = x_ref.shape
    col_ok = within(0, dp, d)
    gamma = _load(gamma_ref, col_ok)
    first = pl.program_id(0) * chunk

    def step(s, totals):
        here = pl.ds(s * block, block)
        row_ok = within(first + s * block, block, rows)
        mask = row_ok[:, None] & col_ok[None, :]
        dy = _load(dy_ref.at[here], mask)
        x = _load(x_ref.at[here], mask)
        x_hat = jnp.where(mask, (x - _load(mean_ref.at[here], row_ok)[:, None]), 0.0)
        rstd = _load(rstd_ref.at[here], row_ok)[:, None]
        x_hat *= rstd
        wdy = dy * gamma[None, :]
        c_hat = jnp.sum(x_hat * wdy, axis=1, keepdims=True) / d
        c_mean = jnp.sum(wdy, axis=1, keepdims=True) / d
        dx = (wdy - x_hat * c_hat - c_mean) * rstd + _load(g_ref.at[here], mask)
        plgpu.store(dx_ref.at[here], dx.astype(dx_ref.dtype), mask=mask)
        d_delta = dx  # rows beyond the array are zero
        if scaled:
            d_delta = dx * _load(scale_ref.at[here], row_ok)[:, None]
            plgpu.store(d_delta_ref.at[here], d_delta.astype(d_delta_ref.dtype), mask=mask)
        terms = (dy * x_hat, dy, d_delta)[:sums]  # gamma's, beta's (and delta_bias's) gradients
        return tuple(t + jnp.sum(term, axis=0) for t, term in zip(totals, terms, strict=True))

    zeros = (jnp.zeros((dp,), jnp.float32),) * sums
    totals = jax.lax.fori_loop(0, chunk // block, step, zeros)
    for ref, total in zip(sum_refs, totals, strict=True):
        plgpu.store(ref, total, mask=col_ok)


def _load(ref, mask):
    """``ref``'s block in float32, zero where ``mask`` is False."""
    return load(ref, mask).astype(jnp.float32)
