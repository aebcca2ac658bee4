"""Representation quality: kNN and linear probes of organ classification, during pre-training
and of any encoder afterwards.

Every ``config.probe.every`` steps the encoder (current parameters, no masking, no drop path)
embeds a small labelled held-out set, the mean of its patch tokens; a weighted kNN classifier
(cosine similarity, votes ``exp(sim / temperature)``, as DINO's) and a logistic-regression probe
(fitted on the probe's train half with full-batch Adam) classify the organs of the test half.
Their accuracy and balanced accuracy go to TensorBoard (``probe/*``) and ``evaluations.jsonl``,
so a run shows its representations improving, not only its loss.

Held-out images: for the synthetic source, images of another seed than the training set's; for
ingested data, a seeded sample of the ``config.probe.split`` split (default ``val``), resized
whole to the training size, whose fitting and testing halves share no patient (else study,
else file: no cine's frames in both).

The same probes of a finished run, an export or PyTorch weights (anything ``--config.init``
of fine-tuning takes), e.g. to compare encoders on one's own labelled organs::

    python -m usfm_jax.probe --model runs/demo
    python -m usfm_jax.probe --model usfm_official.pth --config.data.source=tfds \
        --config.data.tfds_dir=/data/tfds/thyroid_us/1.0.0 --out probe.json

A usfm_jax run's own held-out set and probe settings are the defaults (so its last in-training
probe is reproduced; with ``--weights=params`` if the run kept an EMA, which ``auto`` prefers
and the in-training probes do not score); for other weights, those of
``standalone_settings``. ``--config.FIELD`` overrides any of them: ``seed``, ``image_size``,
``data.source``, ``data.tfds_dir``, ``probe.{split,num_train,num_test,k,temperature,
linear_steps}``, ``batch_size``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from flax import nnx
from jax.sharding import Mesh
from ml_collections import config_flags
from tqdm import tqdm

from usfm_jax import parallel
from usfm_jax.checkpoint import CheckpointError
from usfm_jax.cli import run_program, start_jax
from usfm_jax.config_validation import ConfigError, check_data_source, check_probe, field_value
from usfm_jax.convert import ConversionError
from usfm_jax.data import pipeline
from usfm_jax.data.augment import resize_whole
from usfm_jax.data.synthetic import SyntheticUltrasound
from usfm_jax.metrics.classification import accuracy, balanced_accuracy
from usfm_jax.paths import PathError, as_path, new_file
from usfm_jax.pretrained import load_pretrained, torch_weights_file
from usfm_jax.reporting import quiet_library_logs, strict_json

# what ties ingested records together, the strongest first: a patient, a study, a file (cine)
GROUP_KEYS = ("patient_hash", "study_hash", "path_hash")
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
        fit, test = held_out_halves(records, p.num_train, p.num_test, config.seed)
        if len(fit) < p.num_train or len(test) < p.num_test:
            raise ValueError(
                f"config.probe: the {p.split!r} split gives {len(fit)} images to fit the "
                f"probes and {len(test)} of other patients (or files) to test them, fewer than "
                f"num_train = {p.num_train} / num_test = {p.num_test}: lower them"
            )
        examples = []
        for i in fit + test:
            record = records[i]
            image = resize_whole(pipeline.decode_image(record["image"]), size)
            examples.append({"image": image[..., None], "organ": record["organ"]})
    images = np.stack([e["image"] for e in examples])
    labels = np.asarray([int(e["organ"]) for e in examples])
    return images, labels


def held_out_halves(
    records: Sequence[Mapping[str, Any]], num_train: int, num_test: int, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of the records that fit the probes (``num_train``) and of those that test them
    (up to ``num_test``), drawn in a seeded order: each group (a patient, else a study, else a
    file: the frames of one cine) joins one half, the less filled when it first comes, so that
    the probes cannot score by recognising it."""
    fit: list[int] = []
    test: list[int] = []
    half_of: dict[Any, list[int]] = {}
    for i in map(int, np.random.default_rng(seed).permutation(len(records))):
        if len(fit) == num_train and len(test) == num_test:
            break
        record = records[i]
        group = next(((k, record[k]) for k in GROUP_KEYS if record.get(k)), i)  # none: its own
        if group not in half_of:  # a new group joins the half that is less filled
            half_of[group] = test if len(test) * num_train < len(fit) * num_test else fit
        half = half_of[group]
        if len(half) < (num_train if half is fit else num_test):
            half.append(i)
    return fit, test


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


def pooled_features(
    encoder: Callable[[jax.Array], jax.Array], images: jax.Array, mean: Any, std: Any
) -> jax.Array:
    """The probes' features [B, D] of uint8 images [B, H, W, 1]: the mean of the patch tokens
    of ``encoder`` on them, normalised with its input ``mean`` and ``std``."""
    x = (images.astype(jnp.float32) / 255.0 - np.asarray(mean)) / np.asarray(std)
    return encoder(x)[:, 1:].mean(1).astype(jnp.float32)  # [B, 1 + N, D] -> [B, D]


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
            return pooled_features(nnx.merge(graphdef, params).encoder, images, mean, std)

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
        return probe_scores(self.features(params), self.labels, self.config.probe)


