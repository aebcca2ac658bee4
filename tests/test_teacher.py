"""The frozen teacher (URFM): BiomedCLIP's visual tower in open_clip's layout, against timm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import biomedclip_file
from flax import nnx

from usfm_jax.convert import ConversionError, Normalization
from usfm_jax.convert.adapt import PRESETS
from usfm_jax.models.teacher import load_teacher

TOL = 1e-4
CLIP = PRESETS["clip"]


def _timm_tokens(trunk, gray: np.ndarray, norm: Normalization, final_norm=True) -> np.ndarray:
    x = (np.repeat(gray, 3, -1) - np.asarray(norm.mean)) / np.asarray(norm.std)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2)).float()
    with torch.no_grad():
        if final_norm:
            return trunk.forward_features(x).numpy()
        x = trunk.blocks(trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(x))))
        return x.numpy()


def _teacher_features(loaded, gray: np.ndarray) -> np.ndarray:
    teacher = nnx.merge(loaded.graphdef, loaded.params)
    return np.asarray(jax.jit(lambda t, x: t(x))(teacher, jnp.asarray(gray)))


def _gray(batch=2, image=224, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (batch, image, image, 1)).astype(np.float32)


def test_biomedclip_teacher_matches_timm_on_every_token_and_the_projection(tmp_path):
    path, trunk, proj = biomedclip_file(tmp_path)
    gray = _gray()
    tokens = _timm_tokens(trunk, gray, CLIP)[:, 1:]  # [B, 196, 768], after the final norm
    final = load_teacher(str(path), layer="final_norm")
    assert final.normalization == CLIP and final.arch.width == 768 and final.arch.depth == 12
    assert any("ignored 3 keys" in note for note in final.notes)  # the text tower
    got = _teacher_features(final, gray)
    assert got.shape == (2, 196, 768)
    assert np.max(np.abs(got - tokens)) < TOL
    projected = _teacher_features(load_teacher(str(path), layer="projection"), gray)
    expected = tokens @ proj.numpy().T  # CLIP's head, on every token
    assert projected.shape == (2, 196, 512)
    assert np.max(np.abs(projected - expected)) < TOL
    last = _teacher_features(load_teacher(str(path), layer="last_block"), gray)
    assert np.max(np.abs(last - _timm_tokens(trunk, gray, CLIP, final_norm=False)[:, 1:])) < TOL


def test_teacher_uses_its_own_normalisation_and_size(tmp_path):
    """CLIP's per-channel mean / std reach the teacher's input, not the student's (x-0.5)/0.25;
    a student image of another size is resized to the teacher's."""
    path, trunk, _ = biomedclip_file(tmp_path, width=64, depth=2, heads=2, image=32, proj=16)
    loaded = load_teacher(str(path), layer="final_norm", num_heads=2)
    gray = _gray(image=32)
    got = _teacher_features(loaded, gray)
    ours = Normalization((0.5,), (0.25,))
    assert np.max(np.abs(got - _timm_tokens(trunk, gray, CLIP)[:, 1:])) < TOL
    assert np.max(np.abs(got - _timm_tokens(trunk, gray, ours)[:, 1:])) > 100 * TOL
    teacher = nnx.merge(loaded.graphdef, loaded.params)
    x = teacher.preprocess(jnp.asarray(gray))
    np.testing.assert_allclose(x[..., 1], (gray[..., 0] - CLIP.mean[1]) / CLIP.std[1], rtol=1e-6)
    big = jax.image.resize(jnp.asarray(gray), (2, 64, 64, 1), "bicubic")
    assert teacher(big).shape == got.shape  # resized to the teacher's 32 x 32


def test_missing_or_mismatched_teacher_weights_name_the_key(tmp_path):
    path, _, _ = biomedclip_file(tmp_path, width=64, depth=2, heads=2, image=32, proj=16)
    sd = torch.load(path, weights_only=True)
    broken = dict(sd)
    del broken["visual.trunk.blocks.1.attn.qkv.bias"]
    torch.save(broken, tmp_path / "missing.bin")
    with pytest.raises(ConversionError, match=r"lacks 'blocks.1.attn.qkv.bias'"):
        load_teacher(str(tmp_path / "missing.bin"), num_heads=2)
    broken = {**sd, "visual.trunk.blocks.0.mlp.fc2.weight": torch.zeros(64, 100)}
    torch.save(broken, tmp_path / "shape.bin")
    with pytest.raises(ConversionError, match=r"'blocks.0.mlp.fc2.weight' has shape \(64, 100\)"):
        load_teacher(str(tmp_path / "shape.bin"), num_heads=2)
    no_proj = {k: v for k, v in sd.items() if k != "visual.head.proj.weight"}
    torch.save(no_proj, tmp_path / "no_proj.bin")
    with pytest.raises(ConversionError, match="no projection"):
        load_teacher(str(tmp_path / "no_proj.bin"), layer="projection", num_heads=2)
    with pytest.raises(ConversionError, match="no weights file"):
        load_teacher(str(tmp_path / "absent.bin"))
