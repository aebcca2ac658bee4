"""Tests for the ViT encoder, pixel heads, factory and patch helpers.

Every numerical check compares against an independent numpy reference written below from the
BEiT / timm ViT descriptions (float64, explicit loops where the layout matters); the reference
side never calls the module under test. Models are tiny so the file runs in seconds.
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from scipy.special import erf

from usfm_jax import parallel
from usfm_jax.models.attention import softmax_attention
from usfm_jax.models.factory import create_mim_model
from usfm_jax.models.heads import LinearPixelHead, MaskedImageModel, TransformerPixelHead
from usfm_jax.models.vit import (
    Block,
    Branch,
    VisionTransformer,
    _pad_to_even_length,
    add_branch,
    dense,
    drop_path_scale,
    relative_position_index,
    residual_norm,
    resolve_attention,
    resolve_norm,
)
from usfm_jax.patches import patchify, unpatchify

IMAGE = (32, 48)  # non-square: grid (2, 3)
PATCH = 16
WIDTH = 32
HEADS = 2
DEPTH = 2
LN_EPS = 1e-6

# ----------------------------------------------------------------------------------------
# Independent numpy reference
# ----------------------------------------------------------------------------------------


def ref_rel_index(gh: int, gw: int) -> np.ndarray:
    """timm's gen_relative_position_index (BEiT), written as plain loops."""
    n = gh * gw
    num_offsets = (2 * gh - 1) * (2 * gw - 1)
    out = np.empty((n + 1, n + 1), np.int64)
    for i in range(n):
        y1, x1 = divmod(i, gw)
        for j in range(n):
            y2, x2 = divmod(j, gw)
            out[i + 1, j + 1] = (y1 - y2 + gh - 1) * (2 * gw - 1) + (x1 - x2 + gw - 1)
    for k in range(n + 1):
        out[0, k] = num_offsets  # cls as query
        out[k, 0] = num_offsets + 1  # cls as key
    out[0, 0] = num_offsets + 2
    return out


def ref_layer_norm(x: np.ndarray, p: dict) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * p["scale"] + p["bias"]


def ref_linear(x: np.ndarray, p: dict) -> np.ndarray:
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def ref_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def ref_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_patch_embed(images: np.ndarray, p: dict, patch: int) -> np.ndarray:
    """Strided conv, kernel [kh, kw, in, out], patches in row-major grid order."""
    b, h, w, _ = images.shape
    gh, gw = h // patch, w // patch
    kernel = p["kernel"]
    out = np.zeros((b, gh * gw, kernel.shape[-1]))
    for y in range(gh):
        for x in range(gw):
            pix = images[:, y * patch : (y + 1) * patch, x * patch : (x + 1) * patch, :]
            out[:, y * gw + x] = np.einsum("bijc,ijcd->bd", pix, kernel) + p["bias"]
    return out


