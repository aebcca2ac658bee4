"""Attention as Pallas (Triton) kernels, for ViT-length sequences with a bias shared by the batch.

Why: on an H100 the ViT-B/16 dual step spends ~19 ms of 85 in cuDNN's fused attention plus ~4 ms
in the copies around it (docs/benchmarks.md). cuDNN writes the whole [B, heads, T, T] score
gradient to memory to reduce it over the batch for the position bias's gradient, and it needs
q, k and v split out of the fused projection, padded to an even length, and their gradients
concatenated back. These kernels instead:

- read q, k and v in place from the projection's output [B, T, 3, heads, Dh] and write dq, dk and
  dv into one gradient of that layout (no split, pad or concatenation);
- mask the ragged last block (197 tokens) instead of padding, except in the position bias, which
  is small and read again for every image: it is padded once, in the forward pass, to tiles
  that all three kernels read unmasked, in 16-byte vectors (``_bias_tiles``);
- sum the bias gradient over the batch inside a backward kernel, in registers, writing one
  partial sum per chunk of the batch ([B / chunk, heads, T, T] instead of [B, heads, T, T]);
- sum the qkv projection's bias gradient over the tokens inside the backward kernels, which hold
  dq, dk and dv in registers anyway: float32 rows per program (dq's; dk's and dv's), where XLA
  would read the whole [B, T, 3, heads, Dh] gradient once more for it (2.8 GB a ViT-B/16 dual
  step at batch 128).

The kernels follow FlashAttention-2 (base-2 exponentials, the log-sum-exp saved for the backward
pass, ``sum(dO * O)`` as the softmax's row term):

- forward, grid (query blocks, B, heads): online softmax over the key blocks;
- dq, grid (query blocks, heads, B or batch chunks): it runs first and computes the row term
  from its tiles of dO and O, and writes it for
- dk and dv, grid (key blocks, B or batch chunks, heads), into the same gradient.

(FlashAttention-2 computes the row term in a kernel of its own, which reads dO and O once more.)

One of the two backward kernels sums the bias gradient (``Tiling.bias_grad``): its programs
loop over a chunk of the batch, keeping one accumulator per tile of the whole sequence (hence
at most MAX_TOKENS tokens). The other takes one image a program and loops over its tiles, as
the forward does. In the dq kernel (the default) the accumulators hold its query tiles to 16
rows; in the dk / dv kernel they cost that kernel registers, but the dq kernel can then take
64-row tiles (Hopper's wgmma instead of mma.sync) and read each image's k and v 4 times
instead of 13.

Scores, softmax and accumulators are float32 whatever the compute dtype. Where the program is
not lowered for a GPU the kernels run in Pallas' interpreter: correct, slow, for tests. The
default tiling is sized for an H100 (sm_90); other GPUs have less shared memory per SM.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from usfm_jax.models.triton_tiles import (
    KernelTiling,
    dot,
    fit_block,
    pallas_call,
    round_up,
    within,
)

# Sizes the default tiling fits an H100's SM for (benchmarks/pallas_kernels.py). The dq kernel
# keeps a bias-gradient sum per key tile and stages every key of a sequence in shared memory:
# at 577 tokens (384 px) it needs more than an SM has; heads wider than 64 (ViT-H's 80, padded
# to 128) spill registers in the dk / dv kernel and need 160 KiB of shared memory in the dq one.
MAX_TOKENS = 256  # a ViT/16 at 224 px has 197
MAX_HEAD_DIM = 64  # ViT-S, B and L
LOG2E = math.log2(math.e)
NEG_INF = -1e30  # a masked score: exp2 of it is 0, and it stays finite in float32 arithmetic


@dataclasses.dataclass(frozen=True)
class Tiling(KernelTiling):
    """Block sizes (powers of two, >= 16: Triton's dot) and launch parameters of the kernels."""

    block_q: int = 64  # forward: query rows per program
    # forward: keys per step of the inner loop; 32 computes 224 of 197 keys, not 256 (an H100
    # ran the encoder's forward + backward 4% faster than with 64, docs/benchmarks.md)
    block_k: int = 32
    block_q_dkv: int = 64  # dk / dv kernel: query rows per step
    block_k_dkv: int = 64  # dk / dv kernel: keys per program
    block_q_dq: int = 16  # dq kernel: query rows per program
    block_k_dq: int = 256  # dq kernel: keys per tile (with bias_grad="dq", a bias sum each)
    # dq kernel, and the dk / dv kernel where it sums the bias gradient: batch elements per
    # program (one bias partial sum each)
    batch_chunk: int = 16
    warps: int = 4  # forward
    warps_dkv: int = 4
    warps_dq: int = 4
    stages: int = 2  # software-pipelining stages of the loops (every kernel)
    # The kernel that sums the position bias's gradient over the batch, in float32 registers:
    # "dq" keeps a [block_q_dq, T] sum per program, which holds its query tiles to 16 rows
    # (Ampere's mma.sync, every image's k and v read T / 16 times); "dkv" keeps a
    # [T, block_k_dkv] sum in the dk / dv kernel, which then loops over batch_chunk images,
    # and frees the dq kernel for 64-row tiles (Hopper's wgmma; with warps_dkv=8)
    bias_grad: str = "dq"

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"bias_grad": ("dq", "dkv")}


