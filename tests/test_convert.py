"""Conversion to and from PyTorch, checked against timm's own models.

Each parity test builds our encoder with random weights (every parameter, position tables and
layer scales included, far from their initial values), converts it, loads the result into the
timm model named by the card with ``strict=True`` and compares every output token on random
gray images: max abs difference < 1e-4 in float32.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import subprocess
import sys
import warnings
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_tiny_config
from etils import epath
from flax import nnx

from usfm_jax import train
from usfm_jax.checkpoint import CheckpointError
from usfm_jax.convert import (
    Architecture,
    ConversionError,
    Normalization,
    files,
    import_torch_weights,
    read_torch_weights,
    torch_to_export,
)
from usfm_jax.convert.adapt import (
    PRESETS,
    _geometric_positions,
    adapt_encoder,
    fold_patch_embedding,
    resample_pos_embed,
    resample_rel_pos_table,
)
from usfm_jax.convert.cards import build_timm_model, make_card, timm_spec
from usfm_jax.convert.files import (
    read_state_dict,
    write_card,
    write_state_dict,
    write_weights_and_card,
)
from usfm_jax.convert.formats import (
    BLOCK_TABLE,
    SHARED_TABLE,
    flatten,
    from_torch,
    heads_for,
    to_torch,
    unflatten,
)
from usfm_jax.export import load_params
from usfm_jax.pretrained import build_encoder, load_pretrained

TOL = 1e-4
OURS = Normalization((0.5,), (0.25,))
SIZES = {"tiny": (192, 12, 3), "base": (768, 12, 12)}


def _arch(variant="beit", size="tiny", rel_pos="shared", in_chans=3, image=224) -> Architecture:
    width, depth, heads = SIZES.get(size, size)
    return Architecture(
        variant=variant,
        width=width,
        depth=depth,
        num_heads=heads,
        patch_size=16,
        in_chans=in_chans,
        image_size=(image, image),
        rel_pos=rel_pos,
    )


def _random_params(arch: Architecture, seed: int = 0) -> dict:
    """Every parameter random: LayerNorm scales around 1, the rest around 0 (tables larger, so
    that the attention bias matters)."""
    rng = np.random.default_rng(seed)
    shapes = arch.param_shapes()
    flat = {}
    for name, shape in shapes.items():
        scale = 0.5 if "relative_position" in name else 0.05
        value = rng.normal(0.0, scale, shape)
        flat[name] = (1.0 + value if name.endswith(".scale") else value).astype(np.float32)
    return unflatten(flat)


def _gray(batch: int, image: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (batch, image, image, 1)).astype(np.float32)


def _flax_tokens(arch: Architecture, params: dict, gray: np.ndarray, norm: Normalization):
    model = build_encoder(arch, params, attention="xla")
    x = (gray - norm.mean[0]) / norm.std[0]  # our models take one mean / std
    return np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(x)))


def _torch_tokens(model: torch.nn.Module, gray: np.ndarray, norm: Normalization) -> np.ndarray:
    """timm's tokens after the final norm for gray images, replicated and normalised per
    channel as the card says."""
    chans = model.patch_embed.proj.weight.shape[1]
    norm = norm.for_channels(chans)
    x = (np.repeat(gray, chans, -1) - np.asarray(norm.mean)) / np.asarray(norm.std)
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2)).float()).numpy()


def _load_timm(state: dict, arch: Architecture, fmt: str) -> torch.nn.Module:
    model = build_timm_model({"timm": timm_spec(arch, fmt)}).eval()
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    return model  # load_state_dict is strict by default: any missing / unexpected key raises


def _assert_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    err = float(np.max(np.abs(a - b)))
    assert err < TOL, f"max abs difference {err:.2e}"


# ----------------------------------------------------------------------------------------
# 1. Flax -> timm: strict load and the same tokens
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["tiny", "base"])
@pytest.mark.parametrize(
    ("variant", "fmt", "rel_pos"),
    [
        ("beit", "timm-beit", "shared"),
        ("beit", "timm-beit", "per_block"),
        ("beit", "usfm", "shared"),
        ("vit", "timm-vit", "shared"),
    ],
)
def test_converted_weights_load_strictly_into_timm_and_match(variant, fmt, rel_pos, size):
    arch = _arch(variant, size, rel_pos)
    params = _random_params(arch)
    state, dropped = to_torch(params, arch, fmt)
    gray = _gray(2, 224)
    expected = _flax_tokens(arch, params, gray, OURS)
    if fmt == "usfm":  # the released layout: one shared table plus mask_token
        assert SHARED_TABLE in state and "mask_token" in state and dropped == []
        assert not any(k.endswith("qkv.bias") or k == "pos_embed" for k in state)
        # timm's shared-table Beit, after the documented remap: drop mask_token
        shared = dict(state)
        shared.pop("mask_token")
        _assert_close(_torch_tokens(_load_timm(shared, arch, fmt), gray, OURS), expected)
        # timm's per-block Beit, after copying the shared table into every block
        per_block = {k: v for k, v in shared.items() if k != SHARED_TABLE}
        per_block.update({BLOCK_TABLE.format(i): state[SHARED_TABLE] for i in range(arch.depth)})
        model = _load_timm(per_block, arch, "timm-beit")
    else:
        assert dropped == ["mask_token"]
        model = _load_timm(state, arch, fmt)
    _assert_close(_torch_tokens(model, gray, OURS), expected)


def test_parity_would_catch_a_wrong_map():
    """The comparison is sensitive: swapping q and v biases, or not transposing one kernel,
    breaks it."""
    arch = _arch("beit", (64, 2, 2), image=64)
    params = _random_params(arch)
    gray = _gray(2, 64)
    expected = _flax_tokens(arch, params, gray, OURS)
    state, _ = to_torch(params, arch, "timm-beit")
    swapped = dict(state)
    swapped["blocks.1.attn.q_bias"], swapped["blocks.1.attn.v_bias"] = (
        state["blocks.1.attn.v_bias"],
        state["blocks.1.attn.q_bias"],
    )
    fc1 = "blocks.0.mlp.fc1.weight"
    for broken in (swapped, {**state, fc1: -state[fc1]}):
        tokens = _torch_tokens(_load_timm(broken, arch, "timm-beit"), gray, OURS)
        assert np.max(np.abs(tokens - expected)) > 10 * TOL


# ----------------------------------------------------------------------------------------
# 2. Round trips
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize(
    ("variant", "fmt", "rel_pos"),
    [
        ("beit", "usfm", "shared"),
        ("beit", "timm-beit", "shared"),
        ("beit", "timm-beit", "per_block"),
        ("vit", "timm-vit", "shared"),
    ],
)
def test_round_trip_through_a_file_is_bit_exact(tmp_path, variant, fmt, rel_pos, suffix):
    arch = _arch(variant, (64, 3, 2), rel_pos, image=64)
    params = _random_params(arch)
    state, dropped = to_torch(params, arch, fmt)
    path = tmp_path / f"weights{suffix}"
    write_state_dict(state, path)
    back, back_arch, _ = from_torch(read_state_dict(path), fmt, num_heads=2)
    assert back_arch == arch  # a shared table comes back shared, per-block ones per block
    original, returned = flatten(params), flatten(back["encoder"])
    assert set(returned) == set(original)
    for name, value in original.items():
        if name in dropped:  # not in that format: initialised, and said so
            assert not returned[name].any()
            continue
        assert returned[name].dtype == value.dtype and np.array_equal(returned[name], value), name


def _cli(args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "usfm_jax.convert", *args.split()],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_checkpoint_round_trip_through_the_cli(tmp_path):
    """A real training checkpoint -> usfm .safetensors -> export -> the same parameters."""
    config = make_tiny_config(**{"log_every": 1, "image_every": 0, "checkpoint.every": 2})
    config.total_steps = 3
    train.train(config, str(tmp_path / "run"), stop_after=2)
    out = tmp_path / "usfm.safetensors"
    done = _cli(f"to-torch --checkpoint {tmp_path / 'run'} --format usfm --in-chans 1 --out {out}")
    assert done.returncode == 1 and done.stderr == (
        "error: --in-chans 1: the normalisation usfm defaults to (imagenet's) has 3 channels; "
        "pass --normalization for 1 channel(s), e.g. 0.5/0.25\n"
    )
    done = _cli(
        f"to-torch --checkpoint {tmp_path / 'run'} --format usfm --normalization 0.5/0.25 "
        f"--in-chans 1 --out {out}"
    )
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "head.* (not the encoder's)" in done.stdout
    card = json.loads((tmp_path / "usfm.json").read_text())
    assert card["format"] == "usfm" and card["source"]["step"] == 2
    assert card["normalization"] == {"mean": [0.5], "std": [0.25]}
    done = _cli(f"from-torch --weights {out} --format usfm --out {tmp_path / 'back'}")
    assert done.returncode == 0, done.stderr
    original, back = load_params(str(tmp_path / "run")), load_params(str(tmp_path / "back"))
    assert back.step == 2 and back.config["normalization"] == {"mean": 0.5, "std": 0.25}
    a, b = flatten(original.params["encoder"]), flatten(back.params["encoder"])
    assert set(a) == set(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    # and the converted checkpoint builds the same encoder as the training config does
    arch = Architecture.from_json(card["architecture"])
    assert arch == Architecture.from_config(back.config["model"], back.config["image_size"])


# ----------------------------------------------------------------------------------------
# 3. Other image sizes, channel counts and normalisations
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "fmt"), [("beit", "timm-beit"), ("vit", "timm-vit")])
def test_a_224_model_exported_for_512_matches_timm_at_512(variant, fmt):
    arch = _arch(variant, "base" if variant == "beit" else "tiny")
    params, arch512, notes = adapt_encoder(
        _random_params(arch), arch, source=OURS, image_size=(512, 512)
    )
    assert arch512.image_size == (512, 512) and "resampled" in notes[0]
    state, _ = to_torch(params, arch512, fmt)
    model = _load_timm(state, arch512, fmt)
    gray = _gray(1, 512)
    _assert_close(_torch_tokens(model, gray, OURS), _flax_tokens(arch512, params, gray, OURS))


@pytest.mark.parametrize("new_grid", [(32, 32), (8, 8), (20, 12)])
def test_absolute_embeddings_are_resampled_as_timm_does(new_grid):
    from timm.layers import resample_abs_pos_embed

    embed = np.random.default_rng(0).normal(0, 1, (1, 1 + 14 * 14, 16)).astype(np.float32)
    want = resample_abs_pos_embed(torch.from_numpy(embed), list(new_grid), [14, 14])
    got = resample_pos_embed(embed, (14, 14), new_grid)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_relative_tables_are_resampled_as_beit_does():
    """BEiT's geometric interpolation, against timm's implementation of it: timm places the
    old offsets as BEiT does but interpolates linearly between them (BEiT and usfm_jax with a
    bicubic spline), so a table linear in those places comes out of both as the same plane.
    Offsets 0 and +-1 and the three cls rows keep their values; cubics are reproduced; a
    smaller grid gets the central crop."""
    from timm.layers.pos_embed_rel import resize_rel_pos_bias_table

    grid, new = (14, 14), (32, 32)  # 224 -> 512 px at patch 16
    ys = _geometric_positions(14, 32)  # where the 27 old offsets sit among the 63 new ones
    plane = np.stack([0.3 + 0.2 * ys[:, None] - 0.1 * ys[None, :], 0.05 * ys[:, None] + 0 * ys])
    table = np.concatenate([plane.reshape(2, -1).T, [[7.0, 8.0], [9.0, 10.0], [11.0, 12.0]]])
    table = table.astype(np.float32)
    offsets = np.arange(-31, 32.0)
    want = np.stack([0.3 + 0.2 * offsets[:, None] - 0.1 * offsets[None, :],
                     0.05 * offsets[:, None] + 0 * offsets])  # fmt: skip
    want = np.concatenate([want.reshape(2, -1).T, table[-3:]])
    with warnings.catch_warnings():  # timm's interpolator warns of its own indexing
        warnings.simplefilter("ignore", UserWarning)
        theirs = resize_rel_pos_bias_table(torch.from_numpy(table), new, want.shape).numpy()
    ours = resample_rel_pos_table(table, grid, new)
    np.testing.assert_allclose(theirs, want, atol=1e-4)  # timm places the offsets where we do
    np.testing.assert_allclose(ours, want, atol=1e-4)

    rng = np.random.default_rng(0)
    table = rng.normal(0.0, 1.0, (27 * 27 + 3, 2)).astype(np.float32)
    out = resample_rel_pos_table(table, grid, new)
    old, got = table[:-3].reshape(27, 27, 2), out[:-3].reshape(63, 63, 2)
    np.testing.assert_allclose(got[30:33, 30:33], old[12:15, 12:15], atol=1e-5)
    np.testing.assert_array_equal(out[-3:], table[-3:])
    crop = resample_rel_pos_table(table, grid, (8, 8))[:-3].reshape(15, 15, 2)
    np.testing.assert_allclose(crop, old[6:21, 6:21], atol=1e-5)
    small = table[: 3 * 5 + 3]  # a 2 x 3 grid (3 x 5 offsets) to 4 x 3: the nearest offset's
    grown = resample_rel_pos_table(small, (2, 3), (4, 3))[:-3].reshape(7, 5, 2)
    np.testing.assert_allclose(grown[2:5], small[:-3].reshape(3, 5, 2), atol=1e-5)
    np.testing.assert_allclose(grown[:2], np.repeat(grown[2:3], 2, axis=0), atol=1e-5)

    cubic = (ys**3 - 4 * ys)[:, None] * (0.5 * ys**2 + ys)[None, :] / 1e4
    table = np.concatenate([cubic.reshape(-1, 1), np.zeros((3, 1))]).astype(np.float64)
    got = resample_rel_pos_table(table, grid, new)[:-3].reshape(63, 63)
    want = (offsets**3 - 4 * offsets)[:, None] * (0.5 * offsets**2 + offsets)[None, :] / 1e4
    np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize(
    ("src_chans", "dst_chans", "target"),
    [(3, 1, None), (1, 3, None), (3, 3, "imagenet"), (1, 3, "imagenet"), (3, 1, "inception")],
)
def test_channel_folding_is_exact_for_gray_images(src_chans, dst_chans, target):
    arch = _arch("beit", "tiny", in_chans=src_chans)
    params = _random_params(arch)
    target_norm = PRESETS[target] if target else OURS
    folded, new, notes = adapt_encoder(
        params, arch, source=OURS, target=target_norm, in_chans=dst_chans
    )
    assert new.in_chans == dst_chans and "exact for gray" in notes[0]
    state, _ = to_torch(folded, new, "timm-beit")
    gray = _gray(2, 224)
    tokens = _torch_tokens(_load_timm(state, new, "timm-beit"), gray, target_norm)
    _assert_close(tokens, _flax_tokens(arch, params, gray, OURS))


def test_fold_patch_embedding_against_a_numpy_convolution():
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(4, 4, 3, 5)), rng.normal(size=5)
    src, dst = PRESETS["imagenet"], Normalization((0.3,), (0.2,))
    gray = rng.uniform(size=(4, 4))  # one patch

    def embed(k, b, norm):
        c = k.shape[2]
        norm = norm.for_channels(c)
        x = (gray[..., None] - np.asarray(norm.mean)) / np.asarray(norm.std)  # [4, 4, C]
        return np.einsum("hwc,hwcd->d", x, k) + b

    new_kernel, new_bias = fold_patch_embedding(kernel, bias, src, dst, 1)
    assert new_kernel.shape == (4, 4, 1, 5)
    np.testing.assert_allclose(embed(new_kernel, new_bias, dst), embed(kernel, bias, src))


# ----------------------------------------------------------------------------------------
# 4. BiomedCLIP's visual trunk (open_clip) -> our plain ViT
# ----------------------------------------------------------------------------------------


def _open_clip_file(tmp_path, arch: Architecture) -> tuple:
    """An open_clip checkpoint's layout: a timm ViT under visual.trunk., the projection, and a
    text tower that the conversion must ignore."""
    torch.manual_seed(0)
    trunk = build_timm_model({"timm": timm_spec(arch, "timm-vit")}).eval()
    with torch.no_grad():
        for p in trunk.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    sd["visual.head.proj.weight"] = torch.randn(32, arch.width)
    sd["text.transformer.embeddings.word_embeddings.weight"] = torch.randn(10, 16)
    sd["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(sd, path)
    return path, trunk, sd


def test_open_clip_visual_trunk_imports_and_matches_timm(tmp_path):
    arch = _arch("vit", (192, 2, 3))
    path, trunk, sd = _open_clip_file(tmp_path, arch)
    imported = import_torch_weights(path, "open-clip-visual")
    assert imported.arch == arch and imported.format == "open-clip-visual"
    assert any("ignored 2 keys" in n for n in imported.notes)
    np.testing.assert_array_equal(
        imported.params["projection"]["kernel"], sd["visual.head.proj.weight"].numpy().T
    )
    # CLIP's normalisation (3 different means) is re-expressed for one gray mean / std
    assert imported.normalization == Normalization((0.5,), (0.25,))
    gray = _gray(2, 224)
    tokens = _flax_tokens(arch, imported.params["encoder"], gray, imported.normalization)
    _assert_close(tokens, _torch_tokens(trunk, gray, PRESETS["clip"]))
    # a projection with a bias (open_clip's proj_bias=True) would lose it: refused, named
    torch.save({**sd, "visual.head.proj.bias": torch.randn(32)}, tmp_path / "biased.bin")
    with pytest.raises(ConversionError, match=r"neither its trunk nor .*\(visual\.head\.proj\.b"):
        import_torch_weights(tmp_path / "biased.bin", "open-clip-visual")


# ----------------------------------------------------------------------------------------
# 5. load_pretrained: feature extraction without heads
# ----------------------------------------------------------------------------------------


def test_load_pretrained_from_a_hub_directory_export_and_file(tmp_path, caplog):
    arch = _arch("beit", (64, 2, 2), image=64)
    params = _random_params(arch)
    state, _ = to_torch(params, arch, "usfm")
    hub = tmp_path / "hub"
    hub.mkdir()
    write_state_dict(state, hub / "model.safetensors")
    (hub / "config.json").write_text(
        json.dumps({"architecture": "beit", "pretrained_cfg": OURS.for_channels(3).to_json()})
    )
    gray = _gray(2, 64)
    expected = _flax_tokens(arch, params, gray, OURS)
    from_hub = load_pretrained(str(hub))
    assert from_hub.normalization == OURS
    x = (gray - 0.5) / 0.25
    _assert_close(np.asarray(from_hub(jnp.asarray(x))), expected)

    weights = str(hub / "model.safetensors")
    torch_to_export(weights, "usfm", str(tmp_path / "export"), input_normalization=OURS)
    from_export = load_pretrained(str(tmp_path / "export"))
    _assert_close(np.asarray(from_export(jnp.asarray(x))), expected)

    with caplog.at_level(logging.INFO, logger="absl"):  # what was not a copy is said
        at_128 = load_pretrained(str(hub), image_size=128)  # resampled tables
        load_pretrained(str(tmp_path / "export"), image_size=128)
    resampled = [
        r.getMessage()
        for r in caplog.records
        if "tables resampled (BEiT's geometric" in r.getMessage()
    ]
    assert len(resampled) == 2 and resampled[0].startswith(f"{hub}: position tables resampled")
    assert at_128(jnp.zeros((1, 128, 128, 1))).shape == (1, 1 + 64, 64)
    imported = import_torch_weights(weights, "usfm", image_size=128)  # an int, as above
    assert imported.arch.image_size == (128, 128)
    for size in ((128, -32), 0, 128.0):
        with pytest.raises(ConversionError, match=r"image size .*: expected a positive int or"):
            load_pretrained(str(hub), image_size=size)
    (hub / "config.json").write_text('{"pretrained_cfg": ')  # cut short
    with pytest.raises(ConversionError, match=r"hub/config\.json: not a JSON config \(Expecting"):
        load_pretrained(str(hub))


def test_gray_weights_without_a_card_need_their_normalization(tmp_path):
    arch = _arch("beit", (64, 2, 2), image=64, in_chans=1)
    params = _random_params(arch)
    state, _ = to_torch(params, arch, "timm-beit")
    write_state_dict(state, tmp_path / "gray.safetensors")  # no card: ImageNet's is assumed
    weights = str(tmp_path / "gray.safetensors")
    with pytest.raises(ConversionError, match=r"take 1 channel\(s\), but the input normali"):
        load_pretrained(weights)
    model = load_pretrained(weights, input_normalization="0.5/0.25")
    assert model.normalization == OURS
    gray = _gray(2, 64)
    _assert_close(np.asarray(model(jnp.asarray((gray - 0.5) / 0.25))),
                  _flax_tokens(arch, params, gray, OURS))  # fmt: skip


def test_load_pretrained_rejects_arguments_that_do_not_apply(tmp_path):
    vit = _arch("vit", (64, 2, 2), image=64)
    params = _random_params(vit)
    state, _ = to_torch(params, vit, "timm-vit")
    write_state_dict(state, tmp_path / "vit.safetensors")  # no card: heads unknown
    weights = str(tmp_path / "vit.safetensors")
    with pytest.raises(ConversionError, match="does not say its number of heads"):
        load_pretrained(weights)
    model = load_pretrained(weights, num_heads=2)  # passed through to the converter
    assert model(jnp.zeros((1, 64, 64, 3))).shape == (1, 17, 64)
    with pytest.raises(ConversionError, match="step and weights pick from a usfm_jax checkpoint"):
        load_pretrained(weights, num_heads=2, step=3)
    torch_to_export(weights, "timm-vit", str(tmp_path / "export"), num_heads=2)
    with pytest.raises(
        ConversionError, match="fmt, num_heads and input_normalization describe PyTorch"
    ):
        load_pretrained(str(tmp_path / "export"), fmt="usfm")
    with pytest.raises(ValueError, match=r"dtype='bf16': expected one of \['float32', 'bfloat16'"):
        load_pretrained(str(tmp_path / "export"), dtype="bf16")
    with pytest.raises(CheckpointError, match=r"vit\.safetensors is a file: expected a workdir"):
        load_params(weights)


# ----------------------------------------------------------------------------------------
# 6. Wrong inputs: clear errors naming the problem
# ----------------------------------------------------------------------------------------


def test_a_number_of_heads_that_cannot_be_right_is_refused():
    vit = _arch("vit", (64, 2, 2), image=64)
    vit_state, _ = to_torch(_random_params(vit), vit, "timm-vit")
    for heads in (3, 0, -4):  # not dividing the width 64: the q / k / v reshape would fail
        with pytest.raises(ConversionError, match=f"num_heads={heads}: expected a positive divis"):
            from_torch(vit_state, "timm-vit", num_heads=heads)
    beit = _arch("beit", (64, 2, 2), image=64)
    beit_state, _ = to_torch(_random_params(beit), beit, "usfm")
    assert from_torch(beit_state, "usfm", num_heads=2)[1] == beit
    with pytest.raises(ConversionError, match=r"num_heads=4, but .*bias_table is for 2 heads"):
        from_torch(beit_state, "usfm", num_heads=4)  # the table says how many
    card = {"architecture": {"num_heads": 2}}
    assert heads_for(None, card, "w") == 2 and heads_for(2, card, "w") == 2
    assert heads_for(None, {}, "w") is None and heads_for(8, {}, "w") == 8
    with pytest.raises(ConversionError, match="w: num_heads=8, but its card says 2"):
        heads_for(8, card, "w")  # a silent override would give wrong features


def test_what_the_shapes_cannot_tell_is_noted_and_can_be_given(tmp_path):
    """A plain ViT of width 192 with 6 heads (the standard is 3), made for 64x256 images (4x16
    patches: as many positions as 8x8), without a card: both guesses are said, and the CLI's
    --num-heads / --source-image-size give features equal to timm's."""
    arch = _arch("vit", (192, 1, 6)).replace(image_size=(64, 256))
    params = _random_params(arch)
    state, _ = to_torch(params, arch, "timm-vit")
    write_state_dict(state, tmp_path / "vit.safetensors")
    guessed = read_torch_weights(tmp_path / "vit.safetensors", normalization=OURS)
    assert guessed.arch.num_heads == 3 and guessed.arch.image_size == (128, 128)
    assert guessed.notes[:2] == [
        "num_heads=3 assumed (the standard for width 192); if the weights were trained with "
        "another, pass it (convert: --num-heads)",
        "a square grid of 8x8 patches assumed (128x128 images); if the weights were made for "
        "another shape, pass it (convert: --source-image-size HxW)",
    ]
    done = _cli(
        f"from-torch --weights {tmp_path / 'vit.safetensors'} --num-heads 6 "
        f"--source-image-size 64x256 --input-normalization 0.5/0.25 --out {tmp_path / 'export'}"
    )
    assert done.returncode == 0, done.stderr
    assert "assumed" not in done.stdout, done.stdout
    model = load_pretrained(str(tmp_path / "export"))
    gray = np.random.default_rng(1).uniform(0, 1, (2, 64, 256, 1)).astype(np.float32)
    tokens = np.asarray(model(jnp.asarray((gray - 0.5) / 0.25)))
    _assert_close(tokens, _torch_tokens(_load_timm(state, arch, "timm-vit"), gray, OURS))
    (tmp_path / "vit.json").write_text('{"architecture": {"image_size": [64, 256]}}')
    with pytest.raises(ConversionError, match=r"source image size \(64, 64\), but its card says"):
        read_torch_weights(tmp_path / "vit.safetensors", source_image_size=(64, 64))