def ref_rel_bias(table: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[heads, T, T] from a [rows, heads] table."""
    return table[ref_rel_index(*grid)].transpose(2, 0, 1)


def ref_embed(params: dict, images: np.ndarray, patch: int, mask=None) -> np.ndarray:
    x = ref_patch_embed(images, params["patch_embed"]["proj"], patch)
    if mask is not None:
        x = np.where(np.asarray(mask)[..., None], params["mask_token"][0], x)
    cls = np.broadcast_to(params["cls_token"], (x.shape[0], 1, x.shape[-1]))
    x = np.concatenate([cls, x], axis=1)
    if "pos_embed" in params:
        x = x + params["pos_embed"]
    return x


def ref_attention(x: np.ndarray, p: dict, heads: int, bias) -> np.ndarray:
    b, t, d = x.shape
    hd = d // heads
    qkv = x @ p["qkv"]["kernel"]
    if "bias" in p["qkv"]:
        qkv = qkv + p["qkv"]["bias"]
    if "q_bias" in p:  # BEiT: k bias is zero
        qkv = qkv + np.concatenate([p["q_bias"], np.zeros(d), p["v_bias"]])
    qkv = qkv.reshape(b, t, 3, heads, hd)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, H, T, hd]
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    if bias is not None:
        logits = logits + bias[None]
    out = ref_softmax(logits) @ v  # [B, H, T, hd]
    return ref_linear(out.transpose(0, 2, 1, 3).reshape(b, t, d), p["proj"])


def ref_forward(params: dict, images: np.ndarray, *, heads: int, patch: int, mask=None):
    grid = (images.shape[1] // patch, images.shape[2] // patch)
    x = ref_embed(params, images, patch, mask)
    shared = None
    if "rel_pos_bias" in params:
        shared = ref_rel_bias(params["rel_pos_bias"]["relative_position_bias_table"], grid)
    for i in sorted(params["blocks"]):
        blk = params["blocks"][i]
        bias = shared
        if "relative_position_bias_table" in blk["attn"]:  # timm Beit's per-block table
            bias = ref_rel_bias(blk["attn"]["relative_position_bias_table"], grid)
        branch = ref_attention(ref_layer_norm(x, blk["norm1"]), blk["attn"], heads, bias)
        if "gamma_1" in blk:
            branch = branch * blk["gamma_1"]
        x = x + branch
        h = ref_gelu(ref_linear(ref_layer_norm(x, blk["norm2"]), blk["mlp"]["fc1"]))
        branch = ref_linear(h, blk["mlp"]["fc2"])
        if "gamma_2" in blk:
            branch = branch * blk["gamma_2"]
        x = x + branch
    return ref_layer_norm(x, params["norm"])


def ref_patchify(images: np.ndarray, patch: int) -> np.ndarray:
    b, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    out = np.zeros((b, gh * gw, patch * patch * c), images.dtype)
    for y in range(gh):
        for x in range(gw):
            pix = images[:, y * patch : (y + 1) * patch, x * patch : (x + 1) * patch, :]
            out[:, y * gw + x] = pix.reshape(b, -1)
    return out


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def vit_args(**kw) -> dict:
    args = dict(
        variant="beit",
        image_size=IMAGE,
        patch_size=PATCH,
        in_chans=1,
        width=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        rngs=nnx.Rngs(0),
    )
    args.update(kw)
    return args


def abstract_vit(**kw) -> VisionTransformer:
    """Shapes only (no initialisation compute)."""
    return nnx.eval_shape(lambda: VisionTransformer(**vit_args(**kw)))


def make_vit(seed: int = 0, **kw) -> VisionTransformer:
    """A tiny encoder whose every parameter is random (see ``randomize``)."""
    model = abstract_vit(**kw)
    randomize(model, seed)
    return model


def make_mim(cfg: ml_collections.ConfigDict, seed: int = 0) -> MaskedImageModel:
    model = nnx.eval_shape(lambda: create_mim_model(cfg, IMAGE, nnx.Rngs(0)))
    randomize(model, seed)
    return model


def fwd(model: nnx.Module, images, mask=None, key=None) -> np.ndarray:
    """Forward pass as numpy, with full float32 matmuls (also on accelerators).

    Every test goes through here so the op-by-op compilation cache (keyed on the precision
    context) is shared between tests.
    """
    mask = None if mask is None else jnp.asarray(mask)
    with jax.default_matmul_precision("float32"):
        return np.asarray(model(jnp.asarray(images), mask, dropout_key=key))


def embed(model: VisionTransformer, images, mask=None) -> np.ndarray:
    mask = None if mask is None else jnp.asarray(mask)
    with jax.default_matmul_precision("float32"):
        return np.asarray(model.embed(jnp.asarray(images), mask))


def to_numpy(tree) -> dict:
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def params_of(model: nnx.Module) -> dict:
    return to_numpy(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def set_params(model: nnx.Module, pure: dict) -> None:
    """Load ``pure`` values, keeping each parameter's own dtype (as the model created it)."""
    state = nnx.state(model, nnx.Param)
    current = nnx.to_pure_dict(state)
    new = jax.tree_util.tree_map(lambda a, old: jnp.asarray(a, old.dtype), pure, current)
    nnx.replace_by_pure_dict(state, new)
    nnx.update(model, state)


def randomize(model: nnx.Module, seed: int = 0) -> dict:
    """Replace every parameter by random values of a sensible scale; returns them (float64).

    Unlike the default init, q_bias, v_bias, the tables, gammas and LayerNorm scale/bias are all
    non-trivial, so any of them being ignored or misplaced shows up in the forward comparison.
    """
    rng = np.random.default_rng(seed)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def draw(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "kernel":
            value = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.3 * rng.normal(size=shape)
        else:
            value = 0.5 * rng.normal(size=shape)
        return value.astype(np.float32)

    new = jax.tree_util.tree_map_with_path(draw, pure)
    set_params(model, new)
    got = params_of(model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, to_numpy(new))
    # nothing abstract left over (the models are built with nnx.eval_shape)
    assert all(isinstance(v, jax.Array) for v in jax.tree_util.tree_leaves(nnx.state(model)))
    return got


def flat_names(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(pure)
    }


def images_for(b: int, c: int, seed: int = 1, size=IMAGE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, *size, c)).astype(np.float32)


def mim_cfg(**kw) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(
            variant="beit",
            size="micro",
            width=WIDTH,
            depth=DEPTH,
            num_heads=HEADS,
            patch_size=PATCH,
            in_chans=1,
            out_chans=1,
            rel_pos="shared",
            layer_scale_init=0.1,
            drop_path_rate=0.0,
            remat="none",
            scan_layers=False,
            attention="xla",
            mlp="xla",
            norm="xla",
            dtype="float32",
            head="linear",
            decoder=dict(width=WIDTH, depth=1, num_heads=HEADS),
        )
    )
    cfg.update(kw)
    return cfg


# ----------------------------------------------------------------------------------------
# 1. Relative position index
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (3, 5), (5, 3), (14, 14)])
def test_relative_position_index_matches_loop_reference(grid):
    got = np.asarray(relative_position_index(grid))
    np.testing.assert_array_equal(got, ref_rel_index(*grid))
    rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    assert got.min() == 0 and got.max() == rows - 1


def test_relative_position_index_known_values():
    # grid (1, 2): dx = x1 - x2 in {-1, 0, 1} -> rows 0, 1, 2; cls rows 3, 4, 5.
    expected = np.array([[5, 3, 3], [4, 1, 0], [4, 2, 1]])
    np.testing.assert_array_equal(np.asarray(relative_position_index((1, 2))), expected)


