"""The in-training probes: kNN and logistic regression against scikit-learn, the held-out set,
and probes logged by a pre-training run."""

from __future__ import annotations

import json

import numpy as np
from conftest import make_tiny_config
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from usfm_jax.data.synthetic import SyntheticUltrasound
from usfm_jax.probe import knn_predict, linear_probe_predict, probe_set
from usfm_jax.train import train


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