def test_wrong_architecture_errors_name_the_first_mismatching_key(tmp_path):
    beit = _arch("beit", (64, 2, 2), image=64)
    vit = _arch("vit", (64, 2, 2), image=64)
    with pytest.raises(ConversionError, match=r"timm-vit holds the plain ViT.*'beit'"):
        to_torch(_random_params(beit), beit, "timm-vit")
    per_block = beit.replace(rel_pos="per_block")
    with pytest.raises(ConversionError, match=r"one per block.*use timm-beit"):
        to_torch(_random_params(per_block), per_block, "usfm")
    vit_state, _ = to_torch(_random_params(vit), vit, "timm-vit")
    with pytest.raises(
        ConversionError,
        match=r"not a timm-beit state dict: no key 'blocks.0.attn.relative_position_bias_table'"
        r"; it looks like timm-vit",
    ):
        from_torch(vit_state, "timm-beit")
    beit_state, _ = to_torch(_random_params(beit), beit, "usfm")
    narrow = {**beit_state, "blocks.1.mlp.fc1.weight": np.zeros((100, 64), np.float32)}
    with pytest.raises(ConversionError, match=r"'blocks.1.mlp.fc1.weight' has shape \(100, 64\)"):
        from_torch(narrow, "usfm")
    with pytest.raises(ConversionError, match=r"lacks 'blocks.1.attn.q_bias'"):
        from_torch({k: v for k, v in beit_state.items() if k != "blocks.1.attn.q_bias"}, "usfm")
    with pytest.raises(ConversionError, match=r"unexpected key 'neck.weight'"):
        from_torch({**beit_state, "neck.weight": np.zeros((2, 64), np.float32)}, "usfm")
    # a checkpoint of another width than its config says
    wrong = _random_params(beit)
    wrong["norm"]["scale"] = np.ones(65, np.float32)
    with pytest.raises(ConversionError, match=r"'norm.scale' has shape \(65,\), expected \(64,\)"):
        to_torch(wrong, beit, "usfm")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([1, 2, 3], "not a state dict: it holds a list"),
        ({"epoch": 3, "optimizer": {"lr": 0.1}}, "not a state dict: a dict of 2 entries"),
        (b"not a pickle", "cannot read .* as PyTorch weights"),
        (
            {"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)},
            r"holds Python objects besides tensors \(Unsupported global: GLOBAL argparse\.Names",
        ),
    ],
)
def test_files_that_are_not_state_dicts_are_named(tmp_path, content, match):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ConversionError, match=match) as error:
        read_state_dict(path)
    assert "weights_only" not in str(error.value)  # never the advice to run the file's code


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_half_precision_weights_are_read_as_float32(tmp_path, dtype, suffix):
    """Releases saved in fp16 or bf16 come as float32 (what training updates: fp16 parameters
    overflow in the first steps), bf16 safetensors included (numpy has no bf16); integer
    buffers keep their dtype."""
    from safetensors.torch import save_file

    weights = {"w": torch.randn(3, 5).to(dtype), "index": torch.arange(4)}
    path = tmp_path / f"half{suffix}"
    if suffix == ".safetensors":
        save_file(weights, path)
    else:
        torch.save(weights, path)
    got = read_state_dict(path)
    assert got["w"].dtype == np.float32 and got["index"].dtype == np.int64
    np.testing.assert_array_equal(got["w"], weights["w"].float().numpy())
    np.testing.assert_array_equal(got["index"], np.arange(4))


