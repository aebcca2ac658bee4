"""Tests for the Pallas (Triton) MLP kernels of ``usfm_jax.models.fused_mlp``.

Numerics run the kernels in Pallas' interpreter on the CPU and compare against the XLA path of
the encoder (``vit.gelu`` between two matmuls) and JAX's autodiff of it. That the kernels are
valid for a GPU is checked without one: they are lowered for CUDA and compiled by Triton to an
sm_90 cubin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compile_pallas_kernels
from scipy import special

from usfm_jax.models import fused_mlp as fm
from usfm_jax.models.fused_mlp import MlpTiling, fused_mlp
from usfm_jax.models.vit import gelu

# small blocks: several row, column and contraction steps in every kernel
SMALL = MlpTiling(block_m=16, block_n=32, block_k=16)


def reference(x, w1, b1, w2, b2):
    """The encoder's XLA path: fc2(gelu(fc1(x)))."""
    return gelu(x @ w1 + b1) @ w2 + b2


def operands(rows, d, hidden, d_out, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    shapes = [(rows, d), (d, hidden), (hidden,), (hidden, d_out), (d_out,), (rows, d_out)]
    scales = [1.0, d**-0.5, 0.5, hidden**-0.5, 0.5, 1.0]
    return [
        s * jax.random.normal(k, shape) for k, shape, s in zip(keys, shapes, scales, strict=True)
    ]


@pytest.mark.parametrize(
    "rows, d, hidden, d_out",
    [
        (40, 48, 96, 48),  # rows, width and hidden all ragged for 16 / 16 / 32 blocks
        (64, 64, 128, 32),  # every block divides; a narrower output
        (5, 20, 40, 20),  # fewer rows than a block; widths that are not 2^n
    ],
)
@pytest.mark.parametrize("xla_gelu", [None, gelu], ids=["both kernels", "backward kernel"])
def test_matches_the_xla_mlp_and_its_gradients(rows, d, hidden, d_out, xla_gelu):
    *args, cotangent = operands(rows, d, hidden, d_out)
    with jax.default_matmul_precision("float32"):
        ref_out, ref_vjp = jax.vjp(reference, *args)
        out, vjp = jax.vjp(lambda *a: fused_mlp(*a, xla_gelu=xla_gelu, tiling=SMALL), *args)
        grads, ref_grads = vjp(cotangent), ref_vjp(cotangent)
    assert out.shape == (rows, d_out) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, grad, ref in zip(("x", "w1", "b1", "w2", "b2"), grads, ref_grads, strict=True):
        assert grad.shape == ref.shape, name
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def test_an_xla_forward_leaves_only_the_backward_kernel():
    """With ``xla_gelu`` the forward pass is XLA's: the training step's program holds the
    backward kernel and not the forward one (without it, both)."""
    *args, _ = operands(8, 16, 32, 16)

    def kernels(xla_gelu):
        loss = lambda *a: jnp.sum(fused_mlp(*a, xla_gelu=xla_gelu))
        text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args))
        return {name for name in ("usfm_mlp_forward", "usfm_mlp_backward") if name in text}

    assert kernels(None) == {"usfm_mlp_forward", "usfm_mlp_backward"}
    assert kernels(gelu) == {"usfm_mlp_backward"}


def test_tokens_keep_their_leading_dims_and_the_default_tiling_matches():
    """[B, T, D] tokens at ViT length (2 x 197 rows: not a multiple of the 128-row block),
    with the tiling the GPU runs."""
    *args, cotangent = operands(2 * 197, 64, 256, 64)
    x, shape = args[0].reshape(2, 197, 64), (2, 197, 64)
    with jax.default_matmul_precision("float32"):
        out, vjp = jax.vjp(lambda x, *w: fused_mlp(x, *w), x, *args[1:])
        ref_out, ref_vjp = jax.vjp(reference, *args)
        grads, ref_grads = vjp(cotangent.reshape(shape)), ref_vjp(cotangent)
    np.testing.assert_allclose(out, ref_out.reshape(shape), rtol=1e-5, atol=1e-5)
    assert grads[0].shape == shape
    for grad, ref in zip((grads[0].reshape(-1, 64), *grads[1:]), ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref, atol=1e-5 * float(jnp.abs(ref).max()))


