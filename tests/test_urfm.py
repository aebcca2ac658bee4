"""URFM: representation-based MIM with a frozen teacher, end to end on the CPU."""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import biomedclip_file, make_tiny_config
from flax import nnx

from configs.pretrain import urfm_vitb16
from usfm_jax import parallel, train
from usfm_jax.config_validation import ConfigError, validate
from usfm_jax.data.synthetic import SyntheticUltrasound
from usfm_jax.models.factory import create_pretrain_model
from usfm_jax.models.teacher import teacher_from_config
from usfm_jax.objectives.representation import create_representation
from usfm_jax.optim import create_optimizer
from usfm_jax.train_step import (
    create_teacher,
    create_training,
    init_state,
    jit_train_step,
    make_train_step,
)


@pytest.fixture(scope="module")
def teacher_64(tmp_path_factory):
    """A small random teacher in open_clip's key layout: 64x64 images, patch 16, width 64."""
    path, _, _ = biomedclip_file(
        tmp_path_factory.mktemp("teacher"), width=64, depth=2, heads=2, image=64, proj=32
    )
    return str(path)


def _urfm_config(teacher: str, **overrides):
    config = make_tiny_config(**overrides)
    config.image_size = (64, 64)
    config.model.update(variant="vit", in_chans=3)
    config.spatial.enabled = config.frequency.enabled = False
    config.representation.update(enabled=True, ratio=0.5)
    config.representation.decoder.update(width=32, depth=1, num_heads=2)
    config.teacher.update(path=teacher, num_heads=2)
    config.image_every = 0
    return config


@pytest.mark.parametrize("norm", ["xla", "pallas"])
def test_the_teacher_runs_the_models_layer_norm_implementation(teacher_64, norm):
    loaded = teacher_from_config(_urfm_config(teacher_64, **{"model.norm": norm}))
    assert nnx.merge(loaded.graphdef, loaded.params).encoder.norm_implementation == norm


def _batch(config, mesh):
    source = SyntheticUltrasound(config.batch_size, tuple(config.image_size))
    images = np.stack([source[i]["image"] for i in range(config.batch_size)])
    return {"image": jax.device_put(images, parallel.batch_sharding(mesh))}


def test_demo_run_lowers_its_loss_by_30_percent(tmp_path, teacher_64):
    config = urfm_vitb16.get_config("demo,steps=300")
    config.teacher.update(path=teacher_64, num_heads=2)
    validate(config, jax.device_count())
    train.train(config, str(tmp_path / "run"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    first, last = rows[0]["loss_representation"], rows[-1]["loss_representation"]
    assert rows[-1]["step"] == 300 and last < 0.7 * first, (first, last)
    assert glob.glob(str(tmp_path / "run" / "tensorboard" / "events.out.tfevents.*"))


@pytest.mark.parametrize("student", ["mae", "simmim"])
def test_representation_combined_with_the_usfm_losses(teacher_64, student):
    config = _urfm_config(teacher_64)
    config.spatial.enabled = config.frequency.enabled = True
    config.representation.update(student=student, weight=0.5)
    validate(config, jax.device_count())
    mesh = parallel.create_mesh(config.mesh)
    _, _, state, step, _ = create_training(config, mesh)
    batch = _batch(config, mesh)
    for _ in range(2):
        state, metrics = step(state, batch)
    for name in ("loss_spatial", "loss_frequency", "loss_representation"):
        assert np.isfinite(float(metrics[name])) and float(metrics[name]) > 0, name
    assert int(metrics["skipped"]) == 0 and "feature_head" in state.params


def test_teacher_gets_no_gradient_and_never_changes(teacher_64):
    config = _urfm_config(teacher_64)
    mesh = parallel.create_mesh(config.mesh)
    teacher_graphdef, teacher = create_teacher(config, mesh)
    before = jax.tree.map(np.array, teacher)
    tx, schedule = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    graphdef, state, shardings = init_state(config, tx, mesh, features=64)
    raw = make_train_step(
        config, graphdef, None, tx, schedule, create_representation(config), teacher_graphdef
    )
    batch = _batch(config, mesh)
    # no gradient reaches the teacher: d(loss)/d(teacher weights) is exactly zero
    grads = jax.jit(jax.grad(lambda t: raw(state, batch, t)[1]["loss"]))(teacher)
    assert len(jax.tree.leaves(grads)) > 10
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
    # and the compiled step only reads the weights: identical after three updates
    step = jit_train_step(raw, shardings, mesh, jax.tree.map(lambda x: x.sharding, teacher))
    start = jax.tree.map(np.array, state.params)
    for _ in range(3):
        state, metrics = step(state, batch, teacher)
    assert float(metrics["loss_representation"]) > 0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(teacher), strict=True):
        assert np.array_equal(a, np.asarray(b))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), start, state.params)
    moved["encoder"].pop("mask_token")  # the MAE encoder has no use for it
    assert all(jax.tree.leaves(moved["encoder"]))  # while the student trains


