"""Downstream adaptation: synthetic lesion tasks, label-fraction subsets, task models, the
fine-tuning run (synthetic and ingested data), the label-efficiency study."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
import pytest
import torch
from conftest import make_tiny_config
from flax import nnx
from scipy import ndimage

from configs.finetune import common as finetune_configs
from usfm_jax import label_efficiency
from usfm_jax.config_validation import ConfigError
from usfm_jax.convert import (
    Architecture,
    ConversionError,
    Normalization,
    checkpoint_to_torch,
    import_torch_weights,
)
from usfm_jax.convert.formats import flatten
from usfm_jax.data import ingest, synthetic
from usfm_jax.export import load_params
from usfm_jax.finetune import data as task_data
from usfm_jax.finetune.models import adaptive_pool_matrix, feature_layers, resize
from usfm_jax.finetune.run import create_model, finetune, initial_encoder
from usfm_jax.finetune.step import classification_loss, make_train_step, segmentation_loss
from usfm_jax.finetune.validation import check_init_overrides, validate_finetune
from usfm_jax.models.factory import create_encoder
from usfm_jax.optim import layer_decay_scales
from usfm_jax.paths import PathError
from usfm_jax.reporting import TrainingDiverged
from usfm_jax.train import train
from usfm_jax.train_step import fresh_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_finetune_config(task: str, **overrides):
    """A fine-tuning config small enough for tests: 32x32 images, a 4-block ViT of width 32."""
    c = finetune_configs.get_config(task, "steps=6")
    c.image_size = (32, 32)
    c.batch_size = 8
    c.log_every = c.eval_every = 3
    c.data.update(num_train=24, num_val=8, num_test=10)
    c.model.update(width=32, depth=4, num_heads=2)
    c.head.channels = 16
    c.head.refine_width = 8
    c.eval.num_overlays = 3
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


# ------------------------------------------------------------------------- synthetic tasks


def _compactness(mask: np.ndarray) -> float:
    """Perimeter^2 / (4 pi area): 1 for a disc, larger for irregular shapes."""
    perimeter = (mask & ~ndimage.binary_erosion(mask)).sum()
    return perimeter**2 / (4 * np.pi * mask.sum())


@pytest.mark.parametrize("source, size", [((256, 256), (32, 32)), ((224, 224), (512, 512))])
def test_an_ingested_mask_stays_on_its_lesion_when_resized(source, size):
    """A lesion off the resize grid: after _decode, the mask covers what the image shows (as
    a threshold of the resized image), whether shrunk or enlarged."""
    image = np.zeros(source, np.uint8)
    image[67:131, 99:163] = 255  # rows 67..130, cols 99..162: no multiple of the scale
    encode = lambda a: cv2.imencode(".png", a)[1].tobytes()  # as the ingest stores them
    record = {"image": encode(image), "mask": encode((image > 0).astype(np.uint8))}
    example = task_data._decode(record, "segment", size)
    seen, mask = example["image"][..., 0] >= 128, example["mask"] == 1
    dice = 2 * np.sum(seen & mask) / (seen.sum() + mask.sum())
    assert dice > 0.97, dice  # INTER_NEAREST (top-left sampling): 0.77 shrunk
    pil = PIL.Image.fromarray(image).resize(size[::-1], PIL.Image.NEAREST)  # the ingest's
    np.testing.assert_array_equal(mask, np.asarray(pil) > 0)


def test_lesion_cases_labels_masks_and_clean_images():
    cases = [synthetic.generate_lesion_case(5, i, 96) for i in range(24)]
    again = synthetic.generate_lesion_case(5, 3, 96)
    assert np.array_equal(again["image"], cases[3]["image"])
    assert [c["label"] for c in cases] == [synthetic.lesion_class(5, i) for i in range(24)]
    assert {c["label"] for c in cases} == {0, 1}
    for c in cases:
        assert c["lesion_mask"].any() and not (c["lesion_mask"] & ~c["fan_mask"]).any()
    # malignant-like lesions are irregular: less compact outlines than benign-like ones
    shape = {k: [_compactness(c["lesion_mask"]) for c in cases if c["label"] == k] for k in (0, 1)}
    assert np.mean(shape[1]) > 1.3 * np.mean(shape[0])
    # the speckle-free image: smooth, and the local mean of the speckled log image in tissue
    for c in cases[:6]:
        tissue = ndimage.binary_erosion(c["region"] == 0, iterations=4)
        image, clean = c["image"].astype(float), c["clean"].astype(float)
        assert np.std(np.diff(clean, axis=1)[tissue[:, 1:]]) < 0.3 * np.std(
            np.diff(image, axis=1)[tissue[:, 1:]]
        )
        assert abs(image[tissue].mean() - clean[tissue].mean()) < 4.0


def test_lesion_flags_leave_pretraining_images_unchanged():
    """Marking lesions adds a label map; the images of the organ recipes stay as they were."""
    out = synthetic.generate_with_labels(0, 2, 48, synthetic.ORGANS.index("breast"))
    assert np.array_equal(out["image"], synthetic.generate(0, 2, 48, out["organ"])[0])
    assert not (out["lesion_mask"] & ~out["fan_mask"]).any()
    with pytest.raises(ValueError, match="label must be"):
        synthetic.generate_lesion_case(0, 0, 32, label=2)


def test_label_subset_is_stratified_nested_and_seeded():
    groups = {"a": np.arange(0, 100), "b": np.arange(100, 110), "c": np.arange(110, 111)}
    small = task_data.label_subset(groups, 0.2, seed=3)
    large = task_data.label_subset(groups, 0.5, seed=3)
    counts = {k: np.isin(small, v).sum() for k, v in groups.items()}
    assert counts == {"a": 20, "b": 2, "c": 1}  # rounded per stratum, at least one
    assert set(small) <= set(large)  # nested in the fraction
    assert np.array_equal(small, task_data.label_subset(groups, 0.2, seed=3))
    assert not np.array_equal(small, task_data.label_subset(groups, 0.2, seed=4))
    assert len(task_data.label_subset(groups, 1.0, seed=0)) == 111
    with pytest.raises(ValueError, match="label_fraction"):
        task_data.label_subset(groups, 0.0, seed=0)


def test_degradations():
    rng = np.random.default_rng(0)
    clean = np.full((64, 64, 1), 128, np.uint8)
    assert np.array_equal(task_data.degrade(clean, rng, "speckle", 0.0), clean)
    noisy = task_data.degrade(clean, rng, "gaussian", 0.1).astype(float)
    assert abs(noisy.std() / 255 - 0.1) < 0.01
    speckled = task_data.degrade(clean, rng, "speckle", 1.0).astype(float) / 255
    # log of an exponential variable: std pi / sqrt(6) nepers, over the display's range
    expected = np.pi / np.sqrt(6) / (task_data.SPECKLE_RANGE_DB * np.log(10) / 10)
    assert abs(speckled.std() - expected) < 0.1 * expected
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 1))
    blurred = task_data.degrade(ramp, rng, "downsample", 4.0)
    assert np.abs(blurred.astype(int) - ramp).max() <= 8  # a ramp survives down/upsampling


def test_evaluation_noise_is_fixed_per_split_and_independent_between_them():
    """A synthesised degradation of val and test: the same at every evaluation, another draw
    in each split (the same case index of val and test got the same field before)."""
    config = tiny_finetune_config("enhance", **{"data.degradation": "gaussian"})
    data = task_data.load_task(config)
    val, test = (task_data.eval_split(config, data, s) for s in ("val", "test"))
    noise = lambda ex: ex["image"].astype(float) - ex["target"].astype(float)
    assert np.array_equal(noise(val[0]), noise(task_data.eval_split(config, data, "val")[0]))
    assert np.corrcoef(noise(val[0]).ravel(), noise(test[0]).ravel())[0, 1] < 0.2


# ----------------------------------------------------------------------- model pieces


@pytest.mark.parametrize(("n", "s"), [(7, 3), (4, 6), (2, 1), (5, 5)])
def test_adaptive_pooling_matches_torch(n, s):
    x = np.random.default_rng(0).normal(size=(2, n, n, 3)).astype(np.float32)
    p = adaptive_pool_matrix(n, s)
    ours = np.einsum("ih,jw,bhwc->bijc", p, p, x)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), s)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_upsampling_matches_torch_bilinear():
    x = np.random.default_rng(1).normal(size=(1, 4, 6, 2)).astype(np.float32)
    ours = np.asarray(resize(jnp.asarray(x), (16, 24)))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(16, 24), mode="bilinear"
    )
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_encoder_intermediates():
    c = make_tiny_config()
    c.model.depth = 4
    encoder = create_encoder(c.model, c.image_size, nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *c.image_size, 1)), jnp.float32)
    outs = encoder.intermediates(x, feature_layers(4))
    assert len(outs) == 4 and feature_layers(4) == (0, 1, 2, 3)
    np.testing.assert_allclose(outs[-1], encoder(x, final_norm=False), atol=1e-5)
    assert feature_layers(12) == (3, 5, 7, 11)  # BEiT's out_indices, USFM's blocks 4, 6, 8, 12
    assert feature_layers(24) == (7, 11, 15, 23)
    with pytest.raises(ValueError, match="must increase"):
        encoder.intermediates(x, (2, 1))


def test_layer_decay_scales():
    params = {
        "encoder": {
            "cls_token": 1,
            "blocks": {0: {"w": 1}, 1: {"w": 1}},
            "norm": {"scale": 1},
            "rel_pos_bias": {"relative_position_bias_table": 1},
        },
        "head": {"kernel": 1},
    }
    params = jax.tree.map(lambda _: jnp.zeros((2, 2)), params)
    s = layer_decay_scales(params, depth=2, decay=0.5)
    assert s["encoder"]["cls_token"] == 0.125 and s["encoder"]["blocks"][0]["w"] == 0.25
    assert s["encoder"]["blocks"][1]["w"] == 0.5 and s["encoder"]["norm"]["scale"] == 1.0
    # the table every block reads is in BEiT's last layer, with the final norm
    assert s["encoder"]["rel_pos_bias"]["relative_position_bias_table"] == 1.0
    assert s["head"]["kernel"] == 1.0
    frozen = layer_decay_scales(params, depth=2, decay=0.5, frozen="encoder")
    assert frozen["encoder"]["blocks"][1]["w"] == 0.0 and frozen["head"]["kernel"] == 1.0


@pytest.mark.parametrize("task", ["classify", "segment", "enhance"])
def test_gradient_accumulation_gives_the_whole_batch_step(task):
    """optimizer.grad_accum_steps=2 takes the same step as the whole batch (Dice is pooled per
    micro-batch, so segmentation is compared on its cross-entropy alone)."""
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8),
             "label": rng.integers(0, 2, 8), "mask": rng.integers(0, 3, (8, 32, 32)),
             "target": rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8)}  # fmt: skip
    config = tiny_finetune_config(task, **{"model.drop_path_rate": 0.0, "loss.dice_weight": 0.0})
    arch = Architecture.from_config(config.model, config.image_size)
    model = create_model(config, arch, Normalization((0.5,), (0.25,)), 3, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # zero-initialised outputs: perturb
    params = jax.tree.map(lambda x: x + 0.02 * rng.standard_normal(x.shape, np.float32), params)
    tx = optax.scale_by_schedule(lambda _: -1.0)  # plain gradient descent at lr 1
    stepped = []
    for accum in (1, 2):
        config.optimizer.grad_accum_steps = accum
        step = make_train_step(config, nnx.graphdef(model), tx, lambda _: 1.0)
        state = fresh_state(params, tx, 0)
        # one micro-batch at a time, in a loop, is what saves memory
        assert ("scan[" in str(jax.make_jaxpr(step)(state, batch))) == (accum > 1)
        stepped.append(jax.jit(step)(state, batch))
    (whole, whole_metrics), (accumulated, metrics) = stepped
    np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=1e-5)
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max() > 0, whole.params, params)
    assert np.mean(jax.tree.leaves(moved)) > 0.9  # the step is not empty (the cls token may be)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        accumulated.params,
        whole.params,
    )


def test_encoder_settings_reach_the_task_model():
    """model.scan_layers and (from scratch) model.layer_scale_init build the encoder."""
    config = tiny_finetune_config(
        "classify", **{"model.layer_scale_init": 0.01, "model.scan_layers": True}
    )
    arch = Architecture.from_config(config.model, config.image_size)
    normalization = Normalization((0.5,), (0.25,))
    model = create_model(config, arch, normalization, 2, nnx.Rngs(0))
    assert model.encoder.scan
    np.testing.assert_allclose(model.encoder.blocks[0].gamma_1[...], 0.01)
    config.init = "runs/pre"  # a checkpoint's values replace the initial ones: not applied
    model = create_model(config, arch, normalization, 2, nnx.Rngs(0))
    assert not np.allclose(model.encoder.blocks[0].gamma_1[...], 0.01)


def test_classification_loss_is_torchs_cross_entropy_with_label_smoothing():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(0, 2, (6, 4)).astype(np.float32), rng.integers(0, 4, 6)
    for smoothing in (0.0, 0.1, 0.3):
        want = torch.nn.functional.cross_entropy(
            torch.from_numpy(logits), torch.from_numpy(labels), label_smoothing=smoothing
        )
        got = classification_loss(jnp.asarray(logits), jnp.asarray(labels), smoothing)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_segmentation_loss_is_cross_entropy_plus_soft_dice_against_torch():
    """Cross-entropy over the non-ignored pixels (torch's ignore_index) plus the weighted soft
    Dice loss (smoothing 1) of each foreground class pooled over the batch, written in numpy."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (2, 6, 5, 3)).astype(np.float32)  # [B, H, W, C]
    mask = rng.integers(0, 3, (2, 6, 5)).astype(np.uint8)
    mask[0, 0] = mask[1, :, 4] = task_data.IGNORE
    ce = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).permute(0, 3, 1, 2),
        torch.from_numpy(mask.astype(np.int64)),
        ignore_index=task_data.IGNORE,
    )
    valid = mask != task_data.IGNORE
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    dice = []
    for c in (1, 2):
        p, t = probs[..., c][valid], (mask[valid] == c).astype(np.float64)
        dice.append((2 * np.sum(p * t) + 1) / (p.sum() + t.sum() + 1))
    want_dice = 1 - np.mean(dice)
    loss, parts = segmentation_loss(jnp.asarray(logits), jnp.asarray(mask), 0.5)
    np.testing.assert_allclose(float(parts["loss_ce"]), float(ce), rtol=1e-5)
    np.testing.assert_allclose(float(parts["loss_dice"]), want_dice, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(ce) + 0.5 * want_dice, rtol=1e-5)