def test_timm_classification_checkpoints_import_without_their_head(tmp_path):
    """timm's own ImageNet checkpoints: the head is dropped and said; a plain ViT gives
    timm's tokens; a mean-pooling Beit (fc_norm, no per-token norm) gives timm's blocks, and
    its fc_norm becomes the final norm."""
    import timm

    gray = _gray(2, 32)
    kw = dict(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=5)
    vit = timm.models.vision_transformer.VisionTransformer(**kw, global_pool="token").eval()
    beit = timm.models.beit.Beit(
        **kw, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1
    ).eval()
    with torch.no_grad():  # LayerNorms away from the identity, so that a swap would show
        for model in (vit, beit):
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    for name, model in (("vit", vit), ("beit", beit)):
        path = tmp_path / f"{name}.pth"
        torch.save(model.state_dict(), path)
        imported = import_torch_weights(path, num_heads=2, input_normalization=OURS)
        assert any("ignored the classification head (head.bias, head.weight)" in note
                   for note in imported.notes)  # fmt: skip
        encoder = build_encoder(imported.arch, imported.params["encoder"], attention="xla")
        x = jnp.asarray((gray - 0.5) / 0.25)
        if name == "vit":
            _assert_close(np.asarray(encoder(x)), _torch_tokens(model, gray, OURS))
            continue
        assert any(note.startswith("fc_norm (in timm") for note in imported.notes)
        _assert_close(np.asarray(encoder(x, final_norm=False)), _torch_tokens(model, gray, OURS))
        norm = imported.params["encoder"]["norm"]
        np.testing.assert_array_equal(norm["scale"], model.fc_norm.weight.detach().numpy())
        np.testing.assert_array_equal(norm["bias"], model.fc_norm.bias.detach().numpy())


