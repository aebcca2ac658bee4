"""The transformer MLP, fc2(GELU(fc1(x))), with its GELU fused into Pallas (Triton) matmuls.

Why: on an H100 the ViT-B/16 dual step spends ~9 ms of 85 in two memory-bound kernels around
the MLP's matmuls (docs/benchmarks.md): the GELU, which reads fc1's [tokens, hidden] output
and writes its activation, and the GELU's gradient with fc1's bias gradient, which reads the
gradient of the activation and fc1's output and writes the gradient of fc1's output. cuBLAS
cannot take an exact (erf) GELU as a matmul epilogue, and XLA does not fuse one into its
GEMMs. Here two kernels do that work in the epilogues of the matmuls that produce those tensors:

- forward, h = x @ w1 + b1: the epilogue also writes GELU(h), so no separate kernel reads h
  back to compute it;
- backward, dg = dy @ w2^T: the epilogue reads h and writes dh = dg * GELU'(h) and the column
  sums of its tile (fc1's bias gradient, one partial sum per row block), so dg is never written.

fc2 and the other matmuls of the backward pass (dw2, dw1, dx) stay XLA's (cuBLAS). With
``xla_gelu`` the forward pass is XLA's too (fc1 by cuBLAS, then that GELU) and only the backward
kernel runs: on an H100 the forward kernel lost to cuBLAS and XLA's GELU kernel, the backward
one won over cuBLAS and XLA's GELU-gradient kernel (docs/benchmarks.md). The kernels
compute in float32 and round once, so in bf16 they are if anything closer to float32 than XLA's
path. Triton has no erf, so the GELU uses an approximation of erf, within 5e-7 in float32.
Where the program is not lowered for a GPU the kernels run in Pallas' interpreter: correct,
slow, for tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from usfm_jax.models.triton_tiles import (
    KernelTiling,
    dot,
    fit_block,
    load,
    pallas_call,
    round_up,
    within,
)


@dataclasses.dataclass(frozen=True)
class MlpTiling(KernelTiling):
    """Block sizes and launch parameters of both kernels (each a [tokens, hidden] matmul with a
    contraction over the model width)."""

    block_m: int = 128  # token rows per program
    block_n: int = 128  # hidden columns per program
    block_k: int = 64  # width per step of the contraction loop
    warps: int = 8
    stages: int = 3


DEFAULT_MLP_TILING = MlpTiling()  # benchmarks may replace it


def fused_mlp(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    w2: jax.Array,
    b2: jax.Array | None,
    *,
    xla_gelu: Callable[[jax.Array], jax.Array] | None = None,
    tiling: MlpTiling | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """GELU(x @ w1 + b1) @ w2 + b2 with the exact (erf) GELU, over tokens x [..., D].

    w1 [D, H], b1 [H], w2 [H, D_out], b2 [D_out] or None (no output bias: a caller that adds
    it itself), all in x's (floating) dtype. Returns [..., D_out]. ``xla_gelu``: the exact GELU
    as XLA computes it, for a forward pass by XLA (only the backward kernel runs); None: the
    forward kernel. ``tiling`` defaults to DEFAULT_MLP_TILING; ``interpret`` None: Triton when
    lowered for a GPU, the interpreter elsewhere.
    """
    d, hidden, d_out = x.shape[-1], w1.shape[-1], w2.shape[-1]
    expected = dict(w1=(d, hidden), b1=(hidden,), w2=(hidden, d_out), b2=(d_out,))
    for name, array in zip(expected, (w1, b1, w2, b2), strict=True):
        if array is None and name == "b2":
            continue
        if array.shape != expected[name]:
            raise ValueError(
                f"fused_mlp: for x [..., {d}] and w1 [{d}, {hidden}], {name} must be "
                f"{list(expected[name])}, got {list(array.shape)}"
            )
        if array.dtype != x.dtype:
            raise ValueError(f"fused_mlp: {name} is {array.dtype}, x is {x.dtype}: cast first")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"fused_mlp: x must be floating point, got {x.dtype}")
    tokens = x.reshape(-1, d)  # [N, D]
    y = _mlp(tokens, w1, b1, w2, b2, xla_gelu, tiling or DEFAULT_MLP_TILING, interpret)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _mlp(x, w1, b1, w2, b2, xla_gelu, tiling, interpret):
    return _forward(x, w1, b1, w2, b2, xla_gelu, tiling, interpret)[0]


def _forward(x, w1, b1, w2, b2, xla_gelu, tiling, interpret):
    if xla_gelu is None:
        h, g = _matmul_epilogue(_up_kernel, x, w1, b1, tiling, interpret)  # [N, H] each
    else:  # cuBLAS with the bias in its epilogue, then XLA's GELU kernel
        h = x @ w1 + b1
        g = xla_gelu(h)
    y = g @ w2  # [N, D_out]
    if b2 is not None:
        y = y + b2
    return y, (x, w1, w2, h, g, b2 is None)


def _backward(xla_gelu, tiling, interpret, residuals, dy):
    x, w1, w2, h, g, no_b2 = residuals
    dh, db1 = _matmul_epilogue(_down_grad_kernel, dy, w2, h, tiling, interpret)
    db1 = jnp.sum(db1, axis=0).astype(x.dtype)  # the row blocks' partial sums
    db2 = None if no_b2 else jnp.sum(dy, axis=0, dtype=jnp.float32).astype(x.dtype)
    return dh @ w1.T, x.T @ dh, db1, g.T @ dy, db2


_mlp.defvjp(_forward, _backward)


def _matmul_epilogue(kernel, a, b, extra, tiling, interpret):
    """Runs ``kernel`` on a grid of [block_m, block_n] tiles of the [N, H] product of a [N, K]
    with b ([K, H] for the forward kernel, [H, K] for the backward one); ``extra`` is the
    bias [H] (forward) or h [N, H] (backward)."""
    forward = kernel is _up_kernel
    rows, depth = a.shape
    cols = b.shape[1] if forward else b.shape[0]
    block_m, block_n = fit_block(tiling.block_m, rows), fit_block(tiling.block_n, cols)
    block_k = fit_block(tiling.block_k, depth)
    depth_padded = round_up(depth, block_k)  # the contraction, as whole steps (masked beyond)
    tile = pl.BlockSpec((block_m, block_n), lambda j, i: (i, j))
    if forward:
        b_spec = pl.BlockSpec((depth_padded, block_n), lambda j, i: (0, j))
        extra_spec = pl.BlockSpec((block_n,), lambda j, i: (j,))
        out_specs = [tile, tile]
        out_shape = [jax.ShapeDtypeStruct((rows, cols), a.dtype)] * 2  # h, GELU(h)
    else:
        b_spec = pl.BlockSpec((block_n, depth_padded), lambda j, i: (j, 0))
        extra_spec = tile
        out_specs = [tile, pl.BlockSpec((None, block_n), lambda j, i: (i, j))]
        out_shape = [  # dh, and its column sums per row block
            jax.ShapeDtypeStruct((rows, cols), a.dtype),
            jax.ShapeDtypeStruct((pl.cdiv(rows, block_m), cols), jnp.float32),
        ]
    # hidden columns vary fastest: programs running together share a's rows (b stays in L2)
    return pallas_call(
        functools.partial(kernel, rows=rows, cols=cols, depth=depth, block_k=block_k),
        grid=(pl.cdiv(cols, block_n), pl.cdiv(rows, block_m)),
        in_specs=[pl.BlockSpec((block_m, depth_padded), lambda j, i: (i, 0)), b_spec, extra_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tiling.compiler_params(tiling.warps),
        interpret=interpret,
        name="usfm_mlp_forward" if forward else "usfm_mlp_backward",
    )(a, b, extra)


def _up_kernel(x_ref, w_ref, b_ref, h_ref, g_ref, *, rows, cols, depth, block_k):
    # x_ref [block_m, K']; w_ref [K', block_n]; b_ref [block_n]; h_ref, g_ref [block_m, block_n]
    row_ok, col_ok = _tile_masks(h_ref.shape, rows, cols)
    h = _contract(x_ref, w_ref, row_ok, col_ok, depth, block_k, trans_b=False)
    h += load(b_ref, col_ok).astype(jnp.float32)[None, :]
    mask = _both(row_ok, col_ok)
    plgpu.store(h_ref, h.astype(h_ref.dtype), mask=mask)
    plgpu.store(g_ref, gelu(h).astype(g_ref.dtype), mask=mask)


def _down_grad_kernel(dy_ref, w_ref, h_ref, dh_ref, db_ref, *, rows, cols, depth, block_k):
    # dy_ref [block_m, K']; w_ref [block_n, K'] (rows of w2); h_ref, dh_ref [block_m, block_n];
    # db_ref [block_n]
    row_ok, col_ok = _tile_masks(dh_ref.shape, rows, cols)
    dg = _contract(dy_ref, w_ref, row_ok, col_ok, depth, block_k, trans_b=True)
    mask = _both(row_ok, col_ok)
    h = load(h_ref, mask).astype(jnp.float32)
    dh = dg * gelu_grad(h)  # 0 outside the matrix: dg is
    plgpu.store(dh_ref, dh.astype(dh_ref.dtype), mask=mask)
    plgpu.store(db_ref, jnp.sum(dh, axis=0), mask=col_ok)


def _tile_masks(shape, rows, cols):
    """Which rows and columns of this program's [block_m, block_n] tile lie inside [rows, cols];
    None where the blocks divide the matrix (no masking needed)."""
    block_m, block_n = shape
    row_ok = within(pl.program_id(1) * block_m, block_m, rows) if rows % block_m else None
    col_ok = within(pl.program_id(0) * block_n, block_n, cols) if cols % block_n else None
    return row_ok, col_ok


def _both(row_ok, col_ok):
    """The [rows, cols] mask of a tile from its row and column masks (None: all inside)."""
    if row_ok is None and col_ok is None:
        return None
    if col_ok is None:
        return row_ok[:, None]
    if row_ok is None:
        return col_ok[None, :]
    return row_ok[:, None] & col_ok[None, :]


def _contract(a_ref, b_ref, row_ok, col_ok, depth, block_k, trans_b):
    """[block_m, block_n] float32: a's rows times b's columns (b's rows, ``trans_b``), over
    the ``depth`` contraction in steps of block_k; zero outside the matrix."""
    block_m = a_ref.shape[0]
    block_n = b_ref.shape[0] if trans_b else b_ref.shape[1]

    def step(s, acc):
        start = s * block_k
        ks = pl.ds(start, block_k)
        k_ok = within(start, block_k, depth) if depth % block_k else None
        a = load(a_ref.at[:, ks], _both(row_ok, k_ok))
        if trans_b:
            b = load(b_ref.at[:, ks], _both(col_ok, k_ok))
        else:
            b = load(b_ref.at[ks, :], _both(k_ok, col_ok))
        return acc + dot(a, b, trans_b=trans_b)

    acc = jnp.zeros((block_m, block_n), jnp.float32)
    return jax.lax.fori_loop(0, pl.cdiv(depth, block_k), step, acc)


# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t (a1 + t (a2 + ...)) exp(-x^2), t = 1 / (1 + p x)
# for x >= 0, within 1.5e-7 (5e-7 with float32 rounding); Triton has no erf of its own.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x: jax.Array) -> jax.Array:
    """erf of float32 x, within 5e-7 (absolute) of the exact function; Triton-lowerable."""
    z = jnp.abs(x)
    t = 1.0 / (1.0 + _ERF_P * z)
    poly = _ERF_A[-1]
    for a in reversed(_ERF_A[:-1]):
        poly = a + t * poly
    y = 1.0 - t * poly * jnp.exp(-z * z)
    return jnp.where(x < 0, -y, y)


def gelu(h: jax.Array) -> jax.Array:
    """Exact GELU, h * Phi(h), of float32 h."""
    return 0.5 * h * (1.0 + erf(h * (1 / math.sqrt(2))))


def gelu_grad(h: jax.Array) -> jax.Array:
    """d GELU / dh = Phi(h) + h * phi(h), of float32 h."""
    return 0.5 * (1.0 + erf(h * (1 / math.sqrt(2)))) + h * jnp.exp(-0.5 * h * h) * (
        1 / math.sqrt(2 * math.pi)
    )