def test_segmentation_loss_ignores_pixels_and_rewards_overlap():
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 2:5, 2:5] = 1
    mask[0, 0, :] = task_data.IGNORE
    good = jnp.asarray(np.where(mask[..., None] == 1, [-9.0, 9.0], [9.0, -9.0]), jnp.float32)
    loss, parts = segmentation_loss(good, jnp.asarray(mask), 1.0)
    assert float(parts["loss_dice"]) < 1e-3 and float(parts["loss_ce"]) < 1e-3
    changed = good.at[0, 0].set(jnp.asarray([-50.0, 50.0]))  # only ignored pixels change
    assert np.isclose(float(segmentation_loss(changed, jnp.asarray(mask), 1.0)[0]), float(loss))
    bad = -good
    assert float(segmentation_loss(bad, jnp.asarray(mask), 1.0)[0]) > 1.0


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("task", ["classify", "segment", "enhance"])
def test_finetune_synthetic_task_writes_results(tmp_path, task):
    config = tiny_finetune_config(task)
    results = finetune(config, str(tmp_path))
    names = set(results["test"])
    expected = {"classify": "auc", "segment": "hd95", "enhance": "ssim_input"}[task]
    assert expected in names and results["test_images"] == 10 and results["train_images"] == 24
    assert json.loads((tmp_path / "results.json").read_text())["test"] == results["test"]
    assert "| test |" in (tmp_path / "results.md").read_text()
    assert len(list((tmp_path / "test_predictions").glob("*.png"))) == 3
    best = load_params(str(tmp_path / "best"))
    assert best.step == results["best_step"] and "encoder" in best.params
    with pytest.raises(FileExistsError, match="finished run"):
        finetune(config, str(tmp_path))