def test_saved_position_index_buffers_are_checked_and_dropped():
    """BEiT's and SimMIM's models save their relative_position_index (timm's do not): a file
    with timm's own index (a non-square grid) imports with a note and gives timm's tokens; an
    index that orders the tokens otherwise is refused, not silently misread."""
    import timm

    beit = timm.models.beit.Beit(
        img_size=(32, 48), patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0,
        use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, global_pool="token",
    ).eval()  # fmt: skip
    with torch.no_grad():
        for block in beit.blocks:
            block.attn.relative_position_bias_table.normal_(0.0, 0.5)
    sd = {k: v.numpy() for k, v in beit.state_dict().items()}
    for i, block in enumerate(beit.blocks):
        sd[f"blocks.{i}.attn.relative_position_index"] = (
            block.attn.relative_position_index.numpy().astype(np.int64)
        )
    params, arch, notes = from_torch(sd, "timm-beit", image_size=(32, 48))
    assert "ignored 2 relative_position_index buffers (the index usfm_jax computes)" in notes
    encoder = build_encoder(arch, params["encoder"], attention="xla")
    gray = np.random.default_rng(3).uniform(0, 1, (2, 32, 48, 1)).astype(np.float32)
    x = torch.from_numpy(np.repeat((gray - 0.5) / 0.25, 3, -1).transpose(0, 3, 1, 2))
    with torch.no_grad():
        want = beit.forward_features(x).numpy()
    _assert_close(np.asarray(encoder(jnp.asarray((gray - 0.5) / 0.25))), want)
    index = sd["blocks.1.attn.relative_position_index"]
    sd["blocks.1.attn.relative_position_index"] = index.T.copy()  # another token order
    with pytest.raises(ConversionError, match=r"blocks\.1\.attn\.relative_position_index \(sh"):
        from_torch(sd, "timm-beit", image_size=(32, 48))


