"""The in-training probes: kNN and logistic regression against scikit-learn, the held-out set,
and probes logged by a pre-training run."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import make_tiny_config
from flax import nnx
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier

from usfm_jax import parallel
from usfm_jax.data.synthetic import SyntheticUltrasound
from usfm_jax.optim import create_optimizer
from usfm_jax.probe import OrganProbe, knn_predict, linear_probe_predict, probe_set
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


def test_pretraining_logs_probes(tmp_path):
    config = make_tiny_config(**{"image_every": 0})
    config.probe.update(every=4, num_train=24, num_test=16, k=5, linear_steps=20)
    train(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "evaluations.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 4, 8] and {r["evaluation"] for r in rows} == {"probe"}
    for row in rows:
        for name in ("knn_accuracy", "linear_accuracy", "knn_balanced_accuracy"):
            assert 0.0 <= row[name] <= 1.0
    assert any(f.name.startswith("events") for f in (tmp_path / "tensorboard").iterdir())