def test_finetune_from_pretraining_linear_probe_keeps_the_encoder(tmp_path):
    pre = make_tiny_config()  # 32x48 images, 2 blocks
    pre.total_steps = 4
    train(pre, str(tmp_path / "pre"))
    config = tiny_finetune_config(
        "classify", init=str(tmp_path / "pre"), **{"head.mode": "linear_probe"}
    )  # 32x32: the relative position tables are resampled
    results = finetune(config, str(tmp_path / "probe"))
    assert results["init"] == str(tmp_path / "pre") and results["mode"] == "linear_probe"
    initial = load_params(str(tmp_path / "pre")).params["encoder"]
    tuned = load_params(str(tmp_path / "probe" / "best")).params
    saved = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert saved["model"]["depth"] == 2 and saved["model"]["width"] == 32  # the checkpoint's
    np.testing.assert_array_equal(tuned["encoder"]["blocks"]["0"]["mlp"]["fc1"]["kernel"],
                                  initial["blocks"]["0"]["mlp"]["fc1"]["kernel"])  # fmt: skip
    assert tuned["encoder"]["rel_pos_bias"]["relative_position_bias_table"].shape != (
        initial["rel_pos_bias"]["relative_position_bias_table"].shape
    )
    assert not np.allclose(tuned["head"]["kernel"], 0)
    # An architecture field given on the command line that the checkpoint contradicts is
    # refused in one line, before anything is written; training settings are free.
    cmd = [sys.executable, "-m", "usfm_jax.finetune", "--config=configs/finetune/classify.py",
           f"--config.init={tmp_path / 'pre'}", "--config.model.dtype=bfloat16",
           "--config.model.depth=4", f"--workdir={tmp_path / 'cli'}"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: --config.model.depth=4 differs from --config.init={tmp_path / 'pre'}, whose "
            "encoder has depth 2: a checkpoint brings its own architecture"
        )
    ), result.stderr
    assert not (tmp_path / "cli").exists()