def test_bfloat16_is_as_close_to_float32_as_xla_in_bfloat16():
    """bf16 operands, float32 accumulation and GELU rounded once: the error against the float32
    MLP is at most that of the XLA path computing in bf16 (which rounds h and GELU(h) too)."""
    *args, cotangent = operands(40, 48, 96, 48)
    ref_out, ref_vjp = jax.vjp(reference, *args)
    ref_all = (ref_out, *ref_vjp(cotangent))
    half = [a.astype(jnp.bfloat16) for a in args]
    results = {}
    for name, fn in (("pallas", lambda *a: fused_mlp(*a, tiling=SMALL)), ("xla", reference)):
        out, vjp = jax.vjp(fn, *half)
        grads = vjp(cotangent.astype(jnp.bfloat16))
        assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
        results[name] = [
            float(jnp.abs(got.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
            for got, ref in zip((out, *grads), ref_all, strict=True)
        ]
    for pallas, xla in zip(results["pallas"], results["xla"], strict=True):
        assert pallas < 1.5e-2 and pallas <= 1.25 * xla, results


def test_erf_and_the_gelu_derivative_match_their_exact_values():
    """The kernels' own erf (Triton has none) against scipy's, and GELU' against autodiff."""
    x = np.linspace(-8, 8, 20001)
    got = np.asarray(fm.erf(jnp.asarray(x, jnp.float32)), np.float64)
    assert np.abs(got - special.erf(x)).max() < 5e-7
    exact = 0.5 * x * (1 + special.erf(x / np.sqrt(2)))
    np.testing.assert_allclose(fm.gelu(jnp.asarray(x, jnp.float32)), exact, atol=2e-6, rtol=1e-6)
    h = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(fm.gelu_grad(h), jax.vmap(jax.grad(gelu))(h), atol=1e-6)


@pytest.mark.parametrize(
    "change, match",
    [
        ({1: (32, 96)}, r"w1 must be \[48, 96\]"),  # wrong contraction size
        ({2: (95,)}, r"b1 must be \[96\]"),
        ({3: (64, 48)}, r"w2 must be \[96, 48\]"),
        ({4: (47,)}, r"b2 must be \[48\]"),
    ],
)
def test_rejects_mismatched_shapes(change, match):
    args = [jnp.zeros(s) for s in [(4, 48), (48, 96), (96,), (96, 48), (48,)]]
    for i, shape in change.items():
        args[i] = jnp.zeros(shape)
    with pytest.raises(ValueError, match=match):
        fused_mlp(*args)


def test_rejects_mixed_and_integer_dtypes():
    args = [jnp.zeros(s) for s in [(4, 8), (8, 16), (16,), (16, 8), (8,)]]
    with pytest.raises(ValueError, match="w1 is bfloat16, x is float32: cast first"):
        fused_mlp(args[0], args[1].astype(jnp.bfloat16), *args[2:])
    ints = [a.astype(jnp.int32) for a in args]
    with pytest.raises(ValueError, match="floating point"):
        fused_mlp(*ints)


def test_tiling_is_validated_and_parsed():
    with pytest.raises(ValueError, match=r"MlpTiling\.block_n must be a power of two"):
        MlpTiling(block_n=96)
    with pytest.raises(ValueError, match=r"MlpTiling\.warps must be a power of two"):
        MlpTiling(warps=6)
    assert MlpTiling.parse("block_n=256, warps=4") == MlpTiling(block_n=256, warps=4)
    with pytest.raises(ValueError, match="name=integer pairs"):
        MlpTiling.parse("block_q=64")  # an attention field


def test_kernels_lower_and_compile_for_an_nvidia_gpu():
    """Pallas -> Triton IR for CUDA, then Triton's compiler down to an sm_90 cubin, on this
    CPU-only machine (ViT-B's MLP): two kernels on Hopper's wgmma, without register spills."""
    kernels = compile_pallas_kernels("--kernels", "mlp", "--batch", "2")
    assert [k["kernel"] for k in kernels] == ["usfm_mlp_forward", "usfm_mlp_backward"]
    for usage in kernels:
        assert usage["tiling"] == str(MlpTiling()), usage
        assert usage["spill_bytes"] == 0 and usage["blocks_per_sm"] >= 1, usage
        assert usage["mma"] == "wgmma", usage


@pytest.mark.parametrize("implementation", ["pallas", "pallas_backward"])
@pytest.mark.parametrize("with_scale", [False, True])
def test_the_encoder_mlp_runs_the_kernels_with_the_same_weights(implementation, with_scale):
    """``vit.Mlp`` with the Pallas kernels (both, or the backward one) against the XLA one
    with the same parameters, with and without BEiT's layer scale (folded into fc2's weights),
    in bf16 compute: the same function, to bf16 rounding, and the same parameter gradients."""
    from flax import nnx

    from usfm_jax.models.vit import Mlp

    x = jax.random.normal(jax.random.key(0), (2, 9, 32))
    scale = nnx.Param(jax.random.uniform(jax.random.key(1), (32,))) if with_scale else None
    results = []
    for name in (implementation, "xla"):
        mlp = Mlp(32, 128, jnp.bfloat16, nnx.Rngs(0), name)

        def apply(mlp, x):  # the MLP returns its output bias apart, for the block to add
            y, b2 = mlp(x, scale)
            return y + b2

        def loss(mlp, x):
            return jnp.sum(apply(mlp, x).astype(jnp.float32) * x)

        results.append((apply(mlp, x), nnx.grad(loss)(mlp, x)))
    (out, grads), (ref_out, ref_grads) = results
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=3e-2
    )
    for (path, grad), (_, ref) in zip(
        nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads), strict=True
    ):
        ref = np.asarray(ref[...], np.float32)
        assert grad[...].dtype == jnp.float32, path  # parameters stay float32
        np.testing.assert_allclose(grad[...], ref, atol=2e-2 * np.abs(ref).max(), err_msg=str(path))