# ----------------------------------------------------------------------------------------
# 2. Full forward against numpy
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "rel_pos", "in_chans"),
    [
        ("beit", "shared", 1),
        ("beit", "per_block", 3),
        ("beit", "shared", 3),
        ("vit", "shared", 1),
        ("vit", "shared", 3),
    ],
)
@pytest.mark.parametrize("use_mask", [False, True])
def test_forward_matches_numpy_reference(variant, rel_pos, in_chans, use_mask):
    model = make_vit(3, variant=variant, rel_pos=rel_pos, in_chans=in_chans)
    params = params_of(model)
    images = images_for(2, in_chans)
    mask = None
    if use_mask:
        mask = np.array([[True, False, True, False, False, True], [False] * 5 + [True]])
    got = fwd(model, images, mask)
    ref = ref_forward(params, images.astype(np.float64), heads=HEADS, patch=PATCH, mask=mask)
    assert got.dtype == np.float32
    assert got.shape == (2, 1 + 6, WIDTH)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_reference_is_sensitive_to_beit_details():
    """Sanity check of the reference: zeroing k/q/v biases or the table changes the output."""
    params = params_of(make_vit(4, variant="beit", rel_pos="shared"))
    images = images_for(1, 1).astype(np.float64)
    base = ref_forward(params, images, heads=HEADS, patch=PATCH)
    for path in [
        ("rel_pos_bias", "relative_position_bias_table"),
        ("blocks", 0, "attn", "q_bias"),
        ("blocks", 1, "attn", "v_bias"),
        ("blocks", 0, "gamma_1"),
    ]:
        p = jax.tree_util.tree_map(np.copy, params)
        node = p
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = np.zeros_like(node[path[-1]])
        assert np.abs(ref_forward(p, images, heads=HEADS, patch=PATCH) - base).max() > 1e-2


@pytest.mark.parametrize("variant", ["beit", "vit"])
def test_layer_norms_use_eps_1e6(variant):
    """Inputs with variance ~1e-6 make eps 1e-6 vs 1e-5 (PyTorch's default) clearly visible."""
    model = make_vit(11, variant=variant)
    params = params_of(model)
    x = 1e-3 * np.random.default_rng(0).normal(size=(2, 7, WIDTH))
    modules = {"norm": (model.norm, params["norm"])}
    for i in range(DEPTH):
        for name in ("norm1", "norm2"):
            modules[f"{i}/{name}"] = (getattr(model.blocks[i], name), params["blocks"][i][name])
    for name, (module, p) in modules.items():
        got = np.asarray(module(jnp.asarray(x, jnp.float32)))
        np.testing.assert_allclose(got, ref_layer_norm(x, p), atol=1e-3, rtol=1e-3, err_msg=name)


# ----------------------------------------------------------------------------------------
# 3. Mask token
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["beit", "vit"])
def test_mask_token_replaces_masked_embeddings(variant):
    model = make_vit(5, variant=variant)
    params = params_of(model)
    images = jnp.asarray(images_for(2, 1))
    mask = np.array(
        [[True, False, False, True, False, True], [False, True, False, False, False, False]]
    )
    plain = embed(model, images)
    masked = embed(model, images, mask)
    token = params["mask_token"][0, 0]
    pos = params["pos_embed"][0] if variant == "vit" else np.zeros((7, WIDTH))
    np.testing.assert_array_equal(masked[:, 0], plain[:, 0])  # cls untouched
    for b in range(2):
        for i in range(6):
            if mask[b, i]:
                np.testing.assert_allclose(masked[b, 1 + i], token + pos[1 + i], atol=1e-6)
            else:
                np.testing.assert_array_equal(masked[b, 1 + i], plain[b, 1 + i])
    # an all-False mask is the same as no mask
    none = embed(model, images, np.zeros((2, 6), bool))
    np.testing.assert_array_equal(none, plain)


# ----------------------------------------------------------------------------------------
# 4. Input channels / sizes
# ----------------------------------------------------------------------------------------


def test_gray_image_replicated_for_rgb_model():
    model = make_vit(6, in_chans=3)
    gray = images_for(2, 1)
    rgb = np.repeat(gray, 3, axis=-1)
    np.testing.assert_array_equal(fwd(model, gray), fwd(model, rgb))


def test_wrong_channels_or_size_raise():
    rgb_model = make_vit(in_chans=3)
    with pytest.raises(ValueError, match=r"expected 3 input channels, got 2"):
        rgb_model(jnp.zeros((1, *IMAGE, 2)))
    gray_model = make_vit(in_chans=1)
    with pytest.raises(ValueError, match=r"expected 1 input channels, got 3"):
        gray_model(jnp.zeros((1, *IMAGE, 3)))
    with pytest.raises(ValueError, match=r"\(2, 3\) patches of 16 px.*\(48, 32\)"):
        gray_model(jnp.zeros((1, 48, 32, 1)))
    with pytest.raises(ValueError, match="patches"):
        gray_model.embed(jnp.zeros((1, 32, 64, 1)))
    with pytest.raises(ValueError, match=r"expected images \[B, H, W, C\], got .* \(1, 32, 48\)"):
        gray_model(jnp.zeros((1, *IMAGE)))  # no channel axis: not read as 48 channels
    with pytest.raises(TypeError, match="got uint8: for uint8 pixels, divide by 255"):
        gray_model(jnp.zeros((1, *IMAGE, 1), jnp.uint8))  # never silently cast


