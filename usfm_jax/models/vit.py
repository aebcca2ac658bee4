"""Vision Transformer encoder in Flax NNX, in the two layouts this project interoperates with.

* ``variant="beit"``: the USFM / BEiT / SimMIM backbone. No absolute position embedding; a
  relative position bias (one table shared by all blocks, as in the released USFM weights, or one
  per block, as in timm's ``Beit``); layer scale; a bias-free qkv projection plus learned q and v
  biases (the k bias is always zero).
* ``variant="vit"``: timm's plain ``VisionTransformer`` (URFM's layout): absolute position
  embedding, qkv with bias, no layer scale.

Both use pre-norm blocks, LayerNorm eps 1e-6 and exact (erf) GELU. Parameter names follow timm's
so that conversion to and from PyTorch is a rename and a transpose. Parameters are float32; the
compute dtype is configurable (bfloat16 on accelerators).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from usfm_jax import parallel
from usfm_jax.models.attention import softmax_attention
from usfm_jax.models.fused_attention import fused_attention
from usfm_jax.models.fused_mlp import fused_mlp
from usfm_jax.models.fused_norm import residual_layer_norm
from usfm_jax.patches import patchify

Variant = Literal["beit", "vit"]
RelPos = Literal["shared", "per_block"]
# Attention implementations: "xla", models.attention.softmax_attention compiled by XLA (any
# backend); "cudnn", cuDNN's fused kernel through jax.nn.dot_product_attention (NVIDIA GPUs,
# bf16 / fp16 compute); "pallas", the Pallas (Triton) kernels of models.fused_attention (NVIDIA
# GPUs; elsewhere Pallas' interpreter, for tests); "auto" picks cuDNN wherever it can run.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
# MLP implementations: "xla", matmuls and GELU as XLA compiles them; "pallas", the GELU fused
# into the matmuls' epilogues by the Pallas (Triton) kernels of models.fused_mlp (NVIDIA GPUs;
# elsewhere Pallas' interpreter, for tests); "pallas_backward", XLA's forward pass and the
# Pallas kernel of the backward pass (the one of the two an H100 ran faster than XLA's).
MLP_IMPLEMENTATIONS = ("xla", "pallas", "pallas_backward")
PALLAS_IMPLEMENTATIONS = ("pallas", "pallas_backward")  # of any family: those with Pallas kernels
# LayerNorm implementations (an encoder block's two and the final one, each with the residual
# add before it): "xla", as XLA compiles flax's LayerNorm and the add; "pallas", one Pallas
# (Triton) kernel per direction from models.fused_norm (NVIDIA GPUs; elsewhere Pallas'
# interpreter, for tests); "auto" picks Pallas on an NVIDIA GPU with bf16 / fp16 compute up to
# AUTO_PALLAS_NORM_MAX_WIDTH (a 4% faster ViT-B/16 step on an H100, docs/benchmarks.md), XLA
# elsewhere.
NORM_IMPLEMENTATIONS = ("auto", "xla", "pallas")

# name -> (width, depth, heads); patch 16 for every size.
SIZES: dict[str, tuple[int, int, int]] = {
    "micro": (64, 2, 2),  # for tests only
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "giant": (1408, 40, 16),  # ViT-g/14: use patch_size 14
}
MLP_RATIOS = {"giant": 48 / 11}  # hidden 6144; every other size uses 4


def mlp_ratio_of(size: str | None) -> float:
    """The MLP's hidden width over the model width for a named size (4 unless it says otherwise)."""
    return MLP_RATIOS.get(size, 4.0)


LN_EPS = 1e-6