DEFAULT_TILING = Tiling()  # registers without spills on sm_90 (benchmarks/pallas_kernels.py)


def fused_attention(
    qkv: jax.Array,
    bias: jax.Array | None = None,
    qkv_bias: jax.Array | None = None,
    *,
    tiling: Tiling | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(Dh) + bias) v for q, k, v stacked as the qkv projection writes them.

    qkv [B, T, 3, heads, Dh]; ``bias`` [1, heads, T, T] (shared by the batch) or None;
    ``qkv_bias`` [3, heads, Dh], the projection's bias, or None: added to qkv here (XLA fuses
    the add into the projection's matmul) so that the backward kernels can sum its gradient.
    Returns [B, T, heads, Dh] in qkv's dtype. ``tiling`` defaults to DEFAULT_TILING (which
    benchmarks may replace); ``interpret`` None: Triton when lowered for a GPU, the interpreter
    elsewhere.
    """
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [B, T, 3, heads, Dh], got {qkv.shape}")
    if not jnp.issubdtype(qkv.dtype, jnp.floating):
        raise ValueError(f"qkv must be floating point, got {qkv.dtype}")
    _, t, _, heads, head_dim = qkv.shape
    if t > MAX_TOKENS or head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"the Pallas attention kernels take up to {MAX_TOKENS} tokens (a ViT/16 at 224 px has "
            f"197) and heads up to {MAX_HEAD_DIM} wide, got {t} tokens and heads of {head_dim}: "
            f"use attention 'cudnn' or 'xla'"
        )
    if bias is not None and bias.shape != (1, heads, t, t):
        raise ValueError(f"bias must be [1, heads, T, T] = {(1, heads, t, t)}, got {bias.shape}")
    if qkv_bias is not None and qkv_bias.shape != (3, heads, head_dim):
        raise ValueError(
            f"qkv_bias must be [3, heads, Dh] = {(3, heads, head_dim)}, got {qkv_bias.shape}"
        )
    return _attention(qkv, bias, qkv_bias, tiling or DEFAULT_TILING, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(qkv, bias, qkv_bias, tiling, interpret):
    return _forward(qkv, bias, qkv_bias, tiling, interpret)[0]


def _forward(qkv, bias, qkv_bias, tiling, interpret):
    b, t, _, heads, head_dim = qkv.shape
    if qkv_bias is not None:  # as the projection's [B*T, 3D] output: its matmul's bias epilogue
        flat = qkv.reshape(b * t, -1) + qkv_bias.reshape(-1).astype(qkv.dtype)
        qkv = flat.reshape(qkv.shape)
    dp = pl.next_power_of_2(head_dim)  # a head's width as the kernels see it (masked beyond Dh)
    block_q, block_k = fit_block(tiling.block_q, t), fit_block(tiling.block_k, t)
    t_keys = round_up(t, block_k)
    kernel = functools.partial(
        _forward_kernel, t=t, head_dim=head_dim, block_k=block_k, scale=head_dim**-0.5
    )
    qkv_spec = functools.partial(_qkv_block, dp=dp)
    bias_tiles = None if bias is None else _bias_tiles(bias, qkv.dtype, tiling)
    in_specs = [
        qkv_spec(block_q, lambda i, n, h: (n, i, 0, h, 0)),  # q [block_q, Dp]
        qkv_spec(t_keys, lambda i, n, h: (n, 0, 1, h, 0)),  # k [T_keys, Dp]
        qkv_spec(t_keys, lambda i, n, h: (n, 0, 2, h, 0)),  # v [T_keys, Dp]
        None if bias is None else pl.BlockSpec((None, block_q, t_keys), lambda i, n, h: (h, i, 0)),
    ]
    out, lse = pallas_call(
        kernel,
        grid=(pl.cdiv(t, block_q), b, heads),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, block_q, None, dp), lambda i, n, h: (n, i, h, 0)),
            pl.BlockSpec((None, None, block_q), lambda i, n, h: (n, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, t, heads, head_dim), qkv.dtype),
            jax.ShapeDtypeStruct((b, heads, t), jnp.float32),  # log2-sum-exp2 of the scores
        ],
        compiler_params=tiling.compiler_params(tiling.warps),
        interpret=interpret,
        name="usfm_attention_forward",
    )(qkv, qkv, qkv, bias_tiles)
    return out, (qkv, bias, bias_tiles, qkv_bias, out, lse)


def _backward(tiling, interpret, residuals, d_out):
    qkv, bias, bias_tiles, qkv_bias, out, lse = residuals
    b, t, _, heads, head_dim = qkv.shape
    dp = pl.next_power_of_2(head_dim)
    scale = head_dim**-0.5
    d_out = d_out.astype(qkv.dtype)
    common = dict(t=t, batch=b, head_dim=head_dim, scale=scale)
    # the bias gradient's partial sums [chunks, heads, T, bias_row], from whichever kernel sums
    # them: rows of whole 16-byte float32 vectors (197 keys -> 200), written with vector stores
    bias_row = None if bias is None else round_up(t, 4)
    dq_sums_bias = bias is not None and tiling.bias_grad == "dq"
    dkv_sums_bias = bias is not None and not dq_sums_bias
    # images a program of the kernel that sums the bias gradient (the last chunk may be short);
    # the other kernel takes one image a program (without a bias, the dq kernel batch_chunk)
    bias_chunk = min(b, tiling.batch_chunk)
    bias_partials = jax.ShapeDtypeStruct(
        (pl.cdiv(b, bias_chunk), heads, t, bias_row or 0), jnp.float32
    )

    # dq into slot 0 of the [B, T, 3, heads, Dh] gradient; the softmax's row term dO . O, which
    # the dk / dv kernel reads; the bias gradient's partial sums (with bias_grad="dq") and, with
    # a qkv bias, dq's sums over the program's queries and images
    chunk = bias_chunk if tiling.bias_grad == "dq" else 1  # (also without a bias: pipelined)
    chunks = pl.cdiv(b, chunk)
    block_q, block_k = fit_block(tiling.block_q_dq, t), fit_block(tiling.block_k_dq, t)
    t_keys = round_up(t, block_k)
    query_blocks = pl.cdiv(t, block_q)
    rows = lambda i, h, c: (c, i, 0, h, 0)
    head_rows = pl.BlockSpec((chunk, block_q, None, dp), lambda i, h, c: (c, i, h, 0))
    per_query = pl.BlockSpec((chunk, None, block_q), lambda i, h, c: (c, h, i))
    qkv_spec = functools.partial(_qkv_block, dp=dp, images=chunk)
    out_specs = [qkv_spec(block_q, rows), per_query]
    out_shape = [
        jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
        jax.ShapeDtypeStruct((b, heads, t), jnp.float32),  # dO . O
    ]
    if dq_sums_bias:
        out_specs.append(pl.BlockSpec((None, None, block_q, t_keys), lambda i, h, c: (c, h, i, 0)))
        out_shape.append(bias_partials)
    if qkv_bias is not None:
        out_specs.append(pl.BlockSpec((None, None, None, dp), lambda i, h, c: (i, h, c, 0)))
        out_shape.append(jax.ShapeDtypeStruct((query_blocks, heads, chunks, dp), jnp.float32))
    d_qkv, delta, *dq_partials = pallas_call(
        functools.partial(
            _dq_kernel, block_k=block_k, bias_row=bias_row if dq_sums_bias else None, **common
        ),
        grid=(query_blocks, heads, chunks),
        in_specs=[
            qkv_spec(block_q, rows),  # q [chunk, block_q, Dp]
            qkv_spec(t_keys, lambda i, h, c: (c, 0, 1, h, 0)),  # k [chunk, T_keys, Dp]
            qkv_spec(t_keys, lambda i, h, c: (c, 0, 2, h, 0)),  # v
            None
            if bias is None
            else pl.BlockSpec((None, block_q, t_keys), lambda i, h, c: (h, i, 0)),
            head_rows,  # dO
            head_rows,  # O
            per_query,  # lse
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tiling.compiler_params(tiling.warps_dq),
        interpret=interpret,
        name="usfm_attention_dq",
    )(qkv, qkv, qkv, bias_tiles, d_out, out, lse)

    # dk, dv into slots 1 and 2 of the same gradient (aliased); the bias gradient's partial sums
    # (with bias_grad="dkv", over batch_chunk images a program; otherwise one image a program)
    # and, with a qkv bias, dk's and dv's sums over the program's keys and images
    dkv_chunk = bias_chunk if dkv_sums_bias else 1
    dkv_chunks = pl.cdiv(b, dkv_chunk)
    qkv_spec = functools.partial(_qkv_block, dp=dp, images=dkv_chunk)
    block_q_dkv, block_k_dkv = fit_block(tiling.block_q_dkv, t), fit_block(tiling.block_k_dkv, t)
    t_queries = round_up(t, block_q_dkv)
    key_blocks = pl.cdiv(t, block_k_dkv)
    gradient = pl.BlockSpec(
        (dkv_chunk, block_k_dkv, 3, None, dp), lambda j, c, h: (c, j, 0, h, 0)
    )  # [chunk, block_k_dkv, 3, Dp]
    per_query = pl.BlockSpec((dkv_chunk, None, t_queries), lambda j, c, h: (c, h, 0))
    out_specs = [gradient]
    out_shape = [jax.ShapeDtypeStruct(qkv.shape, qkv.dtype)]
    if dkv_sums_bias:
        out_specs.append(
            pl.BlockSpec((None, None, t_queries, block_k_dkv), lambda j, c, h: (c, h, 0, j))
        )
        out_shape.append(bias_partials)
    if qkv_bias is not None:
        out_specs.append(pl.BlockSpec((None, None, None, 2, dp), lambda j, c, h: (j, c, h, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((key_blocks, dkv_chunks, heads, 2, dp), jnp.float32))
    inputs = (qkv, qkv, qkv, bias_tiles, d_out, lse, delta, d_qkv)
    d_qkv, *dkv_partials = pallas_call(
        functools.partial(
            _dkv_kernel,
            block_q=block_q_dkv,
            bias_row=bias_row if dkv_sums_bias else None,
            **common,
        ),
        grid=(key_blocks, dkv_chunks, heads),
        in_specs=[
            qkv_spec(t_queries, lambda j, c, h: (c, 0, 0, h, 0)),  # q [chunk, T_queries, Dp]
            qkv_spec(block_k_dkv, lambda j, c, h: (c, j, 1, h, 0)),  # k [chunk, block_k_dkv, Dp]
            qkv_spec(block_k_dkv, lambda j, c, h: (c, j, 2, h, 0)),  # v
            None
            if bias is None
            else pl.BlockSpec((None, t_queries, block_k_dkv), lambda j, c, h: (h, 0, j)),
            pl.BlockSpec((dkv_chunk, t_queries, None, dp), lambda j, c, h: (c, 0, h, 0)),  # dO
            per_query,  # lse
            per_query,  # delta
            gradient,  # the gradient so far (aliased)
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={sum(x is not None for x in inputs) - 1: 0},  # d_qkv; None not counted
        compiler_params=tiling.compiler_params(tiling.warps_dkv),
        interpret=interpret,
        name="usfm_attention_dkv",
    )(*inputs)
    d_bias = None
    if bias is not None:
        bias_sums = (dq_partials if dq_sums_bias else dkv_partials).pop(0)
        d_bias = jnp.sum(bias_sums[..., :t], axis=0, keepdims=True).astype(bias.dtype)
    d_qkv_bias = None
    if qkv_bias is not None:
        dq_sum = jnp.sum(dq_partials[0], axis=(0, 2)) * scale  # [heads, Dp]
        dk_sum, dv_sum = jnp.moveaxis(jnp.sum(dkv_partials[0], axis=(0, 1)), 1, 0)  # [heads, Dp]
        d_qkv_bias = jnp.stack([dq_sum, dk_sum, dv_sum])[..., :head_dim].astype(qkv_bias.dtype)
    return d_qkv, d_bias, d_qkv_bias


_attention.defvjp(_forward, _backward)


def _forward_kernel(
    q_ref, k_ref, v_ref, bias_ref, out_ref, lse_ref, *, t, head_dim, block_k, scale
):
    # q_ref [block_q, Dp]; k_ref, v_ref [T_keys, Dp]; bias_ref [block_q, T_keys] or None
    block_q, dp = q_ref.shape
    row_ok = within(pl.program_id(0) * block_q, block_q, t)
    width_ok = within(0, dp, head_dim)
    q = _load_rows(q_ref, row_ok, width_ok)
    m = jnp.full((block_q,), NEG_INF, jnp.float32)  # running max of the base-2 scores
    total = jnp.zeros((block_q,), jnp.float32)  # running sum of exp2(score - m)
    acc = jnp.zeros((block_q, dp), jnp.float32)

    def key_tile(j, carry):
        m, total, acc = carry
        start = j * block_k
        keys = pl.ds(start, block_k)
        key_ok = within(start, block_k, t)
        k = _load_rows(k_ref.at[keys], key_ok, width_ok)
        bias = None if bias_ref is None else plgpu.load(bias_ref.at[:, keys])
        s = _scores(q, k, bias, key_ok, scale)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_next)
        p = jnp.exp2(s - m_next[:, None])  # [block_q, block_k]
        total = total * correction + jnp.sum(p, axis=1)
        v = _load_rows(v_ref.at[keys], key_ok, width_ok)
        acc = acc * correction[:, None] + dot(p.astype(v.dtype), v)
        return m_next, total, acc

    m, total, acc = jax.lax.fori_loop(0, pl.cdiv(t, block_k), key_tile, (m, total, acc))
    acc = acc / total[:, None]
    plgpu.store(out_ref, acc.astype(out_ref.dtype), mask=row_ok[:, None] & width_ok[None, :])
    plgpu.store(lse_ref, m + jnp.log2(total), mask=row_ok)


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    bias_ref,
    do_ref,
    lse_ref,
    delta_ref,
    _,
    dqkv_ref,
    *partial_refs,
    batch,
    t,
    head_dim,
    block_q,
    scale,
    bias_row,
):
    # q_ref, do_ref [chunk, T_queries, Dp]; k_ref, v_ref [chunk, block_kv, Dp]; bias_ref
    # [T_queries, block_kv] or None; lse_ref, delta_ref [chunk, T_queries]; dqkv_ref [chunk,
    # block_kv, 3, Dp]; partial_refs: the bias gradient's [T_queries, block_kv] (if summed
    # here; its array's rows bias_row long), then dk's and dv's sums [2, Dp] (if asked for)
    with_bias = bias_row is not None
    dbias_ref, sums_ref = _partials(partial_refs, with_bias)
    chunk, block_kv, dp = k_ref.shape
    start_k = pl.program_id(0) * block_kv
    key_ok = within(start_k, block_kv, t)
    width_ok = within(0, dp, head_dim)
    tiles = [(pl.ds(start, block_q), within(start, block_q, t)) for start in range(0, t, block_q)]

    def query_tile(n, rows, row_ok, k, v, dk, dv):
        """dk, dv after one tile of image n's queries, and the tile's score gradient."""
        q = _load_rows(q_ref.at[n, rows], row_ok, width_ok)
        do = _load_rows(do_ref.at[n, rows], row_ok, width_ok)
        bias = None if bias_ref is None else plgpu.load(bias_ref.at[rows])
        s = _scores(q, k, bias, key_ok, scale)
        lse, delta = (
            plgpu.load(ref.at[n, rows], mask=row_ok, other=0.0) for ref in (lse_ref, delta_ref)
        )
        p, ds = _probs_and_grad(s, do, v, lse, delta, row_ok, key_ok)
        dv += dot(p.astype(do.dtype), do, trans_a=True)
        dk += dot(ds.astype(q.dtype), q, trans_a=True)
        return (dk, dv), ds

    def one_image(n, carry):  # the chunk's bias gradient so far, per query tile; dk's, dv's sums
        d_bias, kv_sum = carry
        k = _load_rows(k_ref.at[n], key_ok, width_ok)
        v = _load_rows(v_ref.at[n], key_ok, width_ok)
        dk = jnp.zeros((block_kv, dp), jnp.float32)
        dv = jnp.zeros((block_kv, dp), jnp.float32)
        (dk, dv), d_bias = _over_tiles(
            lambda rows, row_ok, carry: query_tile(n, rows, row_ok, k, v, *carry),
            (dk, dv),
            d_bias,
            block=block_q,
            t=t,
            unrolled=with_bias or chunk > 1,
        )
        mask = key_ok[:, None] & width_ok[None, :]
        plgpu.store(dqkv_ref.at[n, :, jnp.int32(1)], (dk * scale).astype(dqkv_ref.dtype), mask=mask)
        plgpu.store(dqkv_ref.at[n, :, jnp.int32(2)], dv.astype(dqkv_ref.dtype), mask=mask)
        if kv_sum is not None:  # keys beyond T and columns beyond Dh have zero gradients
            kv_sum = (kv_sum[0] + jnp.sum(dk, axis=0) * scale, kv_sum[1] + jnp.sum(dv, axis=0))
        return d_bias, kv_sum

    zeros = tuple(jnp.zeros((block_q, block_kv), jnp.float32) for _ in tiles) if with_bias else ()
    kv_sum = None if sums_ref is None else (jnp.zeros((dp,), jnp.float32),) * 2
    d_bias, kv_sum = _over_images(one_image, (zeros, kv_sum), chunk, batch, pl.program_id(1))
    if sums_ref is not None:
        plgpu.store(sums_ref.at[jnp.int32(0)], kv_sum[0])
        plgpu.store(sums_ref.at[jnp.int32(1)], kv_sum[1])
    if with_bias:  # keys beyond T have zero sums: stored up to the row's padded end
        columns_ok = within(start_k, block_kv, bias_row)
        for (rows, row_ok), acc in zip(tiles, d_bias, strict=True):
            plgpu.store(dbias_ref.at[rows], acc, mask=row_ok[:, None] & columns_ok[None, :])


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    bias_ref,
    do_ref,
    o_ref,
    lse_ref,
    dq_ref,
    delta_ref,
    *partial_refs,
    batch,
    t,
    head_dim,
    block_k,
    scale,
    bias_row,
):
    # q_ref, do_ref, o_ref, dq_ref [chunk, block_q, Dp]; k_ref, v_ref [chunk, T_keys, Dp];
    # lse_ref, delta_ref [chunk, block_q]; partial_refs: the bias gradient's [block_q, T_keys]
    # (if summed here; its array's rows bias_row long), then dq's sum over the program's queries
    # and the chunk's images [Dp] (if asked for)
    with_bias = bias_row is not None
    dbias_ref, dq_sum_ref = _partials(partial_refs, with_bias)
    chunk, block_q, dp = q_ref.shape
    row_ok = within(pl.program_id(0) * block_q, block_q, t)
    width_ok = within(0, dp, head_dim)
    tiles = [(pl.ds(start, block_k), within(start, block_k, t)) for start in range(0, t, block_k)]

    def key_tile(n, keys, key_ok, q, do, lse, delta, dq):
        """dq after one tile of image n's keys, and the tile's score gradient."""
        k = _load_rows(k_ref.at[n, keys], key_ok, width_ok)
        v = _load_rows(v_ref.at[n, keys], key_ok, width_ok)
        bias = None if bias_ref is None else plgpu.load(bias_ref.at[:, keys])
        s = _scores(q, k, bias, key_ok, scale)
        _, ds = _probs_and_grad(s, do, v, lse, delta, row_ok, key_ok)
        return dq + dot(ds.astype(k.dtype), k), ds

    def one_image(n, carry):  # the chunk's bias gradient so far, per key tile; dq's sum so far
        d_bias, dq_sum = carry
        q = _load_rows(q_ref.at[n], row_ok, width_ok)
        do = _load_rows(do_ref.at[n], row_ok, width_ok)
        o = _load_rows(o_ref.at[n], row_ok, width_ok)
        delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=1)  # sum_k dP * P
        plgpu.store(delta_ref.at[n], delta, mask=row_ok)
        lse = plgpu.load(lse_ref.at[n], mask=row_ok, other=0.0)
        dq = jnp.zeros((block_q, dp), jnp.float32)
        dq, d_bias = _over_tiles(
            lambda keys, key_ok, dq: key_tile(n, keys, key_ok, q, do, lse, delta, dq),
            dq,
            d_bias,
            block=block_k,
            t=t,
            unrolled=with_bias or chunk > 1,
        )
        plgpu.store(
            dq_ref.at[n],
            (dq * scale).astype(dq_ref.dtype),
            mask=row_ok[:, None] & width_ok[None, :],
        )
        # rows beyond T and columns beyond Dh are zero; scaled once, outside the kernel
        return d_bias, None if dq_sum is None else dq_sum + jnp.sum(dq, axis=0)

    zeros = tuple(jnp.zeros((block_q, block_k), jnp.float32) for _ in tiles) if with_bias else ()
    dq_sum = None if dq_sum_ref is None else jnp.zeros((dp,), jnp.float32)
    d_bias, dq_sum = _over_images(one_image, (zeros, dq_sum), chunk, batch, pl.program_id(2))
    if dq_sum_ref is not None:
        plgpu.store(dq_sum_ref, dq_sum)
    if with_bias:  # keys beyond T have zero sums: stored up to the row's padded end
        for (keys, _), acc in zip(tiles, d_bias, strict=True):
            key_ok = within(keys.start, block_k, bias_row)
            plgpu.store(dbias_ref.at[:, keys], acc, mask=row_ok[:, None] & key_ok[None, :])


def _over_tiles(step, carry, d_bias: tuple, *, block: int, t: int, unrolled: bool):
    """``step(tile, tile_ok, carry) -> (carry, score gradient)`` over the sequence's tiles of
    ``block`` tokens; returns (carry, d_bias). Unrolled, each tile's score gradient is added to
    its own bias-gradient sum in ``d_bias`` (one per tile, or none kept: empty), and a loop
    over images around it is what Triton software-pipelines; otherwise a ``fori_loop`` over
    the tiles (pipelined itself), keeping no sums."""
    if unrolled:
        sums = []
        for i, start in enumerate(range(0, t, block)):
            carry, ds = step(pl.ds(start, block), within(start, block, t), carry)
            if d_bias:
                sums.append(d_bias[i] + ds)
        return carry, tuple(sums)

    def body(i, carry):
        start = i * block
        return step(pl.ds(start, block), within(start, block, t), carry)[0]

    return jax.lax.fori_loop(0, pl.cdiv(t, block), body, carry), d_bias


def _over_images(one_image, init, chunk: int, batch: int, chunk_index: jax.Array):
    """``one_image(n, carry)`` over the images of a program's chunk of the batch (the last
    chunk may be short); with one image a chunk, no loop."""
    if chunk == 1:
        return one_image(jnp.int32(0), init)
    images = jnp.minimum(chunk, batch - chunk_index * chunk)
    return jax.lax.fori_loop(0, images, one_image, init)


def _bias_tiles(bias: jax.Array, dtype, tiling: Tiling) -> jax.Array:
    """The position bias [1, heads, T, T] as all three kernels read it, made once in the
    forward pass and kept for the backward one: [heads, P, P] with P the tokens rounded up to
    the largest of the tiling's blocks (as fitted to T), zero beyond T, times log2(e) (base-2
    scores) and in the operands' dtype, as cuDNN's path takes it. Every tile is then in bounds
    and read unmasked, in 16-byte vectors: a row of 197 values is not 16-byte aligned, and the
    sm_90 code read the unpadded bias 4 bytes at a time (more load instructions than q, k and
    v together)."""
    t = bias.shape[-1]
    blocks = (tiling.block_q, tiling.block_k, tiling.block_q_dq, tiling.block_k_dq,
              tiling.block_q_dkv, tiling.block_k_dkv)  # fmt: skip
    size = round_up(t, max(fit_block(block, t) for block in blocks))
    tiles = (bias[0].astype(jnp.float32) * LOG2E).astype(dtype)
    return jnp.pad(tiles, [(0, 0), (0, size - t), (0, size - t)])


def _scores(q, k, bias, key_ok, scale):
    """Base-2 scores [rows, keys] of a query tile against a key tile, plus the (base-2) bias
    tile, if any; keys beyond T at NEG_INF."""
    s = dot(q, k, trans_b=True) * (scale * LOG2E)
    if bias is not None:
        s += bias.astype(jnp.float32)
    return jnp.where(key_ok[None, :], s, NEG_INF)


def _probs_and_grad(s, do, v, lse, delta, row_ok, key_ok):
    """The softmax probabilities of base-2 scores ``s`` (from the saved log-sum-exp ``lse``; 0
    outside the sequence) and the gradient of the loss with respect to the (natural) scores,
    given each query's dO . O (``delta``)."""
    p = jnp.where(row_ok[:, None] & key_ok[None, :], jnp.exp2(s - lse[:, None]), 0.0)
    return p, p * (dot(do, v, trans_b=True) - delta[:, None])


def _load_rows(ref, row_ok, width_ok):
    """A [rows, Dp] tile of q, k, v or dO; zeros beyond T and beyond the head's width."""
    return plgpu.load(ref, mask=row_ok[:, None] & width_ok[None, :], other=0.0)


def _qkv_block(rows: int, index_map, *, dp: int, images: int | None = None) -> pl.BlockSpec:
    """``rows`` tokens of one head's q, k or v from [B, T, 3, heads, Dh]: of one image
    (``images`` None, the dimension squeezed) or of a chunk of ``images``."""
    return pl.BlockSpec((images, rows, None, None, dp), index_map)


def _partials(partial_refs: tuple, with_bias: bool) -> tuple:
    """A backward kernel's partial-sum outputs: (the bias gradient's or None, the qkv bias
    gradient's or None), in that order when both are there."""
    dbias_ref = partial_refs[0] if with_bias else None
    return dbias_ref, partial_refs[-1] if len(partial_refs) > with_bias else None