# ----------------------------------------------------------------------------------------
# 5. Drop path
# ----------------------------------------------------------------------------------------


def test_drop_path_deterministic_without_key():
    # depth 2: block rates linspace(0, 0.6, 2) = [0, 0.6]
    model = make_vit(7, drop_path_rate=0.6)
    ref_model = make_vit(99, drop_path_rate=0.0)
    set_params(ref_model, params_of(model))
    images = images_for(2, 1)
    out = fwd(model, images)
    np.testing.assert_array_equal(out, fwd(model, images))
    np.testing.assert_array_equal(out, fwd(ref_model, images))
    # a rate-0 model ignores the key entirely
    np.testing.assert_array_equal(fwd(ref_model, images, key=jax.random.key(0)), out)
    # with a key, outputs depend on the key (4 Bernoulli(0.4) draws per key) and are reproducible
    keyed = [fwd(model, images, key=jax.random.key(k)) for k in range(6)]
    np.testing.assert_array_equal(keyed[0], fwd(model, images, key=jax.random.key(0)))
    assert max(np.abs(k - out).max() for k in keyed) > 1e-3
    assert max(np.abs(k - keyed[0]).max() for k in keyed[1:]) > 1e-3


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """x as a residual branch with stochastic depth, added to zeros as a block adds it."""
    return add_branch(jnp.zeros_like(x), Branch(x, drop_path_scale(rate, key, x.shape[0]), None))


def test_drop_path_per_example():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 3, 4)).astype(np.float32))
    rate = 0.5
    out = np.asarray(drop_path(x, rate, jax.random.key(3)))
    xn = np.asarray(x)
    kept = 0
    for i in range(64):
        if np.all(out[i] == 0):
            continue
        np.testing.assert_allclose(out[i], xn[i] / (1 - rate), rtol=1e-6)
        kept += 1
    assert 10 < kept < 54  # roughly half kept, whole examples at a time
    np.testing.assert_array_equal(np.asarray(drop_path(x, rate, None)), xn)
    np.testing.assert_array_equal(np.asarray(drop_path(x, 0.0, jax.random.key(3))), xn)


def test_drop_path_rates_increase_linearly():
    """timm's stochastic depth decay rule: block i gets rate * i / (depth - 1)."""
    model = abstract_vit(depth=5, drop_path_rate=0.2)
    rates = [block.drop_path_rate for block in model.blocks]
    np.testing.assert_allclose(rates, [0.0, 0.05, 0.1, 0.15, 0.2], atol=1e-12)


# ----------------------------------------------------------------------------------------
# 6. Compute dtype
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["beit", "vit"])
def test_bfloat16_compute(variant):
    bf16 = abstract_vit(variant=variant, dtype=jnp.bfloat16)
    param_dtypes = jax.tree_util.tree_map(lambda a: a.dtype, nnx.state(bf16, nnx.Param))
    assert set(jax.tree_util.tree_leaves(param_dtypes)) == {np.dtype(np.float32)}
    f32 = make_vit(8, variant=variant)
    set_params(bf16, params_of(f32))
    images = images_for(2, 1)
    ref = fwd(f32, images)
    out = fwd(bf16, images)
    assert out.dtype == jnp.bfloat16
    out = out.astype(np.float32)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 5e-2
    assert not np.array_equal(out, ref)  # really computed in bfloat16
    leaves = jax.tree_util.tree_leaves(nnx.state(bf16, nnx.Param))
    assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)


@pytest.mark.parametrize("head", ["linear", "transformer"])
def test_mim_model_output_float32_under_bfloat16(head):
    cfg = mim_cfg(dtype="bfloat16", head=head)
    abstract = nnx.eval_shape(lambda: create_mim_model(cfg, IMAGE, nnx.Rngs(0)))
    dtypes = {a.dtype for a in jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param))}
    assert dtypes == {np.dtype(np.float32)}
    model = make_mim(cfg)
    out = fwd(model, images_for(2, 1))
    assert out.dtype == jnp.float32
    assert out.shape == (2, 6, PATCH * PATCH)
    assert np.all(np.isfinite(out))


# ----------------------------------------------------------------------------------------
# 7. Parameter layout
# ----------------------------------------------------------------------------------------


def test_parameter_layout_beit_shared():
    names = flat_names(abstract_vit(variant="beit", rel_pos="shared"))
    rows = (2 * 2 - 1) * (2 * 3 - 1) + 3
    assert names["rel_pos_bias/relative_position_bias_table"] == (rows, HEADS)
    assert not any("blocks" in n and "relative_position" in n for n in names)
    assert "pos_embed" not in names
    for i in range(DEPTH):
        assert names[f"blocks/{i}/attn/qkv/kernel"] == (WIDTH, 3 * WIDTH)
        assert f"blocks/{i}/attn/qkv/bias" not in names
        assert names[f"blocks/{i}/attn/q_bias"] == (WIDTH,)
        assert names[f"blocks/{i}/attn/v_bias"] == (WIDTH,)
        assert not any(n.startswith(f"blocks/{i}/attn/k_bias") for n in names)
        assert names[f"blocks/{i}/gamma_1"] == (WIDTH,)
        assert names[f"blocks/{i}/gamma_2"] == (WIDTH,)
    assert names["patch_embed/proj/kernel"] == (PATCH, PATCH, 1, WIDTH)
    assert names["cls_token"] == (1, 1, WIDTH)
    assert names["mask_token"] == (1, 1, WIDTH)