def _arch(**changes) -> Architecture:
    base = Architecture("beit", 768, 12, 12, 16, 1, (224, 224))
    return base.replace(**changes)


@pytest.mark.parametrize(
    "overrides, arch, error",
    [
        ({"model.depth": 12, "model.size": "base", "model.dtype": "bfloat16"}, _arch(), None),
        ({"model.depth": 24}, _arch(), "model.depth=24 differs .* has depth 12"),
        ({"model.size": "large"}, _arch(), "model.size='large' differs .* has size 'base'"),
        ({"model.size": "base"}, _arch(width=320, num_heads=5), r"has size 'none \(320, 12, 5\)'"),
        ({"model.variant": "vit"}, _arch(), "has variant 'beit'"),
        ({"model.patch_size": 14}, _arch(), "has patch_size 16"),
        ({"model.in_chans": 3}, _arch(), "has in_chans 1"),
        ({"model.rel_pos": "per_block"}, _arch(), "has rel_pos 'shared'"),
        ({"model.rel_pos": "per_block"}, _arch(variant="vit"), None),  # no relative positions
        ({"normalization.mean": 0.5}, _arch(), None),  # the same as the checkpoint's
        ({"normalization.std": 0.5}, _arch(), r"has input normalisation .*std=\(0.25,\)"),
        ({"model.layer_scale_init": 1e-5}, _arch(), r"layer_scale_init=1e-05 differs .* trained"),
    ],
)
def test_init_overrides_must_agree_with_the_checkpoint(overrides, arch, error):
    config = tiny_finetune_config("classify", init="runs/pre")
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        config[section][field] = value
    normalization = Normalization((0.5,), (0.25,))
    if error is None:
        check_init_overrides(config, overrides, arch, normalization)
    else:
        with pytest.raises(ConfigError, match=error):
            check_init_overrides(config, overrides, arch, normalization)
    # only the field given is compared: the config file's mean (0.5) is not the one given
    check_init_overrides(config, {"normalization.std": 0.25}, arch, Normalization((0.4,), (0.25,)))
    config.init = ""  # from scratch, config.model is the architecture: nothing to contradict
    check_init_overrides(config, {"model.depth": 24}, arch, normalization)


