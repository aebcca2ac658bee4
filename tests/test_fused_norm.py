"""Tests for the Pallas (Triton) LayerNorm kernels of ``usfm_jax.models.fused_norm``.

Numerics run the kernels in Pallas' interpreter on the CPU and compare against LayerNorm written
out in jnp (two-pass statistics) and JAX's autodiff of it, and, in the encoder, against flax's
LayerNorm. That the kernels are valid for a GPU is checked without one: they are lowered for
CUDA and compiled by Triton to an sm_90 cubin.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compile_pallas_kernels
from flax import nnx

from usfm_jax.models.fused_norm import NormTiling, residual_layer_norm
from usfm_jax.models.vit import VisionTransformer

EPS = 1e-6
# 2-row steps, 2 steps a program: several programs, the last one ragged, for 3 x 7 = 21 rows
SMALL = NormTiling(rows=2, row_steps=2)


def reference(x, delta, scale, gamma, beta, delta_bias=None):
    """x + scale * (delta + delta_bias) and its LayerNorm, as the block's XLA path computes them."""
    if delta is not None:
        if delta_bias is not None:
            delta = delta + delta_bias
        x = x + (delta if scale is None else delta * scale[:, None, None])
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return x, (x - mean) * jax.lax.rsqrt(var + EPS) * gamma + beta


def operands(shape, seed=0):
    keys = jax.random.split(jax.random.key(seed), 7)
    d = shape[-1]
    x = 3.0 + 2.0 * jax.random.normal(keys[0], shape)  # an offset mean: cancellation matters
    delta = jax.random.normal(keys[1], shape)
    gamma = 1.0 + 0.2 * jax.random.normal(keys[2], (d,))
    beta = 0.2 * jax.random.normal(keys[3], (d,))
    cotangents = tuple(jax.random.normal(k, shape) for k in keys[4:6])  # of x_new and of y
    delta_bias = jax.random.normal(keys[6], (d,))
    return x, delta, gamma, beta, cotangents, delta_bias


@pytest.mark.parametrize("residual", ["none", "add", "add_scaled", "add_biased", "add_both"])
@pytest.mark.parametrize("shape", [(3, 7, 48), (2, 16, 64)])  # ragged rows and width; exact
def test_matches_layer_norm_and_its_gradients(residual, shape):
    """Both results and the gradients of x, delta, gamma, beta and delta's bias against autodiff
    of the reference, with a cotangent on each result (the residual stream's and the norm's):
    the backward kernel adds the residual one. The scale drops one example and keeps the
    others."""
    x, delta, gamma, beta, cotangents, delta_bias = operands(shape)
    delta = None if residual == "none" else delta
    scaled, biased = residual in ("add_scaled", "add_both"), residual in ("add_biased", "add_both")
    scale = jnp.asarray([0.0] + [1.25] * (shape[0] - 1)) if scaled else None
    delta_bias = delta_bias if biased else None
    fused = functools.partial(residual_layer_norm, scale=scale, eps=EPS, tiling=SMALL)
    args = (x, delta, gamma, beta, delta_bias)
    out, vjp = jax.vjp(lambda x, d, g, b, c: fused(x, d, gamma=g, beta=b, delta_bias=c), *args)
    ref_out, ref_vjp = jax.vjp(lambda x, d, *a: reference(x, d, scale, *a), *args)
    for got, want, name in zip(out, ref_out, ("x_new", "y"), strict=True):
        assert got.shape == shape and got.dtype == jnp.float32, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    grads, ref_grads = vjp(cotangents), ref_vjp(cotangents)
    names = ("x", "delta", "gamma", "beta", "delta_bias")
    for got, want, name in zip(grads, ref_grads, names, strict=True):
        if want is None:
            assert got is None, name
            continue
        scale_of = float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale_of, err_msg=name)
    if scale is not None:  # the dropped example's branch gets no gradient, the others 1.25x
        assert not np.any(np.asarray(grads[1][0]))
        np.testing.assert_allclose(grads[1][1:], 1.25 * grads[0][1:], rtol=1e-6)


