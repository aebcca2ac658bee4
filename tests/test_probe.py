"""The probes: kNN and logistic regression against scikit-learn, the held-out set, probes
logged by a pre-training run, and the same probes of a finished run or PyTorch weights
(python -m usfm_jax.probe)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, make_tiny_config
from flax import nnx
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier

from usfm_jax import parallel
from usfm_jax.config_validation import ConfigError
from usfm_jax.convert import checkpoint_to_torch
from usfm_jax.data.synthetic import SyntheticUltrasound
from usfm_jax.optim import create_optimizer
from usfm_jax.probe import (
    OrganProbe,
    held_out_halves,
    knn_predict,
    linear_probe_predict,
    probe_encoder,
    probe_set,
    settings_for,
)
from usfm_jax.train import train
from usfm_jax.train_step import init_state


def _blobs(seed: int, n: int, dim: int = 16, classes: int = 4, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    labels = rng.integers(classes, size=n)
    return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def test_one_nearest_neighbour_matches_scikit_learn():
    x, y = _blobs(0, 200, spread=3.0)
    xt, _ = _blobs(1, 100, spread=3.0)
    ref = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(x, y).predict(xt)
    np.testing.assert_array_equal(knn_predict(x, y, xt, k=1, temperature=0.07), ref)


def test_weighted_knn_and_linear_probe_classify_separable_features():
    x, y = _blobs(0, 400)
    xt, yt = _blobs(0, 600)
    xt, yt = xt[400:], yt[400:]  # same centres, new points
    assert np.mean(knn_predict(x, y, xt, k=20, temperature=0.07) == yt) > 0.95
    ours = linear_probe_predict(x, y, xt, steps=300)
    ref = LogisticRegression(max_iter=2000).fit(x, y).predict(xt)
    assert np.mean(ours == yt) > 0.95 and np.mean(ours == ref) > 0.95


def test_probe_set_is_held_out_and_labelled():
    config = make_tiny_config()
    config.probe.update(num_train=6, num_test=4)
    images, labels = probe_set(config)
    assert images.shape == (10, 32, 48, 1) and images.dtype == np.uint8
    training = SyntheticUltrasound(10, (32, 48), seed=config.seed)
    assert not any(np.array_equal(images[i], training[i]["image"]) for i in range(10))
    assert set(labels) <= set(range(6)) and len(set(labels)) > 1


def test_held_out_halves_keep_each_patient_study_or_clip_in_one_half():
    """Frames of one cine (one file) or images of one patient in both halves let the probes
    score by recognising them (1.0 on data whose organ carries no signal)."""
    rng = np.random.default_rng(0)
    records = []
    for clip in range(60):  # 8 frames a clip; 40 clips of 10 patients, 10 of studies alone
        patient = f"p{clip // 4}" if clip < 40 else ""
        study = f"s{clip}" if 40 <= clip < 50 else ""
        for _ in range(8):
            records.append({"patient_hash": patient, "study_hash": study, "path_hash": f"f{clip}"})
    order = rng.permutation(len(records))  # the split's record order is not the clips'
    records = [records[i] for i in order]

    def groups(indices):
        return {next(r[k] for k in ("patient_hash", "study_hash", "path_hash") if r[k])
                for r in (records[i] for i in indices)}  # fmt: skip

    for seed in range(5):
        fit, test = held_out_halves(records, 200, 80, seed)
        assert len(fit) == 200 and len(test) == 80 and len(set(fit + test)) == 280
        assert not groups(fit) & groups(test)
    assert held_out_halves(records, 200, 80, 0) == held_out_halves(records, 200, 80, 0)
    one_patient = [{**r, "patient_hash": "p0"} for r in records]
    assert held_out_halves(one_patient, 200, 80, 0) == (held_out_halves(records, 200, 0, 0)[0], [])


def test_organ_probe_scores_mean_pooled_encoder_features():
    """OrganProbe's features are the encoder's mean-pooled patch tokens of the held-out images,
    normalised as in pre-training, in sharded batches with the last one padded (33 images,
    batch 16); its scores are its probes' accuracies on them (against scikit-learn)."""
    config = make_tiny_config()
    config.probe.update(num_train=20, num_test=13, k=3, linear_steps=30)
    mesh = parallel.create_mesh(config.mesh)
    tx, _ = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    graphdef, state, shardings = init_state(config, tx, mesh)
    probe = OrganProbe(config, graphdef, shardings.params, mesh)
    images, labels = probe_set(config)
    x = (images.astype(np.float32) / 255.0 - config.normalization.mean) / config.normalization.std
    tokens = nnx.merge(graphdef, jax.device_get(state.params)).encoder(x)  # [33, 1 + N, D]
    want = np.asarray(tokens)[:, 1:].mean(1)
    features = probe.features(state.params)
    np.testing.assert_allclose(features, want, rtol=1e-4, atol=1e-5)
    scores = probe(state.params)
    train_x, test_x, train_y, test_y = want[:20], want[20:], labels[:20], labels[20:]
    knn = knn_predict(train_x, train_y, test_x, k=3, temperature=config.probe.temperature)
    assert scores["knn_accuracy"] == pytest.approx(accuracy_score(test_y, knn))
    assert scores["knn_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(test_y, knn))
    linear = linear_probe_predict(train_x, train_y, test_x, steps=30)
    assert scores["linear_accuracy"] == pytest.approx(accuracy_score(test_y, linear))


SCORES = ("knn_accuracy", "knn_balanced_accuracy", "linear_accuracy", "linear_balanced_accuracy")


def _probe_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "usfm_jax.probe", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    """A tiny pre-training run that probed at steps 1, 4 and 8: (workdir, its probe rows)."""
    workdir = tmp_path_factory.mktemp("probed")
    config = make_tiny_config(**{"image_every": 0})
    config.probe.update(every=4, num_train=24, num_test=16, k=5, linear_steps=20)
    train(config, str(workdir))
    rows = [json.loads(line) for line in (workdir / "evaluations.jsonl").read_text().splitlines()]
    return workdir, rows


def test_pretraining_logs_probes(probed_run):
    workdir, rows = probed_run
    assert [r["step"] for r in rows] == [1, 4, 8] and {r["evaluation"] for r in rows} == {"probe"}
    for row in rows:
        for name in ("knn_accuracy", "linear_accuracy", "knn_balanced_accuracy"):
            assert 0.0 <= row[name] <= 1.0
    assert any(f.name.startswith("events") for f in (workdir / "tensorboard").iterdir())


def test_probing_a_finished_run_reproduces_its_last_probe(probed_run, tmp_path):
    """python -m usfm_jax.probe on a workdir: the run's held-out set and settings, its newest
    weights, the scores its last in-training probe logged (features from one device instead
    of a sharded batch: the linear probe may differ by a test image)."""
    workdir, rows = probed_run
    result = _probe_cli(f"--model={workdir}", f"--out={tmp_path}/probe.json")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "probe.json").read_text())
    assert written == json.loads(result.stdout)
    assert written["settings"]["image_size"] == [32, 48]
    assert written["settings"]["probe"]["num_train"] == 24
    last = rows[-1]
    assert written["knn_accuracy"] == last["knn_accuracy"]
    assert written["knn_balanced_accuracy"] == last["knn_balanced_accuracy"]
    assert abs(written["linear_accuracy"] - last["linear_accuracy"]) <= 1 / 16
    first = _probe_cli(f"--model={workdir}", "--step=1")  # an earlier checkpoint
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["knn_accuracy"] == rows[0]["knn_accuracy"]