def test_finetune_from_pytorch_weights(tmp_path):
    """A checkpoint through the converter (timm-beit safetensors, 3 channels) starts the same
    encoder: the frozen probe's encoder equals the converted weights read back."""
    pre = make_tiny_config()
    pre.total_steps = 4
    pre.image_size = (32, 32)
    train(pre, str(tmp_path / "pre"))
    weights = str(tmp_path / "encoder.safetensors")
    checkpoint_to_torch(str(tmp_path / "pre"), "timm-beit", weights, in_chans=3)
    config = tiny_finetune_config("classify", init=weights, **{"head.mode": "linear_probe"})
    finetune(config, str(tmp_path / "probe"))
    saved = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert saved["model"]["in_chans"] == 3 and saved["normalization"]["mean"] == [0.5]
    tuned = load_params(str(tmp_path / "probe" / "best")).params["encoder"]
    imported = import_torch_weights(weights, "auto").params["encoder"]
    tuned, imported = flatten(tuned), flatten(imported)
    assert sorted(tuned) == sorted(imported)
    for name, value in imported.items():
        np.testing.assert_array_equal(tuned[name], value, err_msg=name)


def test_plain_vit_weights_of_a_nonstandard_width_take_init_num_heads(tmp_path):
    """A card-less plain ViT 64 wide does not say its heads: the error names the config field,
    which then reads it (a URFM demo student whose card was lost)."""
    import timm

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, num_classes=0
    )
    weights = tmp_path / "student.pth"
    torch.save(vit.state_dict(), weights)
    config = tiny_finetune_config("classify", init=str(weights), init_normalization="0.5/0.25")
    with pytest.raises(ConversionError, match=r"number of heads: .*--config\.init_num_heads"):
        initial_encoder(config)
    config.init_num_heads = 2
    _, arch, _ = initial_encoder(config)
    assert (arch.variant, arch.width, arch.num_heads) == ("vit", 64, 2)
    config.init_num_heads = -1
    with pytest.raises(ConfigError, match=r"init_num_heads=-1: expected >= 0"):
        validate_finetune(config)


def _timm_vit_file(path, patch: int = 16, image: int = 32):
    """A card-less timm ViT (width 64, 2 heads, one block) saved at ``path``."""
    import timm

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=image, patch_size=patch, embed_dim=64, depth=1, num_heads=2, num_classes=0
    )
    torch.save(vit.state_dict(), path)
    return str(path)


def test_training_settings_are_checked_with_a_checkpoint_too(tmp_path):
    """With config.init the architecture is the checkpoint's, but dtype, attention, drop path
    ... apply as given: checked once the checkpoint is read (its patch size, not
    config.model's, divides the images)."""
    weights = _timm_vit_file(tmp_path / "patch8.pth", patch=8)
    init = dict(init=weights, init_normalization="0.5/0.25", init_num_heads=2)
    cases = [
        ({"model.dtype": "float64"}, r"config\.model\.dtype='float64': expected one of"),
        ({"model.drop_path_rate": 1.5}, r"config\.model\.drop_path_rate=1\.5: expected \[0, 1\)"),
        ({"model.attention": "cudnn"}, r"config\.model\.attention='cudnn': cuDNN attention needs"),
    ]  # fmt: skip
    for overrides, match in cases:
        config = tiny_finetune_config("classify", **init, **overrides)
        validate_finetune(config)  # the checkpoint is not read yet
        with pytest.raises(ConfigError, match=match):
            finetune(config, str(tmp_path / "run"))
        assert not (tmp_path / "run" / "results.json").exists()
    config = tiny_finetune_config("classify", **init, image_size=(40, 40), total_steps=1)
    config.log_every = config.eval_every = 1
    results = finetune(config, str(tmp_path / "patch8"))  # 40 px: 5 x 5 patches of 8
    assert results["steps"] == 1