def test_mae_student_ignores_the_masked_patches(teacher_64):
    """The MAE encoder sees the kept patches alone: changing the pixels of the others leaves
    the prediction unchanged; changing a kept patch changes it."""
    config = _urfm_config(teacher_64)
    model = create_pretrain_model(config, nnx.Rngs(0), 64)
    images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
    keep = jnp.array([[0, 5, 6, 15], [1, 2, 9, 12]], jnp.int32)
    features = nnx.jit(lambda model, images: model.features(images, keep=keep))
    out = features(model, images)
    assert out.shape == (2, 16, 64)
    masked = images.at[:, 16:32, :16].set(0.0)  # patch 4: not kept in either image
    np.testing.assert_allclose(features(model, masked), out, atol=1e-6)
    visible = images.at[:, :16, :16].set(0.0)  # patch 0: kept in the first image only
    changed = features(model, visible)
    assert not np.allclose(changed[0], out[0], atol=1e-4)
    np.testing.assert_allclose(changed[1], out[1], atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"teacher.path": ""}, r"config\.teacher\.path='': the representation objective needs"),
        ({"teacher.path": "/nonexistent/open_clip.bin"}, r"teacher\.path=.*no such file"),
        ({"model.variant": "beit"}, r"config\.model\.variant='beit'.*absolute positions"),
        ({"representation.loss": "l3"}, r"config\.representation\.loss='l3'"),
        ({"representation.ratio": 1.0}, r"config\.representation\.ratio=1\.0"),
        (  # 16 mask patches: 0.95 rounds up to all of them
            {"representation.ratio": 0.95},
            r"ratio=0\.95: masks all 16 mask patches \(16 px\) .* at most 0\.9375",
        ),
        ({"representation.mask_patch_size": 24}, r"representation\.mask_patch_size=24"),
        ({"teacher.layer": "logits"}, r"config\.teacher\.layer='logits'"),
        (  # 32 USFM views per micro-batch split over 8 devices, but 4 images do not
            {"spatial.enabled": True, "frequency.enabled": True, "optimizer.grad_accum_steps": 4},
            r"config\.batch_size=16: must split evenly over 8 devices",
        ),
    ],
)
def test_bad_representation_settings_name_the_field(teacher_64, overrides, match):
    config = _urfm_config(teacher_64)
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        config[section][field] = value
    with pytest.raises(ConfigError, match=match):
        validate(config, 8)


def test_teacher_of_another_patch_grid_is_a_clear_error(teacher_64, tmp_path):
    """Live, and when its features are cached: a 32x128 student (2x8 patches) has as many
    tokens as the 4x4 teacher, and a cache of them was accepted, misaligned."""
    from usfm_jax.teacher_cache import build_cache

    config = _urfm_config(teacher_64)
    config.image_size = (96, 96)
    with pytest.raises(ConfigError, match=r"teacher .* 4x4 grid .* the student's is 6x6"):
        create_teacher(config, parallel.create_mesh(config.mesh))
    config.image_size = (32, 128)
    with pytest.raises(ConfigError, match=r"teacher .* 4x4 grid .* the student's is 2x8"):
        build_cache(config, str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_teacher_of_another_patch_grid_is_one_line_on_the_command_line(tmp_path, teacher_64):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "usfm_jax.train", "--config", "configs/pretrain/urfm_vitb16.py:demo",
         f"--config.teacher.path={teacher_64}", "--config.teacher.num_heads=2",
         "--config.image_size=(96, 96)", f"--workdir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: teacher "), done.stderr
    assert "4x4 grid of patches" in done.stderr and "the student's is 6x6" in done.stderr