# What a rematerialised block keeps from the forward pass for the backward pass.
REMAT_POLICIES = {
    "none": None,  # no remat: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}
# timm's and BEiT's trunc_normal_(std=0.02): cut at +-2 (absolute, i.e. 100 standard
# deviations), in effect N(0, 0.02^2); jax's truncated_normal cuts at +-2 std by default.
trunc_normal = nnx.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


def over_tokens(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """A token-wise linear map ``fn`` applied to x [..., D_in] as one [N, D_in] matrix of tokens.

    Flattening the leading dims first makes the kernel's gradient a plain [N, D_in]^T x [N, D_out]
    product. With [B, T, D] operands, whose gradient contracts two dims, XLA:CPU writes a
    transposed copy of the output gradient before every weight-gradient matmul (~5% of the
    ViT-tiny CPU step).
    """
    y = fn(x.reshape(-1, x.shape[-1]))  # [N, D_out]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def token_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` over the tokens as one matrix: [..., D_in] x [D_in, D_out] -> [..., D_out]."""
    return over_tokens(lambda tokens: tokens @ kernel, x)


class Dense(nnx.Linear):
    """``nnx.Linear`` applied ``over_tokens``: the same parameters, the same function."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return over_tokens(super().__call__, x)


def dense(
    d_in: int, d_out: int, dtype: DTypeLike, rngs: nnx.Rngs, use_bias: bool = True
) -> nnx.Linear:
    """A linear layer with the ViT initialisation (truncated normal, std 0.02)."""
    return Dense(d_in, d_out, use_bias=use_bias, dtype=dtype, kernel_init=trunc_normal, rngs=rngs)


def layer_norm(dim: int, dtype: DTypeLike, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with eps 1e-6 (timm's ViTs; PyTorch's default would be 1e-5)."""
    return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)


@functools.lru_cache(maxsize=16)
def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
    """BEiT's index into the relative position table, int32 [1 + N, 1 + N] for a grid of N patches.

    Rows of the table: (2*gh - 1) * (2*gw - 1) patch-to-patch offsets, then cls->token (the cls
    query's row of the index), token->cls, cls->cls (the layout of timm's Beit and the released
    USFM weights).
    """
    gh, gw = grid
    coords = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)  # [N, N, 2]
    rel = rel + np.array([gh - 1, gw - 1])
    num_offsets = (2 * gh - 1) * (2 * gw - 1)
    index = np.zeros((gh * gw + 1, gh * gw + 1), np.int32)
    index[1:, 1:] = rel[..., 0] * (2 * gw - 1) + rel[..., 1]
    index[0, :] = num_offsets
    index[:, 0] = num_offsets + 1
    index[0, 0] = num_offsets + 2
    index.setflags(write=False)  # shared through the cache
    return index


def table_rows(grid: tuple[int, int]) -> int:
    """Number of rows of a relative position table for ``grid``."""
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


def position_bias_table(grid: tuple[int, int], num_heads: int) -> nnx.Param:
    """A zero-initialised relative position table [rows, heads] for ``grid``."""
    return nnx.Param(jnp.zeros((table_rows(grid), num_heads)))


def position_bias(table: nnx.Param, grid: tuple[int, int]) -> jax.Array:
    """Per-head attention bias [1, heads, T, T] looked up from a relative position table."""
    bias = table[...][relative_position_index(grid)]  # [T, T, heads]
    return jnp.transpose(bias, (2, 0, 1))[None]


# The widest model whose LayerNorm "auto" gives the Pallas kernels: they hold a row padded to a
# power of two in registers, measured for widths up to 1024 (ViT-B and ViT-L, docs/benchmarks.md)
AUTO_PALLAS_NORM_MAX_WIDTH = 1024


def half_precision_on_nvidia_gpu(dtype: DTypeLike, backend: str | None = None) -> bool:
    """Whether ``backend`` (default: JAX's default backend) is an NVIDIA GPU and ``dtype`` bf16
    or fp16: where cuDNN's fused attention can run and "auto" picks the fused kernels. A named
    "gpu" backend (an ahead-of-time compile) is taken to be NVIDIA's; JAX's own GPU backend is
    checked not to be ROCm."""
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if backend is not None:
        return backend == "gpu" and half
    if jax.default_backend() != "gpu":
        return False
    client = getattr(jax.devices()[0], "client", None)
    return half and "rocm" not in getattr(client, "platform_version", "").lower()


def _check_choice(kind: str, choice: str, choices: tuple[str, ...]) -> None:
    if choice not in choices:
        raise ValueError(f"{kind} must be one of {choices}, got {choice!r}")