def test_probing_pytorch_weights_scores_as_the_checkpoint_they_came_from(probed_run, tmp_path):
    """The run's encoder converted to a PyTorch file (with its card: the input
    normalisation) and probed on the run's held-out set scores as the checkpoint does."""
    workdir, _ = probed_run
    weights = str(tmp_path / "encoder.safetensors")
    checkpoint_to_torch(str(workdir), "usfm", weights)
    ours = settings_for(str(workdir), None, {})
    assert ours.image_size == (32, 48) and ours.probe.k == 5  # the run's own
    theirs = settings_for(weights, None, {})
    assert theirs.image_size is None and theirs.probe.k == 20  # nothing to take them from
    run_fields = {"image_size": (32, 48), "seed": ours.seed, "probe.num_train": 24,
                  "probe.num_test": 16, "probe.k": 5, "probe.linear_steps": 20}  # fmt: skip
    theirs = settings_for(weights, None, run_fields)
    from_checkpoint, from_torch = probe_encoder(str(workdir), ours), probe_encoder(weights, theirs)
    for name in SCORES:
        assert from_torch[name] == pytest.approx(from_checkpoint[name], abs=1 / 16)
    assert from_torch["knn_accuracy"] == from_checkpoint["knn_accuracy"]


def test_probe_cli_mistakes_are_one_line(probed_run, tmp_path):
    workdir, _ = probed_run
    (tmp_path / "taken.json").write_text("{}")
    for args, error in [
        ([f"--model={tmp_path}/none"], f"no pre-trained model at {tmp_path}/none"),
        ([f"--model={workdir}", "--config.probe.num_train=1"], "config.probe.num_train=1"),
        ([f"--model={workdir}", "--config.batch_size=0"], "config.batch_size=0: expected >= 1"),
        ([f"--model={workdir}", "--config.data.source=tfs"], "config.data.source='tfs'"),
        ([f"--model={workdir}", "--config.data.tfds_dir=/d"], "add --config.data.source=tfds"),
        ([f"--model={workdir}", f"--out={tmp_path}/taken.json"], "taken.json exists"),
    ]:
        result = _probe_cli(*args)
        assert result.returncode == 1, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and error in last, result.stderr
        assert "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="one organ"):
        settings = settings_for(str(workdir), None, {"probe.num_train": 2, "probe.num_test": 1})
        settings.seed = _one_organ_seed(settings)
        probe_encoder(str(workdir), settings)


def _one_organ_seed(settings) -> int:
    """A seed whose 3 held-out images are all of one organ."""
    for seed in range(1000):
        settings.seed = seed
        if len(set(probe_set(settings)[1].tolist())) == 1:
            return seed
    raise AssertionError("no seed gives one organ")