def probe_scores(
    features: np.ndarray, labels: np.ndarray, p: ml_collections.ConfigDict
) -> dict[str, float]:
    """Accuracy and balanced accuracy of the kNN and linear probes fitted on the first
    ``p.num_train`` of ``features`` [N, D] and tested on the rest."""
    train, test = features[: p.num_train], features[p.num_train :]
    y_train, y_test = labels[: p.num_train], labels[p.num_train :]
    scores = {}
    for name, predicted in (
        ("knn", knn_predict(train, y_train, test, p.k, p.temperature)),
        ("linear", linear_probe_predict(train, y_train, test, p.linear_steps)),
    ):
        scores[f"{name}_accuracy"] = accuracy(y_test, predicted)
        scores[f"{name}_balanced_accuracy"] = balanced_accuracy(y_test, predicted)
    return scores


# What a standalone probe takes from a usfm_jax run's config (the rest: standalone_settings).
RUN_FIELDS = ("seed", "image_size", "data.source", "data.tfds_dir", "probe.split",
              "probe.num_train", "probe.num_test", "probe.k", "probe.temperature",
              "probe.linear_steps")  # fmt: skip


def standalone_settings() -> ml_collections.ConfigDict:
    """Held-out set and probe settings of ``python -m usfm_jax.probe`` for weights without a
    run config (``image_size`` None: the encoder's own)."""
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            image_size=ml_collections.config_dict.placeholder(tuple),
            data=dict(source="synthetic", tfds_dir=""),
            probe=dict(
                num_train=1024,
                num_test=512,
                k=20,
                temperature=0.07,
                linear_steps=300,
                split="val",
            ),
            batch_size=64,
        )
    )


def settings_for(
    model: str, step: int | None, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """The probe settings for ``model``: a usfm_jax run's own (``RUN_FIELDS`` of the config it
    was trained with), else ``standalone_settings()``; then ``overrides`` (dotted fields)."""
    from usfm_jax.export import find_checkpoint, read_record  # export imports this module

    settings = standalone_settings()
    root = as_path(model)
    if root.exists() and torch_weights_file(root) is None:  # a usfm_jax checkpoint or export
        run = read_record(find_checkpoint(model, step)).config
        for field in RUN_FIELDS:
            value = field_value(run, field)
            if value is not None:
                _set(settings, field, tuple(value) if field == "image_size" else value)
    for field, value in overrides.items():
        _set(settings, field, value)
    return settings


def probe_encoder(
    model: str,
    settings: ml_collections.ConfigDict,
    *,
    step: int | None = None,
    weights: str = "auto",
) -> dict[str, Any]:
    """kNN and linear probe scores of the encoder at ``model`` (mean-pooled patch tokens)
    on the held-out set ``settings`` describe."""
    if settings.batch_size < 1:
        raise ConfigError(f"config.batch_size={settings.batch_size}: expected >= 1")
    encoder = load_pretrained(model, image_size=settings.image_size, step=step, weights=weights)
    if settings.image_size is None:
        settings.image_size = tuple(g * encoder.patch_size for g in encoder.grid)
    check_data_source(settings, pipeline.SOURCES)
    check_probe(settings)
    images, labels = probe_set(settings)
    if len(set(labels.tolist())) < 2:
        raise ConfigError(
            "the held-out images hold one organ: the probes classify organs (config.probe)"
        )
    norm = encoder.normalization
    graphdef, params = nnx.split(encoder)

    @jax.jit
    def features(params: Any, images: jax.Array) -> jax.Array:
        return pooled_features(nnx.merge(graphdef, params), images, norm.mean, norm.std)

    examples = [{"image": image} for image in images]
    out = []
    batches = pipeline.padded_batches(examples, settings.batch_size)
    for batch in tqdm(
        batches, desc="features", unit="batch", total=-(-len(images) // settings.batch_size)
    ):
        out.append(np.asarray(features(params, batch["image"]))[batch["valid"]])
    scores = probe_scores(np.concatenate(out), labels, settings.probe)
    return {"model": model, "settings": settings.to_dict(), **scores}


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    for part in parents:
        config = config[part]
    config[name] = value


def main(argv: list[str]) -> None:
    del argv  # parse_flags refuses positional arguments
    quiet_library_logs()
    f = flags.FLAGS
    try:
        if f.out:
            new_file(f.out)
        start_jax()
        overrides = config_flags.get_override_values(f["config"])
        settings = settings_for(f.model, f.step, overrides)
        result = probe_encoder(f.model, settings, step=f.step, weights=f.weights)
    except (CheckpointError, ConfigError, ConversionError, FileNotFoundError, PathError,
            ValueError) as e:  # fmt: skip
        sys.exit(f"error: {e}")
    text = strict_json(result, indent=2)
    if f.out:
        as_path(f.out).write_text(text)
    print(text)


if __name__ == "__main__":  # flags defined here: the module is imported by training
    flags.DEFINE_string("model", None, "A workdir, step, export or PyTorch weights file.")
    flags.DEFINE_integer("step", None, "The checkpoint step of a workdir (default: newest).")
    flags.DEFINE_enum("weights", "auto", ["auto", "params", "ema"], "A run's raw or EMA weights.")
    flags.DEFINE_string("out", None, "Also write the scores to this new JSON file.")
    config_flags.DEFINE_config_dict("config", standalone_settings(), "Probe settings.")
    flags.mark_flags_as_required(["model"])
    run_program(main, lambda: "nothing was written")