def test_ema_follows_its_formula(teacher_64):
    config = _urfm_config(teacher_64, ema_decay=0.2)
    mesh = parallel.create_mesh(config.mesh)
    _, _, state, step, _ = create_training(config, mesh)
    batch = _batch(config, mesh)
    expected = jax.tree.map(np.array, state.params)  # the EMA starts at the initial weights
    assert all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(expected), jax.tree.leaves(state.ema_params), strict=True))  # fmt: skip
    for n in range(3):  # warmed up: min(0.2, (1 + n) / (10 + n)) = 0.1, 0.18, then 0.2
        state, _ = step(state, batch)
        d = min(0.2, (1 + n) / (10 + n))
        expected = jax.tree.map(
            lambda e, p, d=d: d * e + (1 - d) * np.asarray(p, np.float64), expected, state.params
        )
    for e, got in zip(jax.tree.leaves(expected), jax.tree.leaves(state.ema_params), strict=True):
        np.testing.assert_allclose(np.asarray(got), e, rtol=1e-5, atol=1e-7)


def test_ema_student_is_checkpointed_and_exported_to_timm_vit(tmp_path, teacher_64):
    """The EMA weights travel in checkpoints; export and conversion take them by default, and
    the converted student loads strictly into timm's VisionTransformer with the same tokens."""
    import torch

    from usfm_jax.convert import checkpoint_to_torch
    from usfm_jax.convert.cards import build_timm_model
    from usfm_jax.convert.files import read_state_dict
    from usfm_jax.export import load_params
    from usfm_jax.pretrained import load_pretrained

    config = _urfm_config(teacher_64, ema_decay=0.9, **{"checkpoint.every": 2})
    config.total_steps = 4
    train.train(config, str(tmp_path / "run"))
    ema = load_params(str(tmp_path / "run"))
    raw = load_params(str(tmp_path / "run"), weights="params")
    assert ema.weights == "ema" and raw.weights == "params" and ema.step == 4
    enc_ema, enc_raw = ema.params["encoder"], raw.params["encoder"]
    assert not np.array_equal(enc_ema["norm"]["scale"], enc_raw["norm"]["scale"])
    card = checkpoint_to_torch(str(tmp_path / "run"), "timm-vit", str(tmp_path / "s.safetensors"))
    assert card["source"]["weights"] == "ema"
    assert "feature_head.* (not the encoder's)" in card["not_converted"]
    model = build_timm_model(card).eval()
    state = {k: torch.from_numpy(v) for k, v in read_state_dict(tmp_path / "s.safetensors").items()}
    model.load_state_dict(state, strict=True)
    gray = np.random.default_rng(0).uniform(0, 1, (2, 64, 64, 1)).astype(np.float32)
    x = (gray - 0.5) / 0.25
    with torch.no_grad():
        tokens = model.forward_features(
            torch.from_numpy(np.repeat(x, 3, -1).transpose(0, 3, 1, 2))
        ).numpy()
    flax_tokens = np.asarray(load_pretrained(str(tmp_path / "run"))(jnp.asarray(x)))
    assert np.max(np.abs(tokens - flax_tokens)) < 1e-4


