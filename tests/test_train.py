"""End to end: the train loop writes logs, TensorBoard scalars and image grids, and learns."""

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, make_tiny_config
from flax import nnx
from tensorboardX.proto import event_pb2

from configs.pretrain import demo
from usfm_jax import parallel
from usfm_jax.data.pipeline import create_pretrain_dataset
from usfm_jax.objectives.dual import create_objective
from usfm_jax.optim import create_optimizer
from usfm_jax.patches import patchify, unpatchify
from usfm_jax.paths import as_path
from usfm_jax.reporting import MetricsLog, strict_json
from usfm_jax.train import train
from usfm_jax.train_step import init_state, make_preview


def read_events(workdir: str) -> list[event_pb2.Event]:
    """Parses TensorBoard event files (TFRecord framing: length, crc, payload, crc)."""
    events = []
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
        with open(path, "rb") as f:
            while header := f.read(12):
                (length,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event()
                event.ParseFromString(f.read(length))
                f.read(4)
                events.append(event)
    return events


def test_training_processes_do_not_load_pytorch():
    """tensorboardX imports PyTorch whenever it is installed (as it is here, for the parity
    tests): the training and fine-tuning entry points keep it out of their processes."""
    assert importlib.util.find_spec("torch") is not None
    code = "import sys, usfm_jax.train, usfm_jax.finetune.__main__; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"


def test_train_writes_scalars_images_and_summary(tmp_path):
    config = make_tiny_config()
    means = train(config, str(tmp_path))
    assert np.isfinite(means["loss"]) and means["loss_spatial"] > 0 and means["loss_frequency"] > 0

    values = [v for e in read_events(str(tmp_path)) for v in e.summary.value]
    scalars = {v.tag for v in values if v.HasField("simple_value")}
    assert {"train/loss", "train/loss_spatial", "train/loss_frequency", "train/lr"} <= scalars
    assert {"train/grad_norm", "train/images_per_s"} <= scalars
    images = [v for v in values if v.HasField("image")]
    assert {v.tag for v in images} == {"preview/spatial", "preview/frequency"}
    h, w = config.image_size
    rows, cols = 4, config.num_preview_images  # input / corrupted / prediction / target
    assert all(v.image.height == rows * (h + 2) and v.image.width == cols * (w + 2) for v in images)

    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [4, 8]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 8 and summary["loss"] == logged[-1]["loss"]
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == [32, 48]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"objective.norm_pix": True, "spatial.rule": "mask_token"}],
    ids=["default", "norm_pix,mask_token"],
)
def test_preview_rows_are_input_corrupted_input_prediction_and_target(overrides):
    """Each branch's rows, recomputed from the masking itself under the preview's key
    fold_in(step key, 1): the clean images, their corruption, the model's reconstruction of it
    (per-patch statistics of the target put back with norm_pix) and the clean target."""
    config = make_tiny_config(**overrides)
    mesh = parallel.create_mesh(config.mesh, jax.devices()[:1])
    tx, _ = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    graphdef, state, _ = init_state(config, tx, mesh)
    state = state.replace(step=jnp.int32(5))
    objective = create_objective(config)
    batch = next(iter(create_pretrain_dataset(config, process_index=0, process_count=1)))
    out = jax.device_get(make_preview(config, graphdef, objective)(state, batch))

    images = batch["image"][: config.num_preview_images].astype(np.float32) / 255.0
    mean, std, patch = config.normalization.mean, config.normalization.std, config.model.patch_size
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 5), 1)
    model = nnx.merge(graphdef, state.params)
    grid = (images.shape[1] // patch, images.shape[2] // patch)
    assert set(out) == {"spatial", "frequency"}
    for name, corrupt in (("spatial", objective.spatial), ("frequency", objective.frequency)):
        corrupted, mask = map(np.asarray, corrupt(jnp.asarray(images), key))
        if not (name == "spatial" and config.spatial.rule == "mask_token"):
            mask = np.zeros((len(images), grid[0] * grid[1]), bool)  # no mask token
        pred = np.asarray(model((corrupted - mean) / std, mask), np.float64)  # [n, N, P]
        if config.objective.norm_pix:  # per-patch statistics of the normalised target
            target = np.asarray(patchify((images - mean) / std, patch), np.float64)
            pred = pred * np.sqrt(target.var(-1, keepdims=True) + 1e-6)
            pred = pred + target.mean(-1, keepdims=True)
        pred = np.asarray(unpatchify(pred, patch, grid)) * std + mean
        expected = np.clip(np.stack([images, corrupted, pred, images]), 0, 1)
        np.testing.assert_allclose(out[name], expected, atol=1e-5, err_msg=name)
        if config.spatial.rule != "mask_token" or name == "frequency":
            assert np.abs(out[name][1] - out[name][0]).max() > 0.05  # the corruption shows


def _strict(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_outputs_are_strict_json_with_null_for_undefined_values(tmp_path):
    row = {"step": 3, "auc": float("nan"), "hd95": [1.5, float("inf")], "size": (2, 3)}
    text = strict_json(row)
    assert json.loads(text, parse_constant=_strict) == {
        "step": 3, "auc": None, "hd95": [1.5, None], "size": [2, 3]
    }  # fmt: skip
    log = MetricsLog(as_path(tmp_path / "metrics.jsonl"), 0)
    log.append(row)
    [line] = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=_strict)["auc"] is None


def test_demo_recipe_learns_both_branches(tmp_path):
    """A shortened demo run: each branch's loss falls by at least 30% (the README's claim)."""
    config = demo.get_config("steps=150")
    config.image_every = 0
    train(config, str(tmp_path))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for branch in ("loss_spatial", "loss_frequency"):
        first, last = logged[0][branch], logged[-1][branch]
        assert last < 0.7 * first, (branch, first, last)


def _losses(workdir) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_resumed_run_repeats_the_uninterrupted_losses_bit_for_bit(tmp_path):
    config = make_tiny_config(**{"log_every": 1, "image_every": 0, "checkpoint.every": 3})
    config.total_steps = 8
    train(config, str(tmp_path / "straight"))
    train(config, str(tmp_path / "pieces"), stop_after=3)  # saved at 3
    train(config, str(tmp_path / "pieces"), stop_after=2)  # resumed: 4, 5 (saved at 5)
    train(config, str(tmp_path / "pieces"))  # resumed: 6..8
    straight, pieces = _losses(tmp_path / "straight"), _losses(tmp_path / "pieces")
    assert sorted(pieces) == list(range(1, 9))
    assert pieces == straight  # exact float equality: same state, masks and batches