def test_urfm_mae_file_imports_its_encoder(tmp_path):
    """URFM's released files: an MAE (encoder + decoder) under 'ema_state_dict', the keys
    prefixed 'module.'; the encoder alone is a timm ViT."""
    arch = _arch("vit", (64, 2, 2), image=64)
    params = _random_params(arch)
    state, _ = to_torch(params, arch, "timm-vit")
    mae = {f"module.{k}": torch.from_numpy(v) for k, v in state.items()}
    mae["module.mask_token"] = torch.zeros(1, 1, 48)  # the decoder's
    mae["module.decoder_embed.weight"] = torch.zeros(48, 64)
    mae["module.decoder_blocks.0.norm1.weight"] = torch.ones(48)
    path = tmp_path / "mae_vit_base_patch16_dec768d8b_all_biomedclip_1199.pth"
    torch.save({"epoch": 1199, "ema_state_dict": mae, "optimizer": {"lr": 0.1}}, path)
    assert "cls_token" in read_state_dict(path)
    imported = import_torch_weights(path, "timm-vit", num_heads=2, input_normalization=OURS)
    assert any("ignored 3 MAE decoder keys" in note for note in imported.notes)
    got, want = flatten(imported.params["encoder"]), flatten(params)
    for name in want:
        if name != "mask_token":
            assert np.array_equal(got[name], want[name]), name


