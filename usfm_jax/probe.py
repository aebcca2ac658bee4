"""Representation quality during pre-training: kNN and linear probes of organ classification.

Every ``config.probe.every`` steps the encoder (current parameters, no masking, no drop path)
embeds a small labelled held-out set, the mean of its patch tokens; a weighted kNN classifier
(cosine similarity, votes ``exp(sim / temperature)``, as DINO's) and a logistic-regression probe
(fitted on the probe's train half with full-batch Adam) classify the organs of the test half.
Their accuracy and balanced accuracy go to TensorBoard (``probe/*``) and ``evaluations.jsonl``,
so a run shows its representations improving, not only its loss.

Held-out images: for the synthetic source, images of another seed than the training set's; for
ingested data, a seeded sample of the ``config.probe.split`` split (default ``val``), resized
whole to the training size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from usfm_jax import parallel
from usfm_jax.data import pipeline
from usfm_jax.data.augment import center_resize
from usfm_jax.data.synthetic import SyntheticUltrasound
from usfm_jax.metrics.classification import accuracy, balanced_accuracy

HELD_OUT_SEED_OFFSET = 7919  # synthetic probe images: seed + this, never the training seed


def probe_set(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, 1], organ ids [N]) of the held-out set, N = num_train +
    num_test; the first num_train fit the probes, the rest test them."""
    p, size = config.probe, tuple(config.image_size)
    n = p.num_train + p.num_test
    if config.data.source == "synthetic":
        source = SyntheticUltrasound(n, size, seed=config.seed + HELD_OUT_SEED_OFFSET)
        examples = [source[i] for i in range(n)]
    else:
        split = ml_collections.ConfigDict({"tfds_dir": config.data.tfds_dir, "split": p.split})
        records = pipeline.split_source(split)
        if len(records) < n:
            raise ValueError(
                f"config.probe: the {p.split!r} split holds {len(records)} images, fewer than "
                f"num_train + num_test = {n}"
            )
        order = np.random.default_rng(config.seed).permutation(len(records))[:n]
        examples = []
        for i in order:
            record = records[int(i)]
            image = center_resize(pipeline.decode_image(record["image"]), size)
            examples.append({"image": image[..., None], "organ": record["organ"]})
    images = np.stack([e["image"] for e in examples])
    labels = np.asarray([int(e["organ"]) for e in examples])
    return images, labels


def knn_predict(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, k: int, temperature: float
) -> np.ndarray:
    """Weighted kNN on cosine similarity: each of the k nearest training features votes for its
    class with weight exp(similarity / temperature)."""
    unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sim = unit(test) @ unit(train).T  # [T, N]
    k = min(k, len(train))
    nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # [T, k]
    weights = np.exp(np.take_along_axis(sim, nearest, axis=1) / temperature)
    votes = np.zeros((len(test), int(train_labels.max()) + 1))
    np.add.at(votes, (np.arange(len(test))[:, None], train_labels[nearest]), weights)
    return votes.argmax(1)


def linear_probe_predict(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, steps: int, lr: float = 0.01
) -> np.ndarray:
    """Multinomial logistic regression on standardised features (full-batch Adam, a little
    weight decay), then the test features' classes."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    x, xt = jnp.asarray((train - mean) / std), jnp.asarray((test - mean) / std)
    y = jnp.asarray(train_labels)
    classes = int(train_labels.max()) + 1
    params = {"w": jnp.zeros((x.shape[1], classes)), "b": jnp.zeros(classes)}
    tx = optax.adamw(lr, weight_decay=1e-4)

    def loss(params):
        logits = x @ params["w"] + params["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def fit(params):
        def body(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
        return params

    params = fit(params)
    return np.asarray(jnp.argmax(xt @ params["w"] + params["b"], axis=1))


class OrganProbe:
    """Callable ``probe(params) -> {knn_accuracy, knn_balanced_accuracy, linear_accuracy,
    linear_balanced_accuracy}`` for the pre-training model's parameters."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        graphdef: nnx.GraphDef,
        params_sharding: Any,
        mesh: Mesh,
    ):
        self.config, self.mesh = config, mesh
        images, self.labels = probe_set(config)
        self.examples = [{"image": image} for image in images]
        mean, std = config.normalization.mean, config.normalization.std

        def features(params: dict, images: jax.Array) -> jax.Array:
            x = (images.astype(jnp.float32) / 255.0 - mean) / std
            tokens = nnx.merge(graphdef, params).encoder(x)  # [B, 1 + N, D]
            return tokens[:, 1:].mean(1).astype(jnp.float32)  # [B, D]

        self._features: Callable = parallel.jit_in_mesh(
            features, mesh,
            in_shardings=(params_sharding, parallel.batch_sharding(mesh)),
            out_shardings=parallel.replicated(mesh),
        )  # fmt: skip

    def features(self, params: dict) -> np.ndarray:
        """Mean-pooled encoder features [N, D] of the held-out images."""
        out = []
        for batch in pipeline.padded_batches(self.examples, self.config.batch_size):
            images = pipeline.global_batch_from_whole({"image": batch["image"]}, self.mesh)
            features = jax.device_get(self._features(params, images["image"]))
            out.append(np.asarray(features)[batch["valid"]])
        return np.concatenate(out)

    def __call__(self, params: dict) -> dict[str, float]:
        p = self.config.probe
        f = self.features(params)
        train, test = f[: p.num_train], f[p.num_train :]
        y_train, y_test = self.labels[: p.num_train], self.labels[p.num_train :]
        scores = {}
        for name, predicted in (
            ("knn", knn_predict(train, y_train, test, p.k, p.temperature)),
            ("linear", linear_probe_predict(train, y_train, test, p.linear_steps)),
        ):
            scores[f"{name}_accuracy"] = accuracy(y_test, predicted)
            scores[f"{name}_balanced_accuracy"] = balanced_accuracy(y_test, predicted)
        return scores