def test_the_default_tiling_at_vit_length():
    """[B, T, D] tokens at ViT length (2 x 197 rows) and a width that is not a power of two
    (ViT-B's 768 is not either), with the tiling the GPU runs."""
    x, delta, gamma, beta, cotangents, delta_bias = operands((2, 197, 96))
    scale = jnp.asarray([1.1, 0.0])
    out, vjp = jax.vjp(
        lambda x, d, c: residual_layer_norm(x, d, scale, gamma, beta, c, eps=EPS),
        x,
        delta,
        delta_bias,
    )
    ref_out, ref_vjp = jax.vjp(
        lambda x, d, c: reference(x, d, scale, gamma, beta, c), x, delta, delta_bias
    )
    for got, want in zip((*out, *vjp(cotangents)), (*ref_out, *ref_vjp(cotangents)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_bfloat16_is_as_close_to_float32_as_xla_in_bfloat16():
    """bf16 tokens, float32 statistics, x_new rounded once: the error of y and of the gradients
    against the float32 reference is at most that of XLA computing the reference in bf16 (the
    parameters stay float32, as the encoder keeps them)."""
    x, delta, gamma, beta, cotangents, delta_bias = operands((3, 7, 48))
    scale = jnp.asarray([1.25, 0.0, 1.25])
    ref_out, ref_vjp = jax.vjp(
        lambda x, d, c: reference(x, d, scale, gamma, beta, c), x, delta, delta_bias
    )
    ref_all = (*ref_out, *ref_vjp(cotangents))
    half = [a.astype(jnp.bfloat16) for a in (x, delta, delta_bias)]  # the bias as promoted
    half_cotangents = tuple(c.astype(jnp.bfloat16) for c in cotangents)
    fused = functools.partial(residual_layer_norm, eps=EPS, tiling=SMALL)

    def xla(x, d, c):
        return tuple(o.astype(x.dtype) for o in reference(x, d, scale, gamma, beta, c))

    errors = {}
    for name, fn in (("pallas", lambda x, d, c: fused(x, d, scale, gamma, beta, c)), ("xla", xla)):
        out, vjp = jax.vjp(fn, *half)
        got_all = (*out, *vjp(half_cotangents))
        assert all(g.dtype == jnp.bfloat16 for g in got_all), name
        errors[name] = [
            float(jnp.abs(got.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
            for got, ref in zip(got_all, ref_all, strict=True)
        ]
    for pallas, xla in zip(errors["pallas"], errors["xla"], strict=True):
        assert pallas < 2e-2 and pallas <= 1.25 * xla + 1e-3, errors


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(delta=jnp.zeros((2, 5, 16))), r"delta must match x float32\[2, 5, 8\]"),
        (dict(delta=jnp.zeros((2, 5, 8), jnp.bfloat16)), r"delta must match x"),
        (dict(scale=jnp.ones((3,))), r"scale must be \[2\]"),
        (dict(delta=None, scale=jnp.ones((2,))), r"comes with a delta"),
        (dict(gamma=jnp.ones((7,))), r"gamma must be \[8\], got \[7\]"),
        (dict(beta=jnp.ones((1, 8))), r"beta must be \[8\], got \[1, 8\]"),
        (dict(delta_bias=jnp.ones((2, 8))), r"delta_bias must be \[8\], got \[2, 8\]"),
        (dict(delta=None, delta_bias=jnp.ones((8,))), r"delta_bias comes with a delta"),
        (dict(x=jnp.zeros((2, 5, 8), jnp.int32), delta=None), r"x must be floating point"),
    ],
)
def test_rejects_mismatched_operands(change, match):
    args = dict(
        x=jnp.zeros((2, 5, 8)),
        delta=jnp.zeros((2, 5, 8)),
        scale=None,
        gamma=jnp.ones((8,)),
        beta=jnp.zeros((8,)),
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        residual_layer_norm(**args, eps=EPS)


def test_tiling_is_validated_and_parsed():
    with pytest.raises(ValueError, match=r"NormTiling\.rows must be a power of two, got 6"):
        NormTiling(rows=6)
    with pytest.raises(ValueError, match=r"NormTiling\.warps must be a power of two"):
        NormTiling(warps=3)
    assert NormTiling.parse("rows=8, row_steps=16") == NormTiling(rows=8, row_steps=16)
    with pytest.raises(ValueError, match="name=integer pairs"):
        NormTiling.parse("block_m=64")  # an MLP field


def test_kernels_lower_and_compile_for_an_nvidia_gpu():
    """Pallas -> Triton IR for CUDA, then Triton's compiler down to an sm_90 cubin, on this
    CPU-only machine (ViT-B's width, 768 as 1024 masked): the four kernels of a block, without
    register spills."""
    kernels = compile_pallas_kernels("--kernels", "norm", "--batch", "2")
    names = ["usfm_norm_forward", "usfm_norm_residual_forward"]
    names += ["usfm_norm_scaled_backward", "usfm_norm_backward"]
    assert [k["kernel"] for k in kernels] == names
    for usage in kernels:
        assert usage["tiling"] == str(NormTiling()), usage
        assert usage["spill_bytes"] == 0 and usage["blocks_per_sm"] >= 2, usage


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-4), (jnp.bfloat16, 3e-2)])
def test_the_encoder_with_drop_path_matches_flax_layer_norm(dtype, tol):
    """``VisionTransformer(norm="pallas")`` against the XLA one with the same parameters and the
    same drop-path draws (rate 0.5 over 4 images: branches dropped and kept): the tokens and
    every parameter's gradient. flax's LayerNorm computes the variance as E[x^2] - E[x]^2, the
    kernels in two passes, hence a float32 tolerance above rounding."""

    def tokens_and_grads(norm):
        model = VisionTransformer(
            image_size=(32, 32),
            patch_size=16,
            width=32,
            depth=2,
            num_heads=2,
            drop_path_rate=0.5,
            attention="xla",
            norm=norm,
            dtype=dtype,
            rngs=nnx.Rngs(0),
        )
        images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
        mask = jnp.asarray([[True, False, False, True]] * 4)  # [B, N]: the mask token trains

        def loss(model):
            tokens = model(images, mask=mask, dropout_key=jax.random.key(3)).astype(jnp.float32)
            return jnp.sum(tokens * jnp.cos(tokens)), tokens

        with jax.default_matmul_precision("float32"):
            return nnx.grad(loss, has_aux=True)(model)

    grads, tokens = tokens_and_grads("pallas")
    ref_grads, ref_tokens = tokens_and_grads("xla")
    np.testing.assert_allclose(tokens, ref_tokens, atol=tol * float(jnp.abs(ref_tokens).max()))
    flat, ref_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ref_grads))
    assert any("norm2" in path for path, _ in flat)
    for path, grad in flat:
        ref = np.asarray(ref_flat[path][...], np.float32)
        assert np.abs(ref).max() > 0, path
        np.testing.assert_allclose(grad[...], ref, atol=tol * np.abs(ref).max(), err_msg=str(path))