def test_a_run_that_only_skips_steps_stops_without_results(tmp_path):
    """Steps with a non-finite loss are skipped, counted in the results and, max_bad_steps of
    them in a row, stop fine-tuning with an error rather than results of stale weights."""
    config = tiny_finetune_config("classify", **{"optimizer.base_lr": 1e30, "max_bad_steps": 2})
    with pytest.raises(TrainingDiverged, match=r"consecutive steps had a non-finite loss .*"
                       r"max_bad_steps=2\); no results were written"):  # fmt: skip
        finetune(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "results.json").exists()
    config = tiny_finetune_config("classify", **{"optimizer.base_lr": 1e30})  # 6 steps < 20
    results = finetune(config, str(tmp_path / "counted"))
    assert results["skipped_steps"] >= 4
    assert (
        f"{results['skipped_steps']} steps skipped"
        in (tmp_path / "counted" / "results.md").read_text()
    )
    done = subprocess.run(
        [sys.executable, "-m", "usfm_jax.finetune", "--config", "configs/finetune/classify.py",
         "--workdir", str(tmp_path / "cli"), "--config.optimizer.base_lr=1e30",
         "--config.total_steps=8", "--config.batch_size=8", "--config.log_every=2",
         "--config.eval_every=4", "--config.data.num_train=16", "--config.max_bad_steps=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: ") and "consecutive steps had a non-finite" in last


def test_finetune_ingested_segmentation(tmp_path):
    src = task_data.write_synthetic_files("segment", str(tmp_path / "files"), 30, 32, seed=2)
    os.remove(tmp_path / "files" / "masks" / "case_00007.png")  # an image without its mask
    options = ingest.Options(resize=0, crop="none", val_fraction=0.2, test_fraction=0.2,
                             masks=str(tmp_path / "files" / "masks"))  # fmt: skip
    card = ingest.ingest(src, str(tmp_path / "data"), "lesions", options, workers=2)
    assert card["fields"] == ["mask"] and card["mask_values"] == [0, 1]
    assert card["files"]["skipped"] == 1 and "no mask for it in --masks" in card["skipped_reasons"]
    assert sum(sum(card["images"][s].values()) for s in ("train", "val", "test")) == 29
    config = tiny_finetune_config("segment", **{"data.source": "tfds"})
    config.data.tfds_dir = card["data_dir"]
    config.total_steps = 3
    results = finetune(config, str(tmp_path / "run"))
    assert results["test_images"] == sum(card["images"]["test"].values())
    assert 0.0 <= results["test"]["dice"] <= 1.0
    [val] = glob.glob(os.path.join(card["data_dir"], "*-val.array_record-*"))
    os.remove(val)  # found before training, not at the first evaluation
    with pytest.raises(ValueError, match=r"-val\.array_record-\S+ \(val split\) is missing"):
        finetune(config, str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()


def test_ingest_pairs_need_crop_none_and_splits_add_up(tmp_path):
    with pytest.raises(ValueError, match="--crop none"):
        ingest.Options(masks=str(tmp_path))
    with pytest.raises(ValueError, match="test_fraction"):
        ingest.Options(val_fraction=0.5, test_fraction=0.5)
    options = ingest.Options(val_fraction=0.2, test_fraction=0.3)
    splits = [ingest.assign_split(f"patient{i}", options) for i in range(2000)]
    shares = {s: splits.count(s) / 2000 for s in ("train", "val", "test")}
    assert abs(shares["val"] - 0.2) < 0.04 and abs(shares["test"] - 0.3) < 0.04


def test_finetune_config_errors():
    with pytest.raises(ConfigError, match=r"config\.label_fraction=0"):
        finetune(tiny_finetune_config("classify", label_fraction=0.0), "/tmp/never")
    with pytest.raises(ConfigError, match=r"config\.data\.degradation"):
        finetune(tiny_finetune_config("classify", **{"data.degradation": "speckle"}), "/x")
    with pytest.raises(ConfigError, match=r"data\.degradation_level=0\.3: is used only with"):
        finetune(tiny_finetune_config("enhance", **{"data.degradation_level": 0.3}), "/x")
    speckle = {"data.degradation": "speckle", "data.degradation_level": 5.0}  # black pixels
    with pytest.raises(ConfigError, match=r"degradation_level=5\.0: expected in \(0, 1\] for spe"):
        finetune(tiny_finetune_config("enhance", **speckle), "/x")
    with pytest.raises(ConfigError, match=r"data\.tfds_dir='/d': is set, but data\.source="):
        finetune(tiny_finetune_config("segment", **{"data.tfds_dir": "/d"}), "/x")


def _card_dir(tmp_path, name: str, organs: dict[str, int], **card) -> str:
    """A dataset directory holding only an ingest card: what validation reads."""
    ranges, start = {}, 0
    for organ, count in organs.items():
        ranges[organ], start = [start, start + count], start + count
    directory = tmp_path / name
    directory.mkdir()
    card = {"organs": list(organs), "organ_ranges": dict.fromkeys(("train", "val", "test"), ranges),
            **card}  # fmt: skip
    (directory / "dataset_card.json").write_text(json.dumps(card))
    return str(directory)


def test_classification_overlay_captions_above_an_intact_border():
    from usfm_jax.finetune.evaluate import CAPTION_HEIGHT, overlay

    image = np.full((24, 24, 1), 128, np.uint8)
    picture = np.asarray(overlay("classify", image, 1, np.array([0.3, 0.7]), ("benign", "mal")))
    zoom = picture.shape[1] // 32  # 24 pixels + a 4-pixel border on each side
    assert picture.shape[0] == CAPTION_HEIGHT + 32 * zoom
    caption, framed = picture[:CAPTION_HEIGHT], picture[CAPTION_HEIGHT:]
    green = np.array([40, 220, 60], np.uint8)
    text = (caption[..., 1] > 100) & (caption[..., 1] > 2 * caption[..., 0].astype(int))
    assert text.sum() > 20 and not (caption[~text] > 100).any()  # green text on black
    assert (framed[: 4 * zoom] == green).all()  # the border, not written over
    assert (framed[4 * zoom : -4 * zoom, 4 * zoom : -4 * zoom] == 128).all()


def test_finetune_without_anything_to_learn_or_select_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.select='dice': expected one of \['balanced_"):
        validate_finetune(tiny_finetune_config("classify", **{"eval.select": "dice"}))
    baseline = r"eval\.select='psnr_input': expected one of \['psnr', 'ssim'\].*score the inputs"
    with pytest.raises(ConfigError, match=baseline):  # the same at every evaluation
        validate_finetune(tiny_finetune_config("enhance", **{"eval.select": "psnr_input"}))
    one_class = _card_dir(tmp_path, "one", {"all": 5})
    config = tiny_finetune_config("classify", **{"data.source": "tfds", "data.tfds_dir": one_class})
    with pytest.raises(ConfigError, match=r"two classes or more in train, the dataset has \['all'"):
        validate_finetune(config)
    validate_finetune(tiny_finetune_config("classify", **{"data.source": "tfds", "data.tfds_dir": (
        _card_dir(tmp_path, "two", {"benign": 3, "malignant": 2}))}))  # fmt: skip
    for values, error in (([0, 255], True), ([0, 1, 255], False)):
        masks = _card_dir(tmp_path, f"masks{len(values)}", {"all": 5}, fields=["mask"],
                          mask_values=values)  # fmt: skip
        config = tiny_finetune_config("segment", **{"data.source": "tfds", "data.tfds_dir": masks})
        if error:
            with pytest.raises(ConfigError, match=r"only the values \[0, 255\].*0/1"):
                validate_finetune(config)
        else:
            validate_finetune(config)


def test_a_selection_metric_undefined_on_val_keeps_the_last_step_and_says_so(tmp_path):
    """AUC of a val split of one image (one class) is NaN at every evaluation: the last step
    is tested and exported to best/, and the results say nothing was selected."""
    config = tiny_finetune_config("classify", **{"eval.select": "auc", "data.num_val": 1})
    results = finetune(config, str(tmp_path))
    assert results["selected_by"] is None and results["best_step"] == config.total_steps
    assert np.isnan(results["val"]["auc"]) and "accuracy" in results["val"]  # the last val
    assert load_params(str(tmp_path / "best")).step == config.total_steps
    for name in ("results.json", "best/export.json", "best/config.json"):  # strict JSON
        text = (tmp_path / name).read_text()
        json.loads(text, parse_constant=lambda token, name=name: pytest.fail(f"{name}: {token}"))
    assert json.loads((tmp_path / "best" / "export.json").read_text())["val"]["auc"] is None
    markdown = (tmp_path / "results.md").read_text()
    assert "last step 6 (the selection metric was undefined on val)" in markdown


def test_finetune_refuses_a_pretraining_workdir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"objective": "dual"}))
    with pytest.raises(PathError, match=r"holds a pre-training run \(python -m usfm_jax\.train\)"):
        finetune(tiny_finetune_config("classify"), str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["objective"] == "dual"


def test_label_efficiency_study(tmp_path):
    config = tiny_finetune_config("classify")
    config.total_steps = 3
    inits = label_efficiency.parse_named("scratch", "inits")
    rows = label_efficiency.study(config, inits, [0.5, 1.0], 2, str(tmp_path))
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 and lines[0].startswith("init,label_fraction,seed")
    assert [(r["init"], r["fraction"], r["seeds"]) for r in rows] == [
        ("scratch", 0.5, 2),
        ("scratch", 1.0, 2),
    ]
    assert "±" in (tmp_path / "results.md").read_text()
    first = [float(line.split(",")[5]) for line in lines[1:3]]  # scratch, 0.5: seeds 0 and 1
    assert rows[0]["balanced_accuracy"] == pytest.approx((np.mean(first), np.std(first, ddof=1)))
    assert (tmp_path / "label_efficiency.png").stat().st_size > 1000
    done = tmp_path / "runs" / "scratch" / "f0.5" / "s0" / "results.json"
    stamp = done.stat().st_mtime_ns
    label_efficiency.study(config, inits, [0.5, 1.0], 2, str(tmp_path))  # continues: no rerun
    assert done.stat().st_mtime_ns == stamp
    config.total_steps = 4  # another study: its runs are not the finished ones
    with pytest.raises(ValueError, match=r"s0 was fine-tuned with another config \(total_steps"):
        label_efficiency.study(config, inits, [0.5, 1.0], 2, str(tmp_path))
    missing = [("scratch", "scratch"), ("bad", str(tmp_path / "nope"))]
    with pytest.raises(ValueError, match=r"--inits bad=.*nope: no such file"):  # before any run
        label_efficiency.study(config, missing, [0.5], 1, str(tmp_path / "other"))
    assert not (tmp_path / "other" / "runs").exists()
    assert label_efficiency.parse_named("a=x,runs/b", "inits") == [("a", "x"), ("b", "runs/b")]
    with pytest.raises(ValueError, match="unique"):
        label_efficiency.parse_named("a=x,a=y", "inits")
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        label_efficiency.parse_fractions("0.5,2")


def test_label_efficiency_checks_everything_before_the_first_run(tmp_path):
    config = tiny_finetune_config("classify")
    inits = [("scratch", "scratch")]
    with pytest.raises(ValueError, match="--seeds must be >= 1, got 0"):
        label_efficiency.check_study(config, inits, 0)
    with pytest.raises(ValueError, match=r"names must be unique, got \['scratch', 'scratch'\]"):
        label_efficiency.check_study(config, inits, 1, pretrain=[("scratch", make_tiny_config())])
    for field, value, flag in (("init", "runs/x", "--inits"), ("label_fraction", 0.2,
                               "--fractions"), ("seed", 4, "--seeds")):  # fmt: skip
        changed = tiny_finetune_config("classify", **{field: value})
        with pytest.raises(ConfigError, match=rf"config\.{field}=.*sets it .* from {flag}"):
            label_efficiency.check_study(changed, inits, 1)
    # an architecture override describes the scratch encoder; an init must agree with it
    pretrain = [("dual", make_tiny_config())]  # depth 2
    config.model.depth = 2
    label_efficiency.check_study(config, inits, 1, pretrain, {"model.depth": 2})
    config.model.depth = 3
    with pytest.raises(ConfigError, match=r"model\.depth=3 differs from --pretrain dual, whose"):
        label_efficiency.check_study(config, inits, 1, pretrain, {"model.depth": 3})
    config.task = "bogus"
    with pytest.raises(ConfigError, match=r"config\.task='bogus'"):
        label_efficiency.check_study(config, inits, 1)
    config = tiny_finetune_config("classify")
    config.model.depth = 0  # checked for the scratch init, whose encoder the config describes
    with pytest.raises(ConfigError, match=r"config\.model\.depth=0"):
        label_efficiency.check_study(config, inits, 1)
    odd_batch = tiny_finetune_config("classify", batch_size=12)  # 8 devices, before any run
    with pytest.raises(ConfigError, match=r"config\.batch_size=12: must split evenly over 8"):
        label_efficiency.check_study(odd_batch, inits, 1)
    label_efficiency.check_study(config, [("a", str(tmp_path))], 1)  # a checkpoint's own encoder
    classify = os.path.join(ROOT, "configs", "finetune", "classify.py")
    with pytest.raises(ConfigError, match=r"--pretrain a=.*classify\.py is not a pre-training"):
        label_efficiency.load_pretrain_configs([("a", classify)], None)
    demo = os.path.join(ROOT, "configs", "pretrain", "demo.py")
    with pytest.raises(ConfigError, match=r"--pretrain a=.*demo\.py:steps=0: config\.total_steps"):
        label_efficiency.load_pretrain_configs([("a", demo + ":steps=0")], None)
    odd = tmp_path / "odd_batch.py"
    odd.write_text("from configs.pretrain import demo\n\ndef get_config():\n"
                   "    c = demo.get_config()\n    c.batch_size = 12\n    return c\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"--pretrain a=.*: config\.batch_size=12: must split"):
        label_efficiency.load_pretrain_configs([("a", str(odd))], None)
    with pytest.raises(ValueError, match="--pretrain_steps must be >= 1, got 0"):
        label_efficiency.load_pretrain_configs([("a", demo)], 0)
    [(name, loaded)] = label_efficiency.load_pretrain_configs([("a", demo + ":steps=40")], 30)
    assert name == "a" and loaded.total_steps == 30


def test_finetune_ingested_enhancement_pairs_and_clean_only(tmp_path):
    src = task_data.write_synthetic_files("enhance", str(tmp_path / "files"), 24, 32, seed=3)
    clean_dir = str(tmp_path / "files" / "clean")
    split = dict(resize=0, crop="none", val_fraction=0.25, test_fraction=0.25)
    pairs = ingest.ingest(src, str(tmp_path / "data"), "pairs",
                          ingest.Options(targets=clean_dir, **split), workers=2)  # fmt: skip
    clean = ingest.ingest(clean_dir, str(tmp_path / "data"), "clean", ingest.Options(**split),
                          workers=2)  # fmt: skip
    assert pairs["fields"] == ["target"] and clean["fields"] == []
    config = tiny_finetune_config("enhance", **{"data.source": "tfds"})
    config.total_steps = 3
    config.data.tfds_dir = pairs["data_dir"]
    paired = finetune(config, str(tmp_path / "paired"))
    assert paired["test"]["psnr_input"] < 40  # speckled input vs its speckle-free target
    config.data.tfds_dir = clean["data_dir"]
    with pytest.raises(ValueError, match="holds no targets"):
        finetune(config, str(tmp_path / "none"))
    config.data.update(degradation="gaussian", degradation_level=0.05)
    synthesised = finetune(config, str(tmp_path / "synthesised"))
    # inputs are the clean images plus noise of std 0.05: PSNR about -20 log10(0.05) = 26 dB
    assert abs(synthesised["test"]["psnr_input"] - 26.0) < 1.5
    config.data.tfds_dir = pairs["data_dir"]  # real noisy inputs are not replaced by synthesised
    with pytest.raises(
        ConfigError, match=r"data\.degradation='gaussian': would replace the real noisy inputs"
    ):
        finetune(config, str(tmp_path / "replaced"))
    assert not (tmp_path / "replaced").exists()