def test_parameter_layout_beit_per_block():
    names = flat_names(abstract_vit(variant="beit", rel_pos="per_block"))
    rows = (2 * 2 - 1) * (2 * 3 - 1) + 3
    assert not any(n.startswith("rel_pos_bias") for n in names)
    for i in range(DEPTH):
        key = f"blocks/{i}/attn/relative_position_bias_table"  # as in timm's Beit
        assert names[key] == (rows, HEADS)
    assert sum("relative_position_bias_table" in n for n in names) == DEPTH


def test_parameter_layout_vit():
    names = flat_names(abstract_vit(variant="vit"))
    assert names["pos_embed"] == (1, 1 + 6, WIDTH)
    assert not any("relative_position" in n or "rel_pos" in n for n in names)
    assert not any("q_bias" in n or "v_bias" in n or "gamma" in n for n in names)
    for i in range(DEPTH):
        assert names[f"blocks/{i}/attn/qkv/bias"] == (3 * WIDTH,)


def test_beit_initial_values():
    """Fresh beit: layer scale at layer_scale_init, q/v biases and tables zero (as BEiT)."""
    params = params_of(VisionTransformer(**vit_args(variant="beit", layer_scale_init=0.25)))
    np.testing.assert_array_equal(params["blocks"][0]["gamma_1"], np.full(WIDTH, 0.25))
    np.testing.assert_array_equal(params["blocks"][1]["gamma_2"], np.full(WIDTH, 0.25))
    np.testing.assert_array_equal(params["blocks"][0]["attn"]["q_bias"], np.zeros(WIDTH))
    np.testing.assert_array_equal(params["norm"]["scale"], np.ones(WIDTH))


@pytest.mark.parametrize("variant", ["beit", "vit"])
def test_linear_weights_are_initialised_as_timms(variant):
    """Linear weights spread as timm's trunc_normal_(std=.02) gives them (in effect N(0, .02^2);
    jax's default cut at 2 std gives .0176), and in BEiT block i's attention projection and
    fc2 divided by sqrt(2 (i + 1)) (BEiT's fix_init_weight); timm's plain ViT does not."""
    import timm
    import torch

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=16, embed_dim=192, depth=3, num_heads=3, num_classes=0)
    if variant == "beit":
        theirs = timm.models.beit.Beit(**kw, use_rel_pos_bias=True, init_values=0.1)
    else:
        theirs = timm.models.vision_transformer.VisionTransformer(**kw)
    ours = VisionTransformer(variant=variant, image_size=(32, 32), width=192, depth=3,
                             num_heads=3, rngs=nnx.Rngs(0))  # fmt: skip
    for i in range(3):
        block, timm_block = ours.blocks[i], theirs.blocks[i]
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            layer, timm_layer = block, timm_block
            for part in name.split("."):
                layer, timm_layer = getattr(layer, part), getattr(timm_layer, part)
            ratio = float(np.std(layer.kernel[...])) / float(timm_layer.weight.detach().std())
            assert abs(ratio - 1) < 0.05, (i, name, ratio)


def test_base_parameter_count_matches_usfm_checkpoint():
    d, mlp, depth, heads = 768, 3072, 12, 12
    rows = (2 * 14 - 1) * (2 * 14 - 1) + 3
    assert rows == 732
    per_block = (
        4 * d  # norm1, norm2
        + 3 * d * d  # qkv (no bias)
        + 2 * d  # q_bias, v_bias
        + d * d
        + d  # proj
        + mlp * d
        + mlp  # fc1
        + d * mlp
        + d  # fc2
        + 2 * d  # gamma_1, gamma_2
    )
    expected = d + d + (d * 3 * 16 * 16 + d) + rows * heads + depth * per_block + 2 * d
    abstract = nnx.eval_shape(
        lambda: VisionTransformer(
            variant="beit",
            image_size=(224, 224),
            patch_size=16,
            in_chans=3,
            width=d,
            depth=depth,
            num_heads=heads,
            rel_pos="shared",
            rngs=nnx.Rngs(0),
        )
    )
    leaves = jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param))
    assert sum(math.prod(leaf.shape) for leaf in leaves) == expected


# ----------------------------------------------------------------------------------------
# 8. Heads, patches, factory
# ----------------------------------------------------------------------------------------


def test_patchify_matches_reference_and_round_trips():
    images = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
    got = np.asarray(patchify(jnp.asarray(images), 2))
    assert got.shape == (2, 6, 12)
    np.testing.assert_array_equal(got, ref_patchify(images, 2))
    # patch (gy=0, gx=1) of example 0 starts at pixel (0, 2): flat index (0*6 + 2)*3 = 6
    np.testing.assert_array_equal(got[0, 1, :3], [6, 7, 8])
    back = np.asarray(unpatchify(jnp.asarray(got), 2, (2, 3)))
    np.testing.assert_array_equal(back, images)
    rand = images_for(2, 1)
    p = patchify(jnp.asarray(rand), PATCH)
    np.testing.assert_array_equal(np.asarray(unpatchify(p, PATCH, (2, 3))), rand)
    np.testing.assert_array_equal(np.asarray(patchify(unpatchify(p, PATCH, (2, 3)), PATCH)), p)