def resolve_attention(attention: str, dtype: DTypeLike, backend: str | None = None) -> str:
    """The implementation ``attention`` (one of ATTENTION_IMPLEMENTATIONS) means for ``dtype``
    on ``backend`` (default: JAX's default backend): "auto" is cuDNN where it can run."""
    _check_choice("attention", attention, ATTENTION_IMPLEMENTATIONS)
    if attention == "auto":
        return "cudnn" if half_precision_on_nvidia_gpu(dtype, backend) else "xla"
    return attention


def resolve_norm(norm: str, dtype: DTypeLike, width: int, backend: str | None = None) -> str:
    """The implementation ``norm`` (one of NORM_IMPLEMENTATIONS) means for a model ``width``
    wide computing in ``dtype`` on ``backend`` (default: JAX's default backend): "auto" is
    Pallas on an NVIDIA GPU in bf16 / fp16 up to AUTO_PALLAS_NORM_MAX_WIDTH, else XLA."""
    _check_choice("norm", norm, NORM_IMPLEMENTATIONS)
    if norm == "auto":
        fits = width <= AUTO_PALLAS_NORM_MAX_WIDTH
        return "pallas" if fits and half_precision_on_nvidia_gpu(dtype, backend) else "xla"
    return norm


class RelativePositionBias(nnx.Module):
    """The table shared by all blocks (``rel_pos_bias`` of BEiT and the released USFM weights)."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        self.grid = grid
        self.relative_position_bias_table = position_bias_table(grid, num_heads)

    def __call__(self) -> jax.Array:
        return position_bias(self.relative_position_bias_table, self.grid)


class Attention(nnx.Module):
    """Multi-head self-attention; BEiT's q/v biases and per-block position table if asked."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        variant: Variant,
        dtype: DTypeLike,
        rngs: nnx.Rngs,
        rel_pos_grid: tuple[int, int] | None = None,
        implementation: str = "xla",
    ):
        self.num_heads = num_heads
        self.implementation = implementation
        self.qkv = dense(dim, 3 * dim, dtype, rngs, use_bias=variant == "vit")
        beit = variant == "beit"
        self.q_bias = nnx.Param(jnp.zeros((dim,))) if beit else None
        self.v_bias = nnx.Param(jnp.zeros((dim,))) if beit else None
        self.grid = rel_pos_grid
        self.relative_position_bias_table = (
            position_bias_table(rel_pos_grid, num_heads) if rel_pos_grid else None
        )
        self.proj = dense(dim, dim, dtype, rngs)

    def qkv_bias(self) -> jax.Array | None:
        """The qkv projection's bias [3D]: BEiT's q and v biases around a zero k bias, the plain
        ViT's learned one, or None."""
        if self.q_bias is not None:
            q_bias = self.q_bias[...]
            return jnp.concatenate([q_bias, jnp.zeros_like(q_bias), self.v_bias[...]])
        return None if self.qkv.bias is None else self.qkv.bias[...]

    def __call__(
        self, x: jax.Array, bias: jax.Array | None = None, scale: nnx.Param | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [B, T, D]; ``bias`` [1, heads, T, T] from a shared table, if any; ``scale`` [D],
        BEiT's layer scale of the output, if any. Returns the output projection in two parts,
        (out @ kernel [B, T, D], bias [D]) (``scaled_linear_parts``): the block adds the bias
        with the residual."""
        b, t, d = x.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        if self.relative_position_bias_table is not None:
            bias = position_bias(self.relative_position_bias_table, self.grid)
        qkv, _ = scaled_linear_parts(self.qkv, x.reshape(b * t, d), None)  # [B*T, 3D], no bias
        qkv_bias = self.qkv_bias()
        if self.implementation == "pallas":  # reads q, k, v in place: no split, no padding
            qkv = qkv.reshape(b, t, 3, heads, head_dim)
            qkv_bias = None if qkv_bias is None else qkv_bias.reshape(3, heads, head_dim)
            out = parallel.per_batch_shard(fused_attention, shared=(1, 2))(qkv, bias, qkv_bias)
            return scaled_linear_parts(self.proj, out.reshape(b, t, d), scale)
        # the bias added before the heads are split, so that its gradient is a sum over one dim
        # of tokens (XLA:CPU tree-reduces a [B, T, 3, heads, D / heads] one)
        if qkv_bias is not None:
            qkv = qkv + qkv_bias.astype(qkv.dtype)
        qkv = qkv.reshape(b, t, 3, heads, head_dim)
        if self.implementation == "xla":
            # split, not unpacked: the gradient of a split is one concatenation, that of an
            # unpacking three zero-padded copies of the whole
            q, k, v = (x[0] for x in jnp.split(qkv.transpose(2, 0, 3, 1, 4), 3))
            q = q * np.asarray(head_dim**-0.5, q.dtype)
            out = softmax_attention(q, k, v, bias).transpose(0, 2, 1, 3)  # [B, T, heads, D / heads]
        else:  # cuDNN's fused kernel: [B, T, heads, D / heads] operands
            q, k, v = (x[:, :, 0] for x in jnp.split(qkv, 3, axis=2))
            bias = None if bias is None else bias.astype(q.dtype)
            if t % 2:
                q, k, v, bias = _pad_to_even_length(q, k, v, bias)
            out = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")[:, :t]
        return scaled_linear_parts(self.proj, out.reshape(b, t, d), scale)


def _pad_to_even_length(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None
) -> tuple[jax.Array, ...]:
    """One padding token for cuDNN, whose fused attention trains only on even lengths
    (1 + 14 x 14 = 197 tokens). The padded key gets a large negative bias, so no query
    attends to it; the padded query's output is dropped by the caller."""
    t = q.shape[1]
    pad = [(0, 0), (0, 1), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    if bias is None:
        bias = jnp.zeros((1, 1, t, t), q.dtype)
    bias = jnp.pad(bias, [(0, 0), (0, 0), (0, 1), (0, 0)])
    bias = jnp.pad(bias, [(0, 0), (0, 0), (0, 0), (0, 1)], constant_values=-1e4)
    return q, k, v, bias


class Mlp(nnx.Module):
    def __init__(
        self, dim: int, hidden: int, dtype: DTypeLike, rngs: nnx.Rngs, implementation: str = "xla"
    ):
        if implementation not in MLP_IMPLEMENTATIONS:
            raise ValueError(f"mlp must be one of {MLP_IMPLEMENTATIONS}, got {implementation!r}")
        self.implementation = implementation
        self.fc1 = dense(dim, hidden, dtype, rngs)
        self.fc2 = dense(hidden, dim, dtype, rngs)

    def __call__(
        self, x: jax.Array, scale: nnx.Param | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [B, T, D]; ``scale`` [D], BEiT's layer scale of the output, if any. Returns the
        output in two parts, (fc2 without its bias [B, T, D], that bias [D]), as
        ``scaled_linear_parts``: the block adds the bias with the residual."""
        if self.implementation == "xla":
            return scaled_linear_parts(self.fc2, gelu(self.fc1(x)), scale)
        w2, b2 = scaled_weights(self.fc2, scale)
        fc1 = self.fc1
        x, w1, b1, w2, b2 = fc1.promote_dtype(
            (x, fc1.kernel[...], fc1.bias[...], w2, b2), dtype=fc1.dtype
        )
        xla_gelu = gelu if self.implementation == "pallas_backward" else None
        mlp = functools.partial(fused_mlp, xla_gelu=xla_gelu)
        y = parallel.per_batch_shard(mlp, shared=(1, 2, 3))(x, w1, b1, w2, None)
        return y, b2


def scaled_weights(
    layer: nnx.Linear, scale: nnx.Param | None
) -> tuple[jax.Array, jax.Array | None]:
    """``layer``'s kernel and bias (None without one) times ``scale``, if any: the layer scale
    folded into the weights, a product over [D_in, D] rather than over the activations
    [B, T, D], whose gradient sums over weights rather than over every token (XLA:CPU's slow
    outer-dimension reduction)."""
    kernel = layer.kernel[...]
    bias = None if layer.bias is None else layer.bias[...]
    if scale is None:
        return kernel, bias
    return kernel * scale[...], None if bias is None else bias * scale[...]


def scaled_linear_parts(
    layer: nnx.Linear, x: jax.Array, scale: nnx.Param | None
) -> tuple[jax.Array, jax.Array | None]:
    """``layer(x) * scale`` in two parts, (x @ kernel, bias) in the layer's compute dtype, with
    the scale folded into the weights (``scaled_weights``): for callers that add the bias in a
    kernel of their own, which then also sums its gradient."""
    kernel, bias = scaled_weights(layer, scale)
    x, kernel, bias = layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)
    return token_matmul(x, kernel), bias


class Branch(NamedTuple):
    """A residual branch not yet added to the stream: x + scale * (delta + bias). A block
    leaves its MLP branch so, for the next block's first LayerNorm to add (``residual_norm``:
    with the Pallas LayerNorm, in its kernel)."""

    delta: jax.Array  # [B, T, D]
    scale: jax.Array | None  # [B], the drop-path factor per example
    bias: jax.Array | None  # [D], the bias of the layer that computed delta


def add_branch(x: jax.Array, branch: Branch | None) -> jax.Array:
    """x + scale * (delta + bias) as XLA computes it; x without a branch."""
    if branch is None:
        return x
    delta = branch.delta if branch.bias is None else branch.delta + branch.bias
    return x + per_example(delta, branch.scale)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), written with erf as PyTorch's ``nn.GELU`` computes it.

    ``jax.nn.gelu(approximate=False)`` uses erfc, whose XLA:CPU lowering made it the costliest
    elementwise op of the CPU train step (ViT-tiny: ~70 ms of ~1.2 s); erf is the same function
    to float32 rounding in the range activations take.
    """
    return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


def drop_path_scale(rate: float | jax.Array, key: jax.Array | None, batch: int) -> jax.Array | None:
    """Stochastic depth's factor per example, [B] float32: 1 / (1 - rate) for a kept residual
    branch, 0 for a dropped one; None (no drop path) without a key or at rate 0. ``rate`` may be
    traced (a scan over blocks with different rates; a traced 0 gives factors of 1)."""
    if key is None or (isinstance(rate, float) and rate == 0.0):
        return None
    keep = jax.random.bernoulli(key, 1.0 - rate, (batch,))
    # written as exp(-log(1 - rate)) or exp(-inf): XLA computes an exp once, where it fused a
    # plain select, random-bit generation and all, into each consumer of the factor and
    # recomputed it per element (~3% of a CPU ViT step)
    return jnp.exp(jnp.where(keep, -jnp.log1p(-jnp.asarray(rate, jnp.float32)), -jnp.inf))


def per_example(x: jax.Array, scale: jax.Array | None) -> jax.Array:
    """x [B, ...] times a factor per example ``scale`` [B] (in x's dtype); x if None."""
    if scale is None:
        return x
    return x * scale.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def residual_norm(
    norm: nnx.LayerNorm,
    x: jax.Array,
    branch: Branch | None = None,
    implementation: str = "xla",
) -> tuple[jax.Array, jax.Array]:
    """(x_new, norm(x_new)) for x_new = ``add_branch(x, branch)``: a pre-norm block's residual
    add and the LayerNorm after it. "pallas" fuses both into one kernel per direction
    (``models.fused_norm``), which also sums the branch bias's gradient; callers carry on with
    the returned x, through which the kernel adds the residual stream's gradient."""
    if implementation == "xla":
        x = add_branch(x, branch)
        return x, norm(x)
    if implementation != "pallas":
        raise ValueError(
            f"residual_norm: implementation must be 'xla' or 'pallas' (resolved), got "
            f"{implementation!r}"
        )
    delta, scale, delta_bias = (None, None, None) if branch is None else branch
    # the residual stream keeps the wider of its dtypes, as x + delta would; y is norm's dtype
    dtype = x.dtype if delta is None else jnp.result_type(x, delta)
    x, delta = (None if a is None else a.astype(dtype) for a in (x, delta))
    fused = functools.partial(residual_layer_norm, eps=norm.epsilon)
    gamma, beta = norm.scale[...], norm.bias[...]
    sharded = parallel.per_batch_shard(fused, shared=(3, 4, 5))
    x, y = sharded(x, delta, scale, gamma, beta, delta_bias)
    return x, y.astype(norm.dtype or dtype)


class Block(nnx.Module):
    """Pre-norm transformer block, with BEiT's layer scale and relative position bias if asked."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        variant: Variant,
        mlp_ratio: float = 4.0,
        layer_scale_init: float | None = None,
        rel_pos_grid: tuple[int, int] | None = None,
        drop_path_rate: float = 0.0,
        attention: str = "xla",
        mlp: str = "xla",
        norm: str = "xla",
        dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.norm_implementation = resolve_norm(norm, dtype, dim)
        self.norm1 = layer_norm(dim, dtype, rngs)
        self.attn = Attention(dim, num_heads, variant, dtype, rngs, rel_pos_grid, attention)
        self.norm2 = layer_norm(dim, dtype, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype, rngs, mlp)
        self.drop_path_rate = drop_path_rate
        scale = layer_scale_init is not None
        self.gamma_1 = nnx.Param(jnp.full((dim,), layer_scale_init, jnp.float32)) if scale else None
        self.gamma_2 = nnx.Param(jnp.full((dim,), layer_scale_init, jnp.float32)) if scale else None

    def __call__(
        self,
        x: jax.Array,
        bias: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        drop_path_rate: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, T, D]; ``bias`` the shared relative position bias, if the model has one;
        ``drop_path_rate`` overrides the block's own (scanned blocks pass theirs as data)."""
        return add_branch(*self.residual(x, None, bias, dropout_key, drop_path_rate))

    def residual(
        self,
        x: jax.Array,
        pending: Branch | None,
        bias: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        drop_path_rate: jax.Array | None = None,
    ) -> tuple[jax.Array, Branch]:
        """The block on x plus the ``pending`` branch of the block before (if any), with its
        own MLP branch left pending: (x, branch), the block's output being
        ``add_branch(x, branch)``. Each residual add is then done by the LayerNorm after it,
        in one kernel with ``norm="pallas"``."""
        rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        keys = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        norm = functools.partial(residual_norm, implementation=self.norm_implementation)
        x, h = norm(self.norm1, x, pending)
        delta, delta_bias = self.attn(h, bias, self.gamma_1)
        attn_scale = drop_path_scale(rate, keys[0], x.shape[0])
        x, h = norm(self.norm2, x, Branch(delta, attn_scale, delta_bias))
        delta, delta_bias = self.mlp(h, self.gamma_2)
        return x, Branch(delta, drop_path_scale(rate, keys[1], x.shape[0]), delta_bias)


class VisionTransformer(nnx.Module):
    """ViT encoder: images [B, H, W, C] -> normalised tokens [B, 1 + N, D] (cls first).

    ``mask`` ([B, N] bool), when given, replaces the embeddings of masked patches by the learned
    mask token (SimMIM). ``dropout_key`` enables drop path; without it the model is deterministic.
    """

    def __init__(
        self,
        *,
        variant: Variant = "beit",
        image_size: tuple[int, int] = (224, 224),
        patch_size: int = 16,
        in_chans: int = 3,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        rel_pos: RelPos = "shared",
        layer_scale_init: float = 0.1,
        drop_path_rate: float = 0.0,
        remat: str = "none",
        scan: bool = False,
        attention: str = "auto",
        mlp: str = "xla",
        norm: str = "auto",
        dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if variant not in ("beit", "vit"):
            raise ValueError(f"variant must be 'beit' or 'vit', got {variant!r}")
        if rel_pos not in ("shared", "per_block"):
            raise ValueError(f"rel_pos must be 'shared' or 'per_block', got {rel_pos!r}")
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
        attention = resolve_attention(attention, dtype)
        norm = resolve_norm(norm, dtype, width)
        self.remat = remat
        self.scan = scan
        h, w = image_size
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
        self.variant = variant
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid = (h // patch_size, w // patch_size)
        self.width = width
        self.dtype = dtype
        num_patches = self.grid[0] * self.grid[1]

        self.patch_embed = nnx.Dict(
            proj=nnx.Conv(
                in_chans,
                width,
                (patch_size, patch_size),
                strides=patch_size,
                padding="VALID",
                dtype=dtype,
                kernel_init=trunc_normal,
                rngs=rngs,
            )
        )
        self.cls_token = nnx.Param(trunc_normal(rngs.params(), (1, 1, width)))
        self.mask_token = nnx.Param(trunc_normal(rngs.params(), (1, 1, width)))
        beit = variant == "beit"
        self.pos_embed = (
            None if beit else nnx.Param(trunc_normal(rngs.params(), (1, num_patches + 1, width)))
        )
        shared = beit and rel_pos == "shared"
        self.rel_pos_bias = RelativePositionBias(self.grid, num_heads) if shared else None
        rates = np.linspace(0.0, drop_path_rate, depth).tolist()
        self.blocks = nnx.List(
            [
                Block(
                    width,
                    num_heads,
                    variant=variant,
                    mlp_ratio=mlp_ratio,
                    layer_scale_init=layer_scale_init if beit else None,
                    rel_pos_grid=self.grid if beit and rel_pos == "per_block" else None,
                    drop_path_rate=rate,
                    attention=attention,
                    mlp=mlp,
                    norm=norm,
                    dtype=dtype,
                    rngs=rngs,
                )
                for rate in rates
            ]
        )
        if beit:  # BEiT's fix_init_weight: the residual branches' output layers scaled by depth
            for i, block in enumerate(self.blocks):
                for layer in (block.attn.proj, block.mlp.fc2):
                    layer.kernel[...] = layer.kernel[...] / np.sqrt(2.0 * (i + 1))
        self.norm = layer_norm(width, dtype, rngs)
        self.norm_implementation = norm

    def embed(self, images: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Patch embedding + cls token (+ position embedding): [B, H, W, C] -> [B, 1 + N, D].
        ``images``: floats, gray in [0, 1] then ``(x - mean) / std`` (``normalization``)."""
        if images.ndim != 4:
            raise ValueError(f"expected images [B, H, W, C], got an array of shape {images.shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise TypeError(
                f"expected float images (gray in [0, 1], then normalised), got {images.dtype}: "
                "for uint8 pixels, divide by 255 first"
            )
        if images.shape[-1] == 1 and self.in_chans == 3:
            images = jnp.repeat(images, 3, axis=-1)  # gray replicated to RGB, as USFM feeds it
        if images.shape[-1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {images.shape[-1]}")
        if images.shape[1:3] != (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size):
            raise ValueError(
                f"model built for {self.grid} patches of {self.patch_size} px, "
                f"got images of shape {images.shape[1:3]}"
            )
        # The conv's weights, applied as one matmul over patchified pixels: the same function,
        # but GPUs run a [B*N, p*p*C] x [p*p*C, D] product far faster than a strided conv.
        proj = self.patch_embed["proj"]
        kernel = proj.kernel[...].reshape(-1, self.width).astype(self.dtype)  # [p*p*C, D]
        x = token_matmul(patchify(images.astype(self.dtype), self.patch_size), kernel)  # [B, N, D]
        x = x + proj.bias[...].astype(self.dtype)
        b = x.shape[0]
        if mask is not None:
            x = jnp.where(mask[..., None], self.mask_token[...].astype(x.dtype), x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed[...].astype(x.dtype)
        return x

    def __call__(
        self,
        images: jax.Array,
        mask: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
        final_norm: bool = True,
        keep: jax.Array | None = None,
    ) -> jax.Array:
        """Tokens after the final norm (or, ``final_norm=False``, the last block's output).

        ``keep`` ([B, K] patch indices, MAE) passes only the cls token and those patches
        through the blocks: [B, 1 + K, D]. It needs absolute positions (``variant="vit"``)."""
        x, branch, _ = self._encode(images, mask, keep, dropout_key, ())
        if not final_norm:
            return add_branch(x, branch)
        return residual_norm(self.norm, x, branch, self.norm_implementation)[1]

    def intermediates(
        self, images: jax.Array, layers: Sequence[int], *, dropout_key: jax.Array | None = None
    ) -> list[jax.Array]:
        """The outputs [B, 1 + N, D] of the blocks ``layers`` (0-based, increasing, before any
        norm): the multi-level features of dense-prediction decoders (e.g. UPerNet)."""
        if list(layers) != sorted(set(layers)) or not 0 <= min(layers, default=-1) <= max(
            layers
        ) < len(self.blocks):
            raise ValueError(
                f"layers {tuple(layers)} must increase, within [0, {len(self.blocks)})"
            )
        return self._encode(images, None, None, dropout_key, tuple(layers))[2]

    def _encode(
        self,
        images: jax.Array,
        mask: jax.Array | None,
        keep: jax.Array | None,
        dropout_key: jax.Array | None,
        taps: tuple[int, ...],
    ) -> tuple[jax.Array, Branch | None, list[jax.Array]]:
        """The last block's output, as x and a branch still to add to it (``add_branch``), and
        the outputs of blocks ``taps``."""
        x = self.embed(images, mask)  # [B, 1 + N, D]
        if keep is not None:
            if self.pos_embed is None:
                raise ValueError("encoding visible patches only needs variant 'vit'")
            patches = jnp.take_along_axis(x[:, 1:], keep[..., None], axis=1)  # [B, K, D]
            x = jnp.concatenate([x[:, :1], patches], axis=1)
        x = parallel.constrain_batch(x)  # [B, T, D], batch-sharded
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        # one drop-path key per block, or none (deterministic)
        keys = None if dropout_key is None else jax.random.split(dropout_key, len(self.blocks))
        if self.scan and not taps:
            return self._scan_blocks(x, bias, keys), None, []
        keys = [None] * len(self.blocks) if keys is None else keys
        if self.remat != "none":  # trade compute for activation memory, block by block; a
            # block keeps its input only, so its residual adds stay inside it
            remat_block = nnx.remat(_call_block, policy=REMAT_POLICIES[self.remat])

            def run(block, x, branch, key):
                return remat_block(block, x, bias, key), None
        else:  # each block's last residual add is left to the next block's first norm

            def run(block, x, branch, key):
                return block.residual(x, branch, bias, key)

        outputs, branch = [], None
        for i, (block, key) in enumerate(zip(self.blocks, keys, strict=True)):
            x, branch = run(block, x, branch, key)
            x = parallel.constrain_batch(x)  # [B, T, D] stays batch-sharded
            if branch is not None:
                branch = branch._replace(delta=parallel.constrain_batch(branch.delta))
            if i in taps:
                outputs.append(add_branch(x, branch))
        return x, branch, outputs

    def _scan_blocks(
        self, x: jax.Array, bias: jax.Array | None, keys: jax.Array | None
    ) -> jax.Array:
        """The blocks as one ``lax.scan`` (one block to compile, not ``depth``): their weights
        are stacked inside the step, so parameter names and checkpoints stay per block."""
        graphdef = nnx.graphdef(self.blocks[0])
        weights = jax.tree.map(lambda *w: jnp.stack(w), *[nnx.state(b) for b in self.blocks])
        rates = jnp.asarray([b.drop_path_rate for b in self.blocks], jnp.float32)

        def body(x, inputs):
            weights, rate, key = inputs
            return parallel.constrain_batch(nnx.merge(graphdef, weights)(x, bias, key, rate)), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        x, _ = jax.lax.scan(body, x, (weights, rates, keys))
        return x


def _call_block(
    block: Block, x: jax.Array, bias: jax.Array | None, key: jax.Array | None
) -> jax.Array:
    return block(x, bias, key)