def test_gradient_accumulation_gives_the_whole_batch_step(teacher_64):
    """Micro-batches of the representation views (and of USFM's) add up to the full step."""
    results = []
    for accum in (1, 2):
        config = _urfm_config(teacher_64, **{"optimizer.grad_accum_steps": accum})
        config.spatial.enabled = True
        mesh = parallel.create_mesh(config.mesh)
        _, _, state, step, _ = create_training(config, mesh)
        state, metrics = step(state, _batch(config, mesh))
        results.append((metrics, state.params))
    (m1, p1), (m2, p2) = results
    for name in ("loss", "loss_representation", "loss_spatial", "grad_norm"):
        np.testing.assert_allclose(float(m2[name]), float(m1[name]), rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_precomputed_targets_match_the_live_teacher(tmp_path, teacher_64):
    """A cache of the teacher's features gives the same training as running the teacher, and
    a cache made for other settings is refused."""
    import subprocess
    import sys

    from usfm_jax.models.teacher import load_teacher

    config = _urfm_config(teacher_64, **{"data.num_images": 24, "log_every": 1})
    config.total_steps = 3
    cache = tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "-m", "usfm_jax.teacher_cache", "--config",
         "configs/pretrain/urfm_vitb16.py:demo", f"--config.teacher.path={teacher_64}",
         "--config.teacher.num_heads=2", "--config.data.num_images=24",
         "--config.model.dtype=float32", f"--out={cache}", "--batch=5"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    array = np.load(cache / "targets.npy")
    assert array.shape == (24, 16, 64) and array.dtype == np.float16
    loaded = load_teacher(teacher_64, num_heads=2)
    teacher = nnx.merge(loaded.graphdef, loaded.params)
    source = SyntheticUltrasound(24, (64, 64), seed=config.seed)
    images = np.stack([source[i]["image"] for i in (0, 7, 23)]).astype(np.float32) / 255
    np.testing.assert_allclose(array[[0, 7, 23]], teacher(jnp.asarray(images)), atol=2e-2)

    losses = {}
    for name, targets in (("live", ""), ("cached", str(cache))):
        config.teacher.targets = targets
        validate(config, jax.device_count())
        train.train(config, str(tmp_path / name))
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss_representation"] for line in lines]
    np.testing.assert_allclose(losses["cached"], losses["live"], rtol=2e-3)

    config.teacher.layer = "last_block"
    with pytest.raises(
        ConfigError, match=r"made with config\.teacher\.layer='final_norm'.*'last_block'"
    ):
        validate(config, jax.device_count())
    config.teacher.targets = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no teacher-target cache there"):
        validate(config, jax.device_count())


def test_cache_build_is_data_parallel_over_the_devices(tmp_path, teacher_64):
    """The teacher runs over 3 devices, 4 images a pass rounded up to 6 (a whole share per
    device), the last pass of 1 image padded; or over one, in passes of 4 (the last of 1
    padded to 4): each record's features are the teacher's of its image, run directly."""
    from usfm_jax.models.teacher import load_teacher
    from usfm_jax.teacher_cache import build_cache

    config = _urfm_config(teacher_64, **{"data.num_images": 13})
    loaded = load_teacher(teacher_64, num_heads=2)
    source = SyntheticUltrasound(13, (64, 64), seed=config.seed)
    images = np.stack([source[i]["image"] for i in range(13)]).astype(np.float32) / 255
    expected = nnx.merge(loaded.graphdef, loaded.params)(jnp.asarray(images))
    for devices in (jax.local_devices()[:3], jax.local_devices()[:1]):
        out = tmp_path / f"cache{len(devices)}"
        info = build_cache(config, str(out), batch=4, devices=devices)
        assert info["count"] == 13 and info["shape"] == [13, 16, 64]
        np.testing.assert_allclose(np.load(out / "targets.npy"), expected, atol=2e-2)


def test_cache_identity_follows_teacher_bytes_and_dataset(tmp_path, teacher_64):
    """check_cache against cache.json as written: an ingested dataset's cache is accepted as it
    is (its augmentation's tuples come back as lists), and refused once the teacher file's
    bytes change at the same size, or the dataset is ingested again in place."""
    from usfm_jax.teacher_cache import CACHE_INFO, check_cache, describe

    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(open(teacher_64, "rb").read())  # noqa: SIM115
    dataset = tmp_path / "tfds"
    dataset.mkdir()
    (dataset / "dataset_card.json").write_text(json.dumps({"created": "2026-01-01T00:00:00"}))
    config = _urfm_config(str(teacher), **{"data.source": "tfds", "data.tfds_dir": str(dataset)})
    config.teacher.targets = str(tmp_path / "cache")
    os.makedirs(config.teacher.targets)
    np.save(tmp_path / "cache" / "targets.npy", np.zeros((1, 16, 64), np.float16))
    shape = {"shape": [1, 16, 64], "dtype": "float16"}  # as the writer records them
    (tmp_path / "cache" / CACHE_INFO).write_text(json.dumps({**describe(config), **shape}))
    assert check_cache(config)["data"]["augment"]["crop_scale"] == list(
        config.data.augment.crop_scale
    )
    data = bytearray(teacher.read_bytes())
    data[-1] ^= 1
    teacher.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"made with the teacher file's SHA-256="):
        check_cache(config)
    teacher.write_bytes(open(teacher_64, "rb").read())  # noqa: SIM115
    check_cache(config)
    (dataset / "dataset_card.json").write_text(json.dumps({"created": "2026-02-02T00:00:00"}))
    with pytest.raises(
        ValueError,
        match=r"made with the dataset's creation time \(dataset_card\.json\)='2026-01-01",
    ):
        check_cache(config)
    (dataset / "dataset_card.json").write_text(json.dumps({"created": "2026-01-01T00:00:00"}))
    check_cache(config)
    card = tmp_path / "teacher.json"  # a card beside the weights: it may set heads, input
    card.write_text(json.dumps({"normalization": {"mean": [0.4], "std": [0.3]}}))
    with pytest.raises(ValueError, match=r"made with the SHA-256 of the teacher's card .*=None"):
        check_cache(config)
    card.unlink()
    check_cache(config)
    config.teacher.num_heads = 4  # the teacher's attention splits its width another way
    with pytest.raises(ValueError, match=r"made with config\.teacher\.num_heads=2, this run has 4"):
        check_cache(config)
    written = json.loads((tmp_path / "cache" / CACHE_INFO).read_text())
    del written["teacher"]["num_heads"]  # a cache written before the field was recorded
    (tmp_path / "cache" / CACHE_INFO).write_text(json.dumps(written))
    config.teacher.num_heads = None
    check_cache(config)  # it matches a run that leaves num_heads to the teacher's card
    config.teacher.num_heads = 2
    with pytest.raises(
        ValueError, match=r"made with config\.teacher\.num_heads=None, this run has 2"
    ):
        check_cache(config)
    config.teacher.num_heads = None
    config.seed += 1  # another draw of augmentations: its field, not the cache's key, is named
    with pytest.raises(ValueError, match=rf"made with config\.seed={config.seed - 1}, this run"):
        check_cache(config)
    config.seed -= 1
    array = tmp_path / "cache" / "targets.npy"
    np.save(array, np.zeros((2, 16, 64), np.float16))  # not what cache.json says
    with pytest.raises(ValueError, match=r"holds float16 \[2, 16, 64\], cache\.json says float"):
        check_cache(config)
    with open(array, "r+b") as f:  # cut: found here, not in the data pipeline's threads
        f.truncate(1000)
    with pytest.raises(ValueError, match=r"targets\.npy is damaged \(.*\): rebuild the cache"):
        check_cache(config)