def test_patch_embedding_is_linear_map_of_patchified_pixels():
    """The conv kernel layout [kh, kw, in, out] agrees with patchify's (py, px, c) order."""
    model = make_vit(9, in_chans=3, variant="vit")
    params = params_of(model)
    images = images_for(2, 3)
    emb = embed(model, images)[:, 1:] - params["pos_embed"][0, 1:]
    conv = params["patch_embed"]["proj"]
    flat = ref_patchify(images.astype(np.float64), PATCH) @ conv["kernel"].reshape(-1, WIDTH)
    np.testing.assert_allclose(emb, flat + conv["bias"], atol=1e-4)


@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 3, 4)])
def test_dense_layer_and_its_gradients_over_any_leading_dims(lead):
    """The token-flattening linear layer: x @ W + b over the last dim, and its parameter
    gradients summed over every leading dim (numpy float64 reference)."""
    layer = dense(6, 4, jnp.float32, nnx.Rngs(3))
    layer.bias[...] = jnp.arange(4.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, 6)).astype(np.float32)
    cot = rng.standard_normal((*lead, 4)).astype(np.float32)
    kernel = np.asarray(layer.kernel[...], np.float64)

    graph, params = nnx.split(layer)

    def loss(params):
        return jnp.sum(nnx.merge(graph, params)(jnp.asarray(x)) * cot)

    value, grads = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(value, np.sum((x @ kernel + np.arange(4.0)) * cot), rtol=1e-5)
    flat_x, flat_cot = x.reshape(-1, 6).astype(np.float64), cot.reshape(-1, 4)
    np.testing.assert_allclose(grads["kernel"][...], flat_x.T @ flat_cot, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["bias"][...], flat_cot.sum(0), rtol=1e-5, atol=1e-5)
    assert layer(jnp.asarray(x)).shape == (*lead, 4)


@pytest.mark.parametrize("head", ["linear", "transformer"])
@pytest.mark.parametrize("out_chans", [1, 3])
def test_mim_model_shapes(head, out_chans):
    model = make_mim(mim_cfg(head=head, out_chans=out_chans))
    assert isinstance(model, MaskedImageModel)
    assert isinstance(model.head, LinearPixelHead if head == "linear" else TransformerPixelHead)
    mask = jnp.asarray(np.array([[True, False] * 3, [False, True] * 3]))
    out = fwd(model, images_for(2, 1), mask)
    assert out.shape == (2, 6, PATCH * PATCH * out_chans)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def test_linear_head_is_linear_map_of_patch_tokens():
    model = make_mim(mim_cfg(head="linear"), seed=10)
    params = params_of(model)
    images = jnp.asarray(images_for(2, 1))
    tokens = fwd(model.encoder, images).astype(np.float64)
    expected = ref_linear(tokens[:, 1:], params["head"]["proj"])
    np.testing.assert_allclose(fwd(model, images), expected, atol=1e-4)


def test_create_mim_model_rejects_bad_config():
    with pytest.raises(ValueError, match="head"):
        create_mim_model(mim_cfg(head="conv"), IMAGE, nnx.Rngs(0))
    with pytest.raises(ValueError, match="size"):
        create_mim_model(mim_cfg(size="gigantic"), IMAGE, nnx.Rngs(0))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(width=30, num_heads=4), "divisible"),
        (dict(image_size=(32, 40)), "multiple of patch_size"),
        (dict(image_size=(20, 32)), "multiple of patch_size"),
        (dict(variant="swin"), "variant"),
        (dict(rel_pos="global"), "rel_pos"),
        (dict(attention="flash"), "attention"),
        (dict(norm="apex"), "norm must be one of"),
    ],
)
def test_invalid_encoder_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make_vit(**kw)


# ----------------------------------------------------------------------------------------
# 9. Attention implementation
# ----------------------------------------------------------------------------------------


def test_auto_attention_is_xla_without_a_gpu():
    assert jax.default_backend() == "cpu"
    assert resolve_attention("auto", jnp.bfloat16) == "xla"
    assert resolve_attention("xla", jnp.float32) == "xla"
    assert resolve_attention("cudnn", jnp.bfloat16) == "cudnn"  # asked for: kept, fails later


def test_auto_attention_for_a_named_backend():
    """An ahead-of-time compile for a GPU resolves "auto" for the GPU, not for this CPU."""
    assert resolve_attention("auto", jnp.bfloat16, backend="gpu") == "cudnn"
    assert resolve_attention("auto", jnp.float16, backend="gpu") == "cudnn"
    assert resolve_attention("auto", jnp.float32, backend="gpu") == "xla"  # cuDNN: half only
    assert resolve_attention("auto", jnp.bfloat16, backend="tpu") == "xla"