def test_a_file_with_raw_and_ema_weights_gives_the_emas_and_says_so(tmp_path):
    """A training script's file with both sets (DeiT / MAE style 'model' and 'model_ema'):
    the EMA weights are the released ones (timm's use_ema=True), whatever the key order."""
    arch = _arch("vit", (64, 2, 2), image=64)
    params = _random_params(arch)
    state, _ = to_torch(params, arch, "timm-vit")
    ema = {k: torch.from_numpy(v) for k, v in state.items()}
    raw = {k: v + 1.0 for k, v in ema.items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": raw, "epoch": 3, "model_ema": ema}, path)
    notes: list[str] = []
    got = read_state_dict(path, notes)
    assert all(np.array_equal(got[k], v.numpy()) for k, v in ema.items())
    assert notes == [
        "the file holds weights under 'model_ema', 'model': read 'model_ema' (the EMA's)"
    ]
    imported = import_torch_weights(path, "timm-vit", num_heads=2, input_normalization=OURS)
    assert notes[0] in imported.notes


def test_cli_errors_are_one_line_and_nothing_is_overwritten(tmp_path):
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    (tmp_path / "taken.json").write_text("{}")  # its card, which taken.pth's would overwrite
    cases = [
        (f"to-torch --checkpoint {tmp_path / 'none'} --format usfm --out {tmp_path / 'x.pth'}",
         "no checkpoint at"),
        (f"to-torch --checkpoint {tmp_path} --format usfm --out {tmp_path / 'taken.safetensors'}",
         "exists; choose another"),
        (f"from-torch --weights {tmp_path / 'missing.pth'} --format usfm --out {tmp_path / 'o'}",
         "no weights file at"),
        (f"to-torch --checkpoint {tmp_path} --format usfm --out {tmp_path / 'x.onnx'}",
         "name it *.safetensors"),
        (f"to-torch --checkpoint {tmp_path} --format usfm --out {tmp_path / 'taken.pth'}",
         f"its card would be {tmp_path / 'taken.json'}, which exists (another file's card?)"),
        (f"to-torch --checkpoint {tmp_path} --format usfm --out {tmp_path}/taken.safetensors/x.pth",
         f"--out {tmp_path}/taken.safetensors/x.pth: {tmp_path}/taken.safetensors is a file, not"),
    ]  # fmt: skip
    for args, message in cases:
        done = _cli(args)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("error: ") and message in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr  # no traceback
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me"
    assert (tmp_path / "taken.json").read_text() == "{}" and not (tmp_path / "taken.pth").exists()
    (tmp_path / "notes.pth").write_text("hello")  # text, not a pickle
    with pytest.raises(ConversionError, match=r"notes\.pth as PyTorch weights: not a PyTorch w"):
        read_state_dict(tmp_path / "notes.pth")


def test_a_failed_write_leaves_neither_file_and_a_damaged_card_is_named(tmp_path, monkeypatch):
    arch = _arch("vit", (64, 2, 2), image=64)
    state, _ = to_torch(_random_params(arch), arch, "timm-vit")
    card = make_card(
        fmt="timm-vit", arch=arch, normalization=OURS, dropped=[], adapted=[], source={}
    )
    with pytest.raises(ConversionError, match=r"cannot write /proc/m\.safetensors: No such"):
        write_weights_and_card(state, card, epath.Path("/proc/m.safetensors"))
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files, "write_card", mock.Mock(side_effect=full))  # the disk fills
    with pytest.raises(ConversionError, match=r"m\.pth: No space left on device"):
        write_weights_and_card(state, card, epath.Path(tmp_path / "m.pth"))
    assert os.listdir(tmp_path) == []  # the weights written before are removed
    monkeypatch.undo()
    write_weights_and_card(state, card, epath.Path(tmp_path / "m.pth"))
    assert read_torch_weights(tmp_path / "m.pth").arch.num_heads == 2  # from the card
    (tmp_path / "m.json").write_text('{"format": "timm-vit",')  # cut short
    with pytest.raises(ConversionError, match=r"cannot read the card .*m\.json of .*m\.pth: "):
        read_torch_weights(tmp_path / "m.pth")


def test_card_says_how_to_load(tmp_path):
    arch = _arch("beit", (64, 2, 2), image=64)
    card = make_card(
        fmt="usfm",
        arch=arch,
        normalization=PRESETS["imagenet"],
        dropped=[],
        adapted=[],
        source={"step": 5},
    )
    write_card(card, tmp_path / "m.safetensors")
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["timm"]["kwargs"]["use_shared_rel_pos_bias"] is True
    assert saved["loaders"]["timm (card's class and kwargs)"]["unexpected"] == ["mask_token"]
    assert saved["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert build_timm_model(saved).patch_embed.proj.weight.shape == (64, 3, 16, 16)


def test_nnx_state_names_are_what_the_converter_expects():
    """The converter's names come from the model itself; a renamed module would show here."""
    arch = _arch("beit", (64, 2, 2), image=64)
    names = set(flatten(nnx.to_pure_dict(nnx.state(arch.build(), nnx.Param))))
    assert names == set(arch.param_shapes())
    assert {"rel_pos_bias.relative_position_bias_table", "blocks.1.attn.q_bias"} <= names