def test_a_cache_of_augmented_views_is_refused_in_one_line(tmp_path, teacher_64):
    """Ingested data with the default (random) augmentation: refused before the teacher
    is loaded, in one line (it was a traceback)."""
    import subprocess
    import sys

    import PIL.Image

    from usfm_jax.data.ingest import Options, ingest

    for organ in ("liver", "kidney"):
        (tmp_path / "exports" / organ).mkdir(parents=True)
        for i in range(3):
            image = SyntheticUltrasound(6, (64, 64), seed=i)[i]["image"][..., 0]
            PIL.Image.fromarray(image).save(tmp_path / "exports" / organ / f"{i}.png")
    card = ingest(str(tmp_path / "exports"), str(tmp_path / "tfds"), "few",
                  Options(resize=0, crop="none"), workers=1)  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "usfm_jax.teacher_cache", "--config",
         "configs/pretrain/urfm_vitb16.py:demo", f"--config.teacher.path={teacher_64}",
         "--config.teacher.num_heads=2", "--config.data.source=tfds",
         f"--config.data.tfds_dir={card['data_dir']}", f"--out={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("error: teacher targets can be precomputed only for views that never change")
    ), done.stderr
    assert not (tmp_path / "cache").exists()


def test_only_identity_augmentation_is_deterministic():
    from usfm_jax.data.augment import AugmentConfig

    identity = dict(crop_scale=(1, 1), crop_ratio=(1, 1), hflip=0, gamma=(1, 1),
                    contrast=(1, 1), brightness=0)  # fmt: skip
    assert AugmentConfig.from_mapping((64, 64), identity).deterministic
    for field, value in [("crop_scale", (0.5, 1)), ("hflip", 0.5), ("crop_ratio", (0.9, 1.1))]:
        assert not AugmentConfig.from_mapping((64, 64), {**identity, field: value}).deterministic


def test_stream_examples_carry_their_record_index():
    """The key of precomputed targets: each example's ``index`` is the record it was made
    from, in every epoch of the shuffled, repeated stream."""
    from usfm_jax.data.pipeline import create_stream

    config = make_tiny_config(**{"data.num_images": 12})
    stream, source = create_stream(config), SyntheticUltrasound(12, (32, 48), seed=config.seed)
    indices = [int(stream[i]["index"]) for i in range(36)]
    for epoch in range(3):
        assert sorted(indices[12 * epoch : 12 * (epoch + 1)]) == list(range(12))
    for i in (3, 17, 30):
        assert np.array_equal(stream[i]["image"], source[indices[i]]["image"])
