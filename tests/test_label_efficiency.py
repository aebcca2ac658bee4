"""The label-efficiency study reuses a finished run only for the same weights of its init: an
init whose path now holds other weights (pre-training continued, weights replaced) and a
``--pretrain`` workdir of another config are errors, never silently relabelled."""

from __future__ import annotations

import hashlib
import json
import math

import ml_collections
import pytest
from conftest import make_tiny_config

from configs.finetune import common as finetune_configs
from usfm_jax import label_efficiency
from usfm_jax.export import export_params
from usfm_jax.train import train


def tiny_classify_config() -> ml_collections.ConfigDict:
    """Classification fine-tuning in 2 steps: 32x32 images, a few dozen cases."""
    c = finetune_configs.get_config("classify", "steps=2")
    c.image_size = (32, 32)
    c.batch_size = 8
    c.log_every = c.eval_every = 2
    c.data.update(num_train=16, num_val=8, num_test=8)
    c.eval.num_overlays = 0
    return c


def test_new_weights_of_an_init_are_not_reused_silently(tmp_path):
    """The auditor's scenario: a study, pre-training continues in the init's workdir, the same
    study again must not present the old runs as the new weights'."""
    out = str(tmp_path / "study")
    pre = make_tiny_config(total_steps=2, **{"optimizer.warmup_steps": 1})
    [(name, workdir)] = label_efficiency.pretrain_all([("a", pre)], out)
    config = tiny_classify_config()
    study = lambda: label_efficiency.study(config, [(name, workdir)], [0.5], 1, out)
    study()
    run = tmp_path / "study" / "runs" / "a" / "f0.5" / "s0"
    stamp = (run / "results.json").stat().st_mtime_ns
    label_efficiency.pretrain_all([("a", pre)], out)  # the same config: nothing to do
    study()  # the same weights: reused
    assert (run / "results.json").stat().st_mtime_ns == stamp

    # pre-training continues in the init's workdir: the finished run is of older weights
    pre.total_steps = 3
    train(pre, workdir)
    error = (
        r"s0 was fine-tuned from other weights of init a=.*pretrain/a \(then: step 2, "
        r"fingerprint \w{16}; now: step 3, fingerprint \w{16}\): use another --out for the "
        r"new weights, or remove .*runs/a to fine-tune them again"
    )
    with pytest.raises(ValueError, match=error):  # before any run: scratch's is not started
        label_efficiency.study(config, [("s", "scratch"), (name, workdir)], [0.5], 1, out)
    assert not (tmp_path / "study" / "runs" / "s").exists()
    assert (run / "results.json").stat().st_mtime_ns == stamp

    # --pretrain a= with another config than the one OUT/pretrain/a's final step was written
    # with: not resumed (nothing to do, or more steps of other weights) under this name
    other = make_tiny_config(total_steps=3, **{"optimizer.warmup_steps": 1})
    other.frequency.ratio = 0.5
    error = (
        r"pretrain/a holds step 3 pre-trained with another config than --pretrain a asks for "
        r"\(frequency\.ratio: 0\.4 -> 0\.5\): use another --out"
    )
    with pytest.raises(ValueError, match=error):
        label_efficiency.pretrain_all([("a", other)], out)

    # what the run recorded: the step and fingerprint its init had then
    recorded = json.loads((run / label_efficiency.STUDY_CONFIG).read_text())
    assert recorded["init_identity"]["step"] == 2
    assert label_efficiency.init_identity(workdir)["step"] == 3
    # a run recorded before identities were: its weights are unknown, so it is not reused
    del recorded["init_identity"]
    (run / label_efficiency.STUDY_CONFIG).write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match=r"\(then: none recorded; now: step 3"):
        study()

    # an export is its step and the fingerprint it was exported with
    export_params(workdir, str(tmp_path / "export"))
    exported = label_efficiency.init_identity(str(tmp_path / "export"))
    assert exported["step"] == 3 and len(exported["fingerprint"]) == 16


def test_pytorch_weights_are_identified_by_their_sha256(tmp_path):
    weights = tmp_path / "encoder.safetensors"
    weights.write_bytes(b"first")
    first = label_efficiency.init_identity(str(weights))
    assert first == {"sha256": hashlib.sha256(b"first").hexdigest()}
    weights.write_bytes(b"second")
    assert label_efficiency.init_identity(str(weights)) != first
    assert label_efficiency.init_identity(label_efficiency.SCRATCH) is None


def test_a_continued_study_summarises_the_values_an_uninterrupted_one_does(tmp_path, monkeypatch):
    """A metric without a finite value (HD95 of an empty prediction, PSNR of a perfect one)
    is null in results.json: the records of runs made now and of runs read back agree."""
    finetune = label_efficiency.finetune

    def finetune_with_an_infinite_metric(run, workdir, overrides):
        results = finetune(run, workdir, overrides)
        results["test"]["accuracy"] = float("inf")
        with open(f"{workdir}/results.json", "w") as f:
            f.write(label_efficiency.strict_json(results))
        return results

    monkeypatch.setattr(label_efficiency, "finetune", finetune_with_an_infinite_metric)
    grid = lambda: label_efficiency.run_grid(
        tiny_classify_config(), [("s", "scratch")], [1.0], 1, str(tmp_path / "study")
    )
    [made] = grid()
    [read_back] = grid()  # the finished run, reused
    assert made["test"].keys() == read_back["test"].keys()
    for name, value in made["test"].items():
        assert value == pytest.approx(read_back["test"][name], nan_ok=True), name
    assert math.isnan(made["test"]["accuracy"])
