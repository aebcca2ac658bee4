"""Tests for the Pallas (Triton) attention kernels of ``usfm_jax.models.fused_attention``.

Numerics run the kernels in Pallas' interpreter on the CPU and compare against
``jax.nn.dot_product_attention`` (XLA's implementation) and JAX's autodiff of it. That the
kernels are valid for a GPU is checked without one: they are lowered for CUDA (Pallas -> Triton
IR) and compiled by Triton to an sm_90 cubin.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compile_pallas_kernels

from usfm_jax.models.fused_attention import Tiling, fused_attention

# small blocks, so that every kernel loops over several tiles and the batch over several chunks
SMALL = Tiling(
    block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16, block_k_dq=16,
    batch_chunk=2,
)  # fmt: skip


def reference(
    qkv: jax.Array, bias: jax.Array | None, qkv_bias: jax.Array | None = None
) -> jax.Array:
    """XLA's attention on the same operands: [B, T, heads, Dh]."""
    if qkv_bias is not None:
        qkv = qkv + qkv_bias
    q, k, v = (qkv[:, :, i] for i in range(3))
    if bias is not None:
        bias = jnp.broadcast_to(bias, (qkv.shape[0], *bias.shape[1:]))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")


def operands(b, t, heads, dh, with_bias, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    qkv = jax.random.normal(keys[0], (b, t, 3, heads, dh)).astype(dtype)
    bias = 2 * jax.random.normal(keys[1], (1, heads, t, t)) if with_bias else None
    cotangent = jax.random.normal(keys[2], (b, t, heads, dh))
    return qkv, bias, cotangent


def projection_bias(heads: int, dh: int, seed: int = 1) -> jax.Array:
    """A qkv projection bias [3, heads, Dh], large enough to move the softmax."""
    return jax.random.normal(jax.random.key(seed), (3, heads, dh))


@pytest.mark.parametrize("bias_grad", ["dq", "dkv"])  # the kernel that sums the bias gradient
@pytest.mark.parametrize(
    "b, t, heads, dh, with_bias, with_qkv_bias",
    [
        (4, 37, 2, 16, True, True),  # ragged last tile (37 = 2 x 16 + 5); 2 batch chunks
        (3, 37, 2, 16, True, False),  # a batch the chunk does not divide: a short last chunk
        (3, 37, 2, 16, False, True),  # ... with a qkv bias and no position bias
        (2, 5, 1, 24, True, True),  # fewer tokens than a block; a head width that is not 2^n
        (4, 20, 3, 16, False, False),  # no bias: no bias gradient
        (1, 32, 1, 16, True, True),  # one image; tokens a multiple of the block
    ],
)
def test_matches_xla_attention_and_its_gradients(
    b, t, heads, dh, with_bias, with_qkv_bias, bias_grad
):
    qkv, bias, cotangent = operands(b, t, heads, dh, with_bias)
    qkv_bias = projection_bias(heads, dh) if with_qkv_bias else None
    ref_out, ref_vjp = jax.vjp(reference, qkv, bias, qkv_bias)
    tiling = dataclasses.replace(SMALL, bias_grad=bias_grad)
    out, vjp = jax.vjp(lambda *a: fused_attention(*a, tiling=tiling), qkv, bias, qkv_bias)
    assert out.shape == (b, t, heads, dh) and out.dtype == qkv.dtype
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    names = ("qkv", "bias", "qkv_bias")
    for name, grad, ref in zip(names, vjp(cotangent), ref_vjp(cotangent), strict=True):
        if ref is None:
            assert grad is None, name
            continue
        assert grad.shape == ref.shape and grad.dtype == ref.dtype, name
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize(
    "dtype, bias_dtype, tol",
    [(jnp.bfloat16, jnp.float32, 2e-2), (jnp.float16, jnp.float32, 2e-3),
     (jnp.bfloat16, jnp.bfloat16, 2e-2)],
)  # fmt: skip
def test_half_precision_stays_within_its_rounding_error(dtype, bias_dtype, tol):
    """Half-precision operands, float32 softmax: the error against float32 attention is the
    operands' rounding; the gradients come back in the operands' dtypes."""
    qkv, bias, cotangent = operands(4, 37, 2, 16, True)
    qkv_bias = projection_bias(2, 16)  # float32, as the model's parameters
    ref_out, ref_vjp = jax.vjp(reference, qkv, bias, qkv_bias)
    out, vjp = jax.vjp(
        lambda x, b, c: fused_attention(x, b, c, tiling=SMALL),
        qkv.astype(dtype),
        bias.astype(bias_dtype),
        qkv_bias,
    )
    assert out.dtype == dtype
    grads = vjp(cotangent.astype(dtype))
    assert [g.dtype for g in grads] == [dtype, bias_dtype, jnp.float32]
    for got, ref in zip((out, *grads), (ref_out, *ref_vjp(cotangent)), strict=True):
        error = float(jnp.abs(got.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
        assert error < tol


# the bias gradient summed by the dk / dv kernel, the dq kernel's query tiles 64 rows wide: a
# tiling that compiles without spilling for sm_90 (test below)
DKV_TILING_TEXT = (
    "bias_grad=dkv,block_q_dq=64,block_k_dq=64,block_q_dkv=128,block_k_dkv=32,warps_dkv=8"
)
DKV_TILING = Tiling.parse(DKV_TILING_TEXT)


@pytest.mark.parametrize("tiling", [None, DKV_TILING], ids=["default", "bias_grad_dkv"])
def test_gpu_tilings_match_at_vit_length(tiling):
    """The tilings the GPU runs (the default: one 256-key tile in the dq kernel), at
    ViT-B/16's 197 tokens."""
    qkv, bias, cotangent = operands(2, 197, 1, 64, True)
    qkv_bias = projection_bias(1, 64)
    ref_out, ref_vjp = jax.vjp(reference, qkv, bias, qkv_bias)
    out, vjp = jax.vjp(functools.partial(fused_attention, tiling=tiling), qkv, bias, qkv_bias)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for grad, ref in zip(vjp(cotangent), ref_vjp(cotangent), strict=True):
        np.testing.assert_allclose(grad, ref, atol=1e-5 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize(
    "qkv_shape, bias_shape, dtype, qkv_bias_shape, match",
    [
        ((2, 5, 2, 16), None, jnp.float32, None, r"\[B, T, 3, heads, Dh\]"),
        ((2, 5, 4, 2, 16), None, jnp.float32, None, r"\[B, T, 3, heads, Dh\]"),
        ((2, 5, 3, 2, 16), (2, 2, 5, 5), jnp.float32, None, r"bias must be \[1, heads, T, T\]"),
        ((2, 5, 3, 2, 16), None, jnp.float32, (96,), r"qkv_bias must be \[3, heads, Dh\]"),
        ((2, 5, 3, 2, 16), None, jnp.int32, None, "floating point"),
        ((1, 257, 3, 2, 16), None, jnp.float32, None, "up to 256 tokens"),
        ((1, 197, 3, 2, 80), None, jnp.float32, None, "heads up to 64 wide"),
    ],
)
def test_rejects_bad_operands(qkv_shape, bias_shape, dtype, qkv_bias_shape, match):
    bias = None if bias_shape is None else jnp.zeros(bias_shape)
    qkv_bias = None if qkv_bias_shape is None else jnp.zeros(qkv_bias_shape)
    with pytest.raises(ValueError, match=match):
        fused_attention(jnp.zeros(qkv_shape, dtype), bias, qkv_bias)


@pytest.mark.parametrize(
    "kw, match",
    [(dict(block_q=24), "block_q must be a power of two"), (dict(block_k_dq=8), "block_k_dq"),
     (dict(warps_dq=3), "warps_dq must be a power of two"),
     (dict(batch_chunk=0), "batch_chunk must be positive"),
     (dict(bias_grad="dk"), r"bias_grad must be one of \('dq', 'dkv'\), got 'dk'")],
)  # fmt: skip
def test_tiling_rejects_invalid_blocks(kw, match):
    with pytest.raises(ValueError, match=match):
        Tiling(**kw)


def test_tiling_parses_overrides_and_names_bad_ones():
    assert Tiling.parse("warps_dq=8, block_q_dq=32") == Tiling(warps_dq=8, block_q_dq=32)
    assert Tiling.parse("") == Tiling()
    assert Tiling.parse("bias_grad=dkv,warps_dkv=8") == Tiling(bias_grad="dkv", warps_dkv=8)
    for text in ("warps_dq", "warp=4", "block_q=big", "bias_grad"):
        with pytest.raises(ValueError, match="name=integer pairs"):
            Tiling.parse(text)
    with pytest.raises(ValueError, match="bias_grad must be one of"):
        Tiling.parse("bias_grad=8")


@pytest.mark.parametrize("with_bias", [True, False])
def test_kernels_lower_and_compile_for_an_nvidia_gpu(with_bias):
    """Pallas -> Triton IR for CUDA, then Triton's compiler down to an sm_90 cubin, on this
    CPU-only machine: three kernels, each within the register file without spilling (the
    default tiling; Triton caps registers at 255 and spills the rest), their tiles loaded in
    vectorised copies."""
    kernels = compile_pallas_kernels(
        "--kernels", "attention", "--batch", "4", *([] if with_bias else ["--no-bias"])
    )
    names = [k["kernel"] for k in kernels]
    assert names == ["usfm_attention_forward", "usfm_attention_dq", "usfm_attention_dkv"]
    for usage in kernels:
        assert 0 < usage["registers"] <= 255 and usage["spill_bytes"] == 0, usage
        assert usage["blocks_per_sm"] >= 1, usage
    # q, k, v, dO and the (padded) position bias tiles are loaded in 16-byte copies: the forward
    # copies nothing narrower, the backward kernels only a few per-query float32 rows (the
    # unpadded bias made most of each kernel's copies 4-byte ones)
    forward, *backward = kernels
    assert forward["async_copies"] > 0 and forward["narrow_copies"] == 0, forward
    for usage in backward:
        assert 4 * usage["narrow_copies"] < usage["async_copies"], usage


def test_bias_gradient_in_the_dkv_kernel_frees_the_dq_kernel_for_wgmma():
    """With ``bias_grad="dkv"`` the dq kernel keeps no bias-gradient sums, so its query tiles
    can be 64 rows: Hopper's wgmma, where the default's 16-row tiles take Ampere's mma.sync;
    the dk / dv kernel that keeps the sums instead fits its registers (no spills)."""
    default, dkv = (
        {k["kernel"]: k for k in compile_pallas_kernels(*args)}
        for args in (
            ("--kernels", "attention", "--batch", "4"),
            ("--kernels", "attention", "--batch", "4", "--tiling", DKV_TILING_TEXT),
        )
    )
    assert default["usfm_attention_dq"]["mma"] == "mma.sync"
    assert dkv["usfm_attention_dq"]["mma"] == "wgmma"
    for usage in dkv.values():
        assert 0 < usage["registers"] <= 255 and usage["spill_bytes"] == 0, usage