def test_auto_norm_is_pallas_on_a_gpu_in_half_precision_up_to_the_measured_width(monkeypatch):
    assert resolve_norm("auto", jnp.bfloat16, 768) == "xla"  # this CPU
    assert resolve_norm("auto", jnp.bfloat16, 768, backend="gpu") == "pallas"
    assert resolve_norm("auto", jnp.float16, 1024, backend="gpu") == "pallas"
    assert resolve_norm("auto", jnp.bfloat16, 1280, backend="gpu") == "xla"  # ViT-H: not measured
    assert resolve_norm("auto", jnp.float32, 768, backend="gpu") == "xla"
    assert resolve_norm("auto", jnp.bfloat16, 768, backend="tpu") == "xla"
    assert resolve_norm("pallas", jnp.float32, 1280) == "pallas"  # asked for: kept
    with pytest.raises(ValueError, match=r"norm must be one of \('auto', 'xla', 'pallas'\)"):
        resolve_norm("apex", jnp.bfloat16, 768)
    assert abstract_vit(norm="auto", dtype=jnp.bfloat16).norm_implementation == "xla"
    # as on a GPU: the encoder and each block resolve "auto" themselves
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    encoder = abstract_vit(norm="auto", dtype=jnp.bfloat16)
    assert encoder.norm_implementation == "pallas"
    assert {block.norm_implementation for block in encoder.blocks} == {"pallas"}
    block = nnx.eval_shape(
        lambda: Block(WIDTH, HEADS, variant="beit", norm="auto", dtype=jnp.bfloat16,
                      rngs=nnx.Rngs(0))
    )  # fmt: skip
    assert block.norm_implementation == "pallas"
    assert abstract_vit(norm="auto", dtype=jnp.float32).norm_implementation == "xla"
    # JAX names an AMD GPU's backend "gpu" too: its platform version tells it apart
    rocm = types.SimpleNamespace(client=types.SimpleNamespace(platform_version="rocm 60300"))
    monkeypatch.setattr(jax, "devices", lambda *_: [rocm])
    assert resolve_norm("auto", jnp.bfloat16, 768) == "xla"
    assert resolve_attention("auto", jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match=r"norm must be one of"):
        Block(WIDTH, HEADS, variant="beit", norm="apex", rngs=nnx.Rngs(0))


def test_residual_norm_refuses_an_unresolved_implementation():
    norm = nnx.LayerNorm(8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"must be 'xla' or 'pallas' \(resolved\), got 'auto'"):
        residual_norm(norm, jnp.ones((1, 2, 8)), None, "auto")


@pytest.mark.parametrize("with_bias", [True, False])
def test_padding_for_cudnn_leaves_attention_unchanged(with_bias):
    """cuDNN trains only on even lengths: the padded key must get no weight and the real
    queries the same outputs (checked here with XLA's implementation on both)."""
    kq, kk, kv, kb = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (2, 17, 3, 8)) for key in (kq, kk, kv))
    bias = jax.random.normal(kb, (1, 3, 17, 17)) if with_bias else None
    expected = jax.nn.dot_product_attention(q, k, v, bias=bias)
    padded = _pad_to_even_length(q, k, v, bias)
    assert padded[0].shape == (2, 18, 3, 8) and padded[3].shape[-2:] == (18, 18)
    out = jax.nn.dot_product_attention(*padded)
    np.testing.assert_allclose(out[:, :17], expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_softmax_attention_matches_jax_and_its_autodiff(dtype, with_bias):
    """The heads-major attention with its hand-written backward pass against
    jax.nn.dot_product_attention ([B, T, heads, D] layout, float32) and JAX's own gradients."""
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (2, 3, 7, 4)) for key in keys[:3])  # [B, heads, T, D]
    bias = jax.random.normal(keys[3], (1, 3, 7, 7)) if with_bias else None
    cot = jax.random.normal(keys[4], (2, 3, 7, 4))

    def reference(q, k, v, bias):
        to_btnh = lambda x: x.transpose(0, 2, 1, 3)
        full = None if bias is None else jnp.broadcast_to(bias, (2, 3, 7, 7))
        out = jax.nn.dot_product_attention(
            to_btnh(q), to_btnh(k), to_btnh(v), bias=full, scale=1.0, implementation="xla"
        )
        return to_btnh(out)

    args = (q, k, v, bias)
    cast = [None if a is None else a.astype(dtype) for a in args[:3]] + [bias]
    out, vjp = jax.vjp(softmax_attention, *cast)
    grads = vjp(cot.astype(dtype))
    ref_out, ref_vjp = jax.vjp(reference, *args)
    ref_grads = ref_vjp(cot)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, rtol=tol, atol=tol)
    for name, g, ref in zip("qkvb", grads, ref_grads, strict=True):
        if ref is None:
            assert g is None
            continue
        assert g.shape == ref.shape, name
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(
            np.asarray(g, np.float32), ref, rtol=tol, atol=tol * scale, err_msg=name
        )


@pytest.mark.parametrize(
    "kernels, rel_pos, mesh_shape",
    [
        (dict(attention="pallas"), "shared", (1, 1, 1)),
        (dict(attention="pallas"), "per_block", (1, 2, 2)),
        (dict(mlp="pallas"), "shared", (1, 2, 2)),
        (dict(norm="pallas"), "per_block", (1, 2, 2)),
        (dict(attention="pallas", mlp="pallas", norm="pallas"), "shared", (1, 1, 1)),
    ],
)
def test_pallas_kernels_match_xla_in_the_encoder(kernels, rel_pos, mesh_shape, monkeypatch):
    """The encoder with Pallas kernels (interpreted on the CPU) against the XLA path: tokens
    and every parameter's gradient, the position tables' and layer scales' included, with drop
    path on. On 4 devices (batch split over data x fsdp, 2 images each) the kernels run per
    batch shard (shard_map): the drop-path factors of the LayerNorm kernels are split with the
    batch, and the gradients of what the kernels share (position bias, MLP and LayerNorm
    weights) must be summed over the shards."""
    images = jax.random.normal(jax.random.key(1), (8, *IMAGE, 1))
    cotangent = jax.random.normal(jax.random.key(2), (8, 7, WIDTH))
    devices = np.asarray(jax.devices()[: math.prod(mesh_shape)]).reshape(mesh_shape)
    mesh = Mesh(devices, parallel.MESH_AXES)
    shard_maps = []
    shard_map = jax.shard_map
    monkeypatch.setattr(
        jax, "shard_map", lambda *a, **k: shard_maps.append(k) or shard_map(*a, **k)
    )

    def tokens_and_grads(**options):
        graphdef, params = nnx.split(make_vit(rel_pos=rel_pos, drop_path_rate=0.5, **options))

        def loss(params, images):
            tokens = nnx.merge(graphdef, params)(images, dropout_key=jax.random.key(4))
            return jnp.sum(tokens * cotangent)

        step = parallel.jit_in_mesh(jax.value_and_grad(loss), mesh)
        params = jax.device_put(params, parallel.replicated(mesh))
        with jax.default_matmul_precision("float32"):
            return step(params, jax.device_put(images, parallel.batch_sharding(mesh)))

    loss, grads = tokens_and_grads(**kernels)
    # one per block and Pallas-run layer (two LayerNorms a block, and the final one, which
    # adds the last block's MLP branch)
    calls = sum(dict(attention=1, mlp=1, norm=2)[kind] for kind in kernels)
    final = 1 if "norm" in kernels else 0
    assert len(shard_maps) == (DEPTH * calls + final if mesh.size > 1 else 0)
    ref_loss, ref_grads = tokens_and_grads(attention="xla", mlp="xla", norm="xla")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat, ref_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ref_grads))
    assert any("relative_position_bias_table" in path for path, _ in flat)
    assert any("gamma_2" in path for path, _ in flat)
    for path, grad in flat:
        ref = ref_flat[path][...]
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(grad[...], ref, atol=1e-4 * scale, err_msg=str(path))


@pytest.mark.parametrize(
    "variant, remat, scan, mlp",
    [
        ("vit", "none", False, "pallas"),
        ("beit", "full", False, "pallas"),
        ("beit", "none", True, "pallas"),
        ("beit", "dots", False, "pallas_backward"),
    ],
)
def test_pallas_kernels_match_xla_in_every_way_the_encoder_runs(variant, remat, scan, mlp):
    """All three Pallas kernels against the XLA path through each way the encoder runs its
    blocks: each block's MLP add left to the next block's first norm (no remat), kept inside
    the block (remat: all of it recomputed, or all but the matmuls), a scan (intermediates run
    the loop); the normed tokens, the last block's output before the final norm, and an
    intermediate block's output. ``vit``: the qkv projection's own bias and no position bias.
    ``pallas_backward``: XLA's MLP forward pass with the Pallas backward kernel."""
    images = jax.random.normal(jax.random.key(1), (4, *IMAGE, 1))
    cotangents = jax.random.normal(jax.random.key(2), (3, 4, 7, WIDTH))

    def loss_and_grads(**options):
        model = make_vit(variant=variant, remat=remat, scan=scan, drop_path_rate=0.5, **options)

        def loss(model):
            key = jax.random.key(4)
            outputs = (
                model(images, dropout_key=key),
                model(images, dropout_key=key, final_norm=False),
                *model.intermediates(images, [0], dropout_key=key),
            )
            return sum(jnp.sum(out * c) for out, c in zip(outputs, cotangents, strict=True))

        with jax.default_matmul_precision("float32"):
            return nnx.value_and_grad(loss)(model)

    loss, grads = loss_and_grads(attention="pallas", mlp=mlp, norm="pallas")
    ref_loss, ref_grads = loss_and_grads(attention="xla", mlp="xla", norm="xla")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    ref_flat = dict(nnx.to_flat_state(ref_grads))
    for path, grad in nnx.to_flat_state(grads):
        ref = ref_flat[path][...]
        scale = float(jnp.abs(ref).max())
        assert scale > 0 or path == ("mask_token",), path  # no mask here
        np.testing.assert_allclose(grad[...], ref, atol=1e-4 * scale, err_msg=str(path))


def test_softmax_attention_rejects_a_per_example_bias():
    q = jnp.zeros((2, 3, 5, 4))
    with pytest.raises(ValueError, match=r"bias must be \[1, heads, T, T\]"):
        softmax_attention(q, q, q, jnp.zeros((2, 3, 5, 5)))
