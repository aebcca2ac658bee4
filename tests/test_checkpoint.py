"""Checkpoints: exact resume after SIGKILL, other device counts, corrupt checkpoints, retention,
divergence, and exporting parameters alone."""

import asyncio
import gc
import glob
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import DEMO_CLI, ROOT, make_tiny_config

from usfm_jax import checkpoint, train
from usfm_jax.checkpoint import CheckpointError, IncompatibleCheckpoint, fingerprint
from usfm_jax.export import export_params, load_params
from usfm_jax.paths import (
    PathError,
    as_path,
    make_directory,
    new_directory,
    new_file,
    work_directory,
)

TOTAL = 24


def _demo(workdir, *extra: str, devices: int = 8, **popen) -> subprocess.Popen:
    """Starts the training CLI on ``devices`` fake CPU devices; stdout carries the step lines."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [*DEMO_CLI, f"--workdir={workdir}", *extra]
    stderr = open(os.path.join(workdir, "stderr.txt"), "a")  # noqa: SIM115
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, **popen
    )


def _finish(proc: subprocess.Popen, workdir) -> None:
    proc.communicate(timeout=600)
    with open(os.path.join(workdir, "stderr.txt")) as f:
        assert proc.returncode == 0, f.read()[-3000:]


def _losses(workdir) -> dict[int, float]:
    """Per-step losses from metrics.jsonl; a step logged twice fails the test."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _steps(workdir) -> list[int]:
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
    """Losses of an uninterrupted demo run on 8 devices."""
    workdir = tmp_path_factory.mktemp("straight")
    _finish(_demo(workdir, f"--config.total_steps={TOTAL}"), workdir)
    return _losses(workdir)


def test_a_checkpoint_that_cannot_be_written_stops_the_run_at_its_first_save(tmp_path):
    """A full disk (here: a file-size limit, which makes every large write fail with EFBIG)
    stops the run at step 1 with a one-line error, not after `every` steps of lost work."""
    limited = (  # the limit set in the child itself: a preexec_fn would fork this JAX process
        "import resource, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000)); "
        "runpy.run_module('usfm_jax.train', run_name='__main__', alter_sys=True)"
    )
    cmd = [sys.executable, "-c", limited, *DEMO_CLI[3:], f"--workdir={tmp_path}",
           "--config.total_steps=12"]  # fmt: skip
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.run(cmd, cwd=ROOT, stderr=stderr, stdout=subprocess.DEVNULL, timeout=600,
                              check=False)  # fmt: skip
    with open(tmp_path / "stderr.txt") as f:  # (orbax logs its background failure too)
        [error] = [line for line in f if line.startswith("error: ")]
    assert proc.returncode == 1
    assert error.startswith(f"error: writing a checkpoint to {tmp_path}/checkpoints failed (")
    assert "File too large" in error and "The checkpoints already there are intact" in error
    # (TensorStore names the errno, 27; the message says it in words)
    assert not _steps(tmp_path) and list(_losses(tmp_path)) == [1]  # stopped at its first save


def _kill_at_step(proc: subprocess.Popen, step: int) -> None:
    for line in proc.stdout:
        if line.startswith(f"step {step}:"):
            break
    proc.kill()
    proc.wait()


def _kill_during_save(proc: subprocess.Popen, workdir) -> str:
    """SIGKILLs the run while an async save is being written; returns what was being written."""
    pattern = os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")
    deadline = time.monotonic() + 300
    while not (writing := glob.glob(pattern)) and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert writing, "no save seen in progress"
    return writing[0]


def test_sigkill_three_times_resumes_bit_exact(tmp_path, straight):
    """Killed at two random steps and once in the middle of a save, and restarted each time:
    the per-step losses equal the uninterrupted run's exactly, each step logged once."""
    seed = int.from_bytes(os.urandom(4), "little")
    first, third = sorted(random.Random(seed).sample(range(2, TOTAL - 1), 2))
    run = lambda: _demo(tmp_path, f"--config.total_steps={TOTAL}", bufsize=1)
    _kill_at_step(run(), first)
    resumed = max(_steps(tmp_path), default=0)  # 0: killed before the first save finished
    writing = _kill_during_save(run(), tmp_path)  # the next save after the resumed step
    assert int(os.path.basename(writing).split(".")[0]) > resumed
    third = max(third, max(_steps(tmp_path), default=0) + 1)
    _kill_at_step(run(), third)
    _finish(run(), tmp_path)
    assert not glob.glob(str(tmp_path / "checkpoints" / "*tmp*")), "partial save left behind"
    pieces = _losses(tmp_path)
    assert pieces == straight, f"seed {seed}: kills at step {first}, in save {writing}, {third}"


@pytest.mark.parametrize("before, after", [(8, 4), (4, 8)])
def test_resume_on_another_device_count(tmp_path, straight, before, after):
    """Saved with one device count, resumed with another: every later loss matches the
    uninterrupted 8-device run within 1e-5 relative."""
    stop = 10
    total = f"--config.total_steps={TOTAL}"
    _finish(_demo(tmp_path, total, f"--stop_after={stop}", devices=before), tmp_path)
    assert max(_steps(tmp_path)) == stop
    _finish(_demo(tmp_path, total, devices=after), tmp_path)
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, TOTAL + 1))
    for step in range(stop + 1, TOTAL + 1):
        np.testing.assert_allclose(losses[step], straight[step], rtol=1e-5, err_msg=f"{step}")


def _tiny(**overrides) -> ml_collections.ConfigDict:
    config = make_tiny_config(
        **{"log_every": 1, "image_every": 0, "checkpoint.every": 3, **overrides}
    )
    config.total_steps = 9
    return config


def _read_numpy(state_dir) -> dict:
    """A saved train state as a dict of numpy arrays, read with orbax alone."""
    checkpointer = ocp.PyTreeCheckpointer()
    to_numpy = ocp.RestoreArgs(restore_type=np.ndarray)
    layout = checkpointer.metadata(state_dir).item_metadata.tree
    restore_args = jax.tree.map(lambda _: to_numpy, layout)
    return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _corrupt(step_dir, how: str) -> None:
    """Damages a checkpoint the way disks and killed copies do."""
    if how == "truncated":  # the largest data file, cut in half
        files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
        largest = max(files, key=os.path.getsize)
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
    elif how == "bit flip":  # one bit of one weight, rewritten in valid orbax format
        state = _read_numpy(os.path.join(step_dir, "state"))
        state["params"]["encoder"]["patch_embed"]["proj"]["kernel"].view(np.uint32)[0, 0] ^= 1 << 9
        shutil.rmtree(os.path.join(step_dir, "state"))
        ocp.PyTreeCheckpointer().save(os.path.join(step_dir, "state"), state)
    elif how == "metadata damaged":  # every metadata file cut in half
        for path in glob.glob(os.path.join(step_dir, "state", "d", "*")):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    elif how == "all data lost":  # every data file emptied, as by a copy killed at its start
        # (Cutting them in half is not enough for a test of the export: it reads only the
        # parameters, and the order in which orbax writes them into the files varies.)
        for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
            os.truncate(path, 0)
    else:  # metadata lost
        os.remove(os.path.join(step_dir, "state", "_METADATA"))


@pytest.fixture(scope="module")
def tiny_straight(tmp_path_factory) -> dict[int, float]:
    """Losses of an uninterrupted tiny run."""
    workdir = tmp_path_factory.mktemp("tiny_straight")
    train.train(_tiny(), str(workdir))
    return _losses(workdir)


# orbax stops its other reads of a truncated checkpoint when one fails; their coroutines raise
# again as they are closed, which Python reports as unraisable (orbax's, not the fallback's)
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*_read_array_index_and_device_put"
    ":pytest.PytestUnraisableExceptionWarning"
)
@pytest.mark.parametrize("how", ["truncated", "bit flip", "metadata lost"])
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, how, caplog, tiny_straight):
    config = _tiny()
    workdir = tmp_path / "damaged"
    train.train(config, str(workdir), stop_after=6)  # saved at 1, 3 and 6
    _corrupt(workdir / "checkpoints" / "6", how)
    with caplog.at_level("WARNING"):
        train.train(config, str(workdir))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    named = [w for w in warnings if f"checkpoint {workdir}/checkpoints/6 is unusable" in w]
    assert named, warnings
    if how == "bit flip":  # readable, but not what was saved
        assert "differ from their saved fingerprint" in named[0]
    set_aside = os.listdir(workdir / checkpoint.UNUSABLE_DIR)
    assert [name.split("-")[0] for name in set_aside] == ["6"]  # moved, not deleted
    assert _losses(workdir) == tiny_straight  # resumed at 3: the same run


def test_all_checkpoints_unusable_is_an_error_naming_them(tmp_path):
    config = _tiny()
    train.train(config, str(tmp_path), stop_after=3)  # saved at 1 and 3
    for step in (1, 3):
        _corrupt(tmp_path / "checkpoints" / str(step), "metadata lost")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*checkpoints/3: .*/1: "):
        train.train(config, str(tmp_path))
    assert _steps(tmp_path) == [1, 3]  # left in place for the user to decide


# What TensorStore says when a bucket is busy, and XLA when the state does not fit the device:
# failures of the machine or the store, which no damaged file produces here on demand.
_ENVIRONMENT_FAILURES = {
    "bucket busy": ValueError(
        'UNAVAILABLE: Error reading "run/checkpoints/6/state/d/0a1b" in GCS bucket: HTTP '
        "response code: 503 with body: Service Unavailable"
    ),
    "device memory": jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.21GiB."
    ),
}


@pytest.mark.parametrize("failure", _ENVIRONMENT_FAILURES)
def test_a_read_failing_for_want_of_memory_or_store_sets_nothing_aside(tmp_path, monkeypatch,
                                                                       failure):  # fmt: skip
    config = _tiny()
    train.train(config, str(tmp_path), stop_after=6)  # saved at 1, 3 and 6
    read = ocp.CheckpointManager.restore

    def failing_read(manager, step, *args, **kwargs):
        if step == 6:
            raise _ENVIRONMENT_FAILURES[failure]
        return read(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_read)
    with pytest.raises(CheckpointError, match=r"checkpoints/6 .*not of the checkpoint"):
        train.train(config, str(tmp_path))
    assert _steps(tmp_path) == [1, 3, 6]  # the newest kept, and not resumed from an older one
    assert not os.path.exists(tmp_path / checkpoint.UNUSABLE_DIR)


def test_environment_failures_are_told_from_damage():
    assert checkpoint.is_environment_failure(MemoryError())
    wrapped = RuntimeError("restore failed")
    wrapped.__cause__ = ValueError("DEADLINE_EXCEEDED: GCS read timed out")
    assert checkpoint.is_environment_failure(wrapped)
    assert checkpoint.is_environment_failure(
        ExceptionGroup("reads", [ValueError("x"), PermissionError("denied")])
    )
    for damage in (
        ValueError('NOT_FOUND: Error opening "zarr" driver: Metadata does not exist'),
        ValueError("DATA_LOSS: Error reading: Unexpected end of data"),
        checkpoint.CorruptCheckpoint("1 array(s) differ from their saved fingerprint"),
        FileNotFoundError("_METADATA"),
    ):
        assert not checkpoint.is_environment_failure(damage), damage


def test_checkpoint_of_another_model_is_an_error_naming_the_first_key(tmp_path):
    train.train(_tiny(), str(tmp_path), stop_after=3)
    first_mismatch = r"opt_state\.\S+\.bias is float32\[32\] there and float32\[64\] here"
    with pytest.raises(IncompatibleCheckpoint, match=first_mismatch):
        train.train(_tiny(**{"model.width": 64}), str(tmp_path))
    assert _steps(tmp_path) == [1, 3]
    # the refused run did not replace the config that describes the checkpoints
    assert json.loads((tmp_path / "config.json").read_text())["model"]["width"] == 32


def test_checkpoint_without_the_ema_of_this_run_names_the_changed_field(tmp_path):
    train.train(_tiny(), str(tmp_path), stop_after=1)
    named = r"ema_params\S* is only in this run's state.*another config \(ema_decay: 0\.0 -> 0\.9\)"
    with pytest.raises(IncompatibleCheckpoint, match=named):
        train.train(_tiny(ema_decay=0.9), str(tmp_path))


def test_resuming_with_another_config_names_the_changed_fields(tmp_path, caplog):
    config = _tiny()
    train.train(config, str(tmp_path), stop_after=3)
    with caplog.at_level("WARNING"):
        train.train(config, str(tmp_path), stop_after=1)  # the same config: nothing to say
    assert not [r for r in caplog.records if "differs from" in r.getMessage()]
    clipped = _tiny()
    assert clipped.optimizer.clip_norm > 0
    clipping_off = _tiny(**{"optimizer.clip_norm": 0.0})  # a mid-run change, not another run
    train.train(clipping_off, str(tmp_path), stop_after=1)
    train.train(clipped, str(tmp_path), stop_after=1)
    caplog.clear()
    changed = _tiny(**{"spatial.ratio": 0.5})
    changed.total_steps = 12
    with caplog.at_level("WARNING"):
        train.train(changed, str(tmp_path), stop_after=1)
    [warning] = [r.getMessage() for r in caplog.records if "differs from" in r.getMessage()]
    assert f"resuming from {tmp_path}/checkpoints/6 " in warning
    assert warning.endswith(": spatial.ratio: 0.6 -> 0.5; total_steps: 9 -> 12")


@pytest.mark.parametrize("workers", [(0, 2), (2, 0)])
@pytest.mark.usefixtures("grain_worker_processes")
def test_resuming_with_another_data_pipeline_keeps_the_checkpoint(tmp_path, caplog, workers,
                                                                  tiny_straight):  # fmt: skip
    """A grain iterator's saved position fits only the pipeline that saved it (worker threads
    and processes save different states): after a change to config.data the stream is opened
    at the restored step instead, which yields the same batches; the checkpoint is kept."""
    before, after = workers
    train.train(_tiny(**{"data.worker_count": before}), str(tmp_path), stop_after=3)
    with caplog.at_level("INFO"):
        train.train(_tiny(**{"data.worker_count": after}), str(tmp_path))
    messages = [r.getMessage() for r in caplog.records]
    assert (
        f"{tmp_path}/checkpoints/3: config.data changed (data.worker_count), so the data "
        "stream is opened at global step 3 instead" in messages
    )
    assert not [m for m in messages if "unusable" in m]
    assert _losses(tmp_path) == tiny_straight


def test_retention_keeps_the_last_n_and_every_kth(tmp_path):
    config = _tiny(**{"checkpoint.every": 1, "checkpoint.keep": 2, "checkpoint.keep_every": 4})
    config.total_steps = 10
    train.train(config, str(tmp_path))
    assert _steps(tmp_path) == [4, 8, 9, 10]


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """From step 5 on every batch holds NaN: those updates are skipped, interval saves wait, and
    after max_bad_steps in a row the run stops with the step-4 checkpoint as its latest."""
    config = _tiny(**{"checkpoint.every": 2, "max_bad_steps": 3})
    clean = train.global_batch
    calls = []

    def poisoned(local, mesh):
        calls.append(1)
        images = local["image"].astype(np.float32)
        if len(calls) >= 5:
            images[0, 0, 0, 0] = np.nan
        return clean({"image": images}, mesh)

    monkeypatch.setattr(train, "global_batch", poisoned)
    with pytest.raises(train.TrainingDiverged, match="3 consecutive steps"):
        train.train(config, str(tmp_path))
    assert _steps(tmp_path) == [1, 2, 4]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in logged] == [0, 0, 0, 0, 1, 1, 1]
    saved = load_params(str(tmp_path)).params
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))


@pytest.mark.usefixtures("grain_worker_processes")
def test_a_run_stopped_by_an_error_finishes_its_save_and_stops_its_data_workers(
    tmp_path, monkeypatch
):
    config = _tiny(**{"checkpoint.every": 2, "data.worker_count": 1})
    clean = train.global_batch
    calls = []

    def failing(local, mesh):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("the data disk went away")
        return clean(local, mesh)

    monkeypatch.setattr(train, "global_batch", failing)
    # held, as by a caller's except block or a notebook: the run's frames stay alive, so
    # garbage collection cannot be what stops the workers
    with pytest.raises(OSError, match="went away") as raised:
        train.train(config, str(tmp_path))
    assert raised.traceback
    assert multiprocessing.active_children() == []  # grain's worker, stopped
    assert _steps(tmp_path) == [1, 2, 4]  # step 4's save, complete: the next run resumes there
    assert load_params(str(tmp_path)).step == 4


def test_divergence_between_two_logging_steps_stops_the_run(tmp_path, monkeypatch):
    """Steps 5-7 hold NaN and step 8 is clean again: the run of 3 skipped steps ended before the
    logging step 8, and still stops the run there (max_bad_steps=3, log_every=4)."""
    config = _tiny(**{"log_every": 4, "checkpoint.every": 4, "max_bad_steps": 3})
    clean = train.global_batch
    calls = []

    def poisoned(local, mesh):
        calls.append(1)
        images = local["image"].astype(np.float32)
        if len(calls) in (5, 6, 7):
            images[0, 0, 0, 0] = np.nan
        return clean({"image": images}, mesh)

    monkeypatch.setattr(train, "global_batch", poisoned)
    with pytest.raises(train.TrainingDiverged, match="3 consecutive steps"):
        train.train(config, str(tmp_path))
    assert len(calls) == 8
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["skipped"], r["bad_steps"]) for r in logged] == [(0, 0), (3, 3)]


def _numpy_fingerprint(x: np.ndarray) -> int:
    """Independent reference: sum of bits * (2i + 1) over the C-order flat index i, mod 2**32."""
    x = np.asarray(x)
    bits = x.astype(np.uint8) if x.dtype == bool else x.view(f"uint{x.dtype.itemsize * 8}")
    weights = 2 * np.arange(x.size, dtype=np.uint64) + 1
    return int((bits.ravel().astype(np.uint64) * weights).sum() % 2**32)


def test_fingerprint_matches_numpy_is_sharding_invariant_and_sees_one_bit():
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.normal(size=(16, 24)).astype(np.float32),
        "bf16": jnp.asarray(rng.normal(size=(8, 3, 5)), jnp.bfloat16),
        "i32": rng.integers(-(2**31), 2**31 - 1, size=(40,), dtype=np.int32),
        "flag": np.array([True, False, True]),
        "scalar": np.float32(3.5),
    }
    got = fingerprint(tree)
    assert got == {k: _numpy_fingerprint(np.asarray(v)) for k, v in tree.items()}
    mesh = jax.make_mesh((8,), ("data",))
    sharded = jax.device_put(tree["f32"], jax.NamedSharding(mesh, jax.P(None, "data")))
    assert fingerprint({"f32": sharded}) == {"f32": got["f32"]}
    flipped = tree["f32"].copy()
    flipped.view(np.uint32)[7, 11] ^= 1 << 30
    assert fingerprint({"f32": flipped})["f32"] != got["f32"]
    swapped = tree["f32"].copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert fingerprint({"f32": swapped})["f32"] != got["f32"]


def test_export_holds_the_parameters_alone_bit_for_bit(tmp_path):
    train.train(_tiny(), str(tmp_path / "run"), stop_after=3)
    state_dir = tmp_path / "run" / "checkpoints" / "3" / "state"
    full = _read_numpy(state_dir)  # the whole train state, read independently
    info = export_params(str(tmp_path / "run"), str(tmp_path / "export"))
    assert info["step"] == 3
    assert info["num_params"] == sum(x.size for x in jax.tree.leaves(full["params"]))
    exported = load_params(str(tmp_path / "export"))
    assert exported.step == 3 and exported.config["model"]["width"] == 32
    for a, b in zip(jax.tree.leaves(exported.params), jax.tree.leaves(full["params"]), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    saved = ocp.PyTreeCheckpointer().metadata(tmp_path / "export" / "params").item_metadata.tree
    assert set(saved) == {"encoder", "head"}  # no optimizer state, no step
    # an export, or a fine-tuning run, is not a pre-training workdir (nor the other way)
    with pytest.raises(PathError, match=r"/export holds an export \(export\.json\): use a new"):
        train.train(_tiny(), str(tmp_path / "export"))
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "config.json").write_text(json.dumps({"task": "classify"}))
    with pytest.raises(PathError, match=r"/tuned holds a fine-tuning run \(python -m usfm_jax"):
        train.train(_tiny(), str(tmp_path / "tuned"))
    assert json.loads((tmp_path / "tuned" / "config.json").read_text()) == {"task": "classify"}
    assert load_params(str(tmp_path / "export")).step == 3
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        export_params(str(tmp_path / "run"), str(tmp_path / "export"))
    with pytest.raises(CheckpointError, match=r"no step 2 in .*; it has steps \[1, 3\]"):
        load_params(str(tmp_path / "run"), step=2)
    # a step set aside as unusable (as the restore names it) can still be read, for inspection
    aside = tmp_path / "run" / checkpoint.UNUSABLE_DIR / "3-20261125-042646"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "3", aside)
    for step in (None, 3):
        inspected = load_params(str(aside), step=step)
        assert inspected.step == 3 and np.array_equal(
            inspected.params["encoder"]["cls_token"], full["params"]["encoder"]["cls_token"]
        )


@pytest.mark.parametrize(
    "out, error",
    [
        ("out", "no checkpoint at {tmp}/nothing: it does not exist"),
        ("file", "--out {tmp}/file is a file: give a directory"),
        ("file/out", "--out {tmp}/file/out: {tmp}/file is a file, not a directory"),
    ],
)
def test_export_cli_reports_a_mistake_in_one_line(tmp_path, out, error):
    (tmp_path / "file").write_text("not a directory")
    cmd = [sys.executable, "-m", "usfm_jax.export", f"--checkpoint={tmp_path}/nothing",
           f"--out={tmp_path}/{out}"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: " + error.format(tmp=tmp_path)
    assert "Traceback" not in result.stderr


def test_a_damaged_checkpoint_is_one_line_without_library_noise(tmp_path):
    train.train(_tiny(), str(tmp_path / "run"), stop_after=1)
    for how, error in [
        ("all data lost", "cannot read {run}/checkpoints/1: ValueError: OUT_OF_RANGE: "),
        ("metadata damaged", "cannot read {run}/checkpoints/1/state: its metadata is missing or"),
    ]:
        run = tmp_path / how.replace(" ", "_")
        shutil.copytree(tmp_path / "run", run)
        _corrupt(run / "checkpoints" / "1", how)
        cmd = [sys.executable, "-m", "usfm_jax.export", f"--checkpoint={run}",
               f"--out={tmp_path}/out"]  # fmt: skip
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()  # no 'Event loop is closed' tracebacks
        assert len(lines) == 1 and lines[0].startswith("error: " + error.format(run=run)), lines


def test_orbax_read_tasks_never_retrieved_are_not_logged(caplog):
    """A failed restore leaves orbax read tasks whose exceptions asyncio logs, with their
    tracebacks, when it collects them: in the middle of the run that goes on from an older
    checkpoint. Those are dropped; another library's are not."""
    checkpoint.drop_closed_event_loop_noise()
    source = "async def read():\n    raise ValueError('OUT_OF_RANGE')\n"
    for where, logged in [(f"{os.sep}site-packages{os.sep}orbax{os.sep}io.py", False),
                          (f"{os.sep}site-packages{os.sep}other{os.sep}io.py", True)]:  # fmt: skip
        namespace = {}
        exec(compile(source, where, "exec"), namespace)
        loop = asyncio.new_event_loop()
        task = loop.create_task(namespace["read"]())
        loop.run_until_complete(asyncio.wait([task]))
        loop.close()
        caplog.clear()
        with caplog.at_level("ERROR", logger="asyncio"):
            del task
            gc.collect()
        found = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
        assert bool(found) == logged and (not found or where in found[0]), (where, found)


def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "kept").write_text("")
    assert str(new_directory(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    assert str(new_directory(tmp_path / "empty")) == str(tmp_path / "empty")
    assert str(work_directory(tmp_path / "full")) == str(tmp_path / "full")  # resumed
    assert str(new_file(tmp_path / "new.pth")) == str(tmp_path / "new.pth")
    with pytest.raises(PathError, match=r"--out .*/full exists and is not empty"):
        new_directory(tmp_path / "full")
    with pytest.raises(PathError, match=r"--out .*/kept is a file"):
        new_directory(tmp_path / "full" / "kept")
    with pytest.raises(PathError, match=r"--workdir .*/kept is a file"):
        work_directory(tmp_path / "full" / "kept")
    with pytest.raises(PathError, match=r"--out .*/kept exists; choose another file name"):
        new_file(tmp_path / "full" / "kept")
    with pytest.raises(PathError, match=r"--out .*/a/x\.pth: directory .*/a does not exist"):
        new_file(tmp_path / "a" / "x.pth")
    for check in (new_directory, work_directory, new_file):
        with pytest.raises(PathError, match="/kept is a file, not a directory"):
            check(tmp_path / "full" / "kept" / "a" / "b")
    assert (tmp_path / "full" / "kept").read_text() == ""  # nothing was touched
    writable = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: str(p) != str(tmp_path) and writable(p, mode))
    with pytest.raises(PathError, match=f"--workdir .*: cannot create it, {tmp_path} is not"):
        work_directory(tmp_path / "a" / "b")
    with pytest.raises(PathError, match=f"--out .*: cannot create it, {tmp_path} is not"):
        new_file(tmp_path / "x.pth")
    assert not (tmp_path / "a").exists()
    with pytest.raises(PathError, match=f"--output {tmp_path} is not writable \\(read-only"):
        work_directory(tmp_path, "--output")  # an existing one (root passes chmod: monkeypatched)
    with pytest.raises(PathError, match=r"--workdir .*/kept/a: cannot create it \(.+\)"):
        make_directory(as_path(tmp_path / "full" / "kept" / "a"), "--workdir")


@pytest.mark.parametrize(
    ("signum", "workers"),
    [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGINT, 2)],
    ids=["SIGTERM", "Ctrl-C", "Ctrl-C, data workers"],
)
def test_a_stop_signal_saves_the_current_step_and_exits_0(tmp_path, signum, workers):
    probe = ("--config.probe.every=1000", "--config.probe.num_train=8", "--config.probe.num_test=8")
    proc = _demo(
        tmp_path, "--config.total_steps=5000", f"--config.data.worker_count={workers}", *probe,
        bufsize=1, start_new_session=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:  # wait until training runs
            if line.startswith("step 10:"):
                break
        os.killpg(proc.pid, signum)  # as a terminal's Ctrl-C: every process of the group
        _finish(proc, tmp_path)
    finally:
        proc.kill()
    # the data workers leave Ctrl-C to the main process, which stops them
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()
    stopped = json.loads((tmp_path / "summary.json").read_text())["step"]
    assert 10 <= stopped < 5000
    assert max(_steps(tmp_path)) == stopped
    with open(tmp_path / "evaluations.jsonl") as f:  # the stop saves first, probes nothing
        assert [json.loads(line)["step"] for line in f] == [1]
    more = _demo(tmp_path, f"--config.total_steps={stopped + 2}")  # the next run continues
    _finish(more, tmp_path)
    assert sorted(_losses(tmp_path))[-3:] == [stopped, stopped + 1, stopped + 2]


def test_load_params_reads_quietly_and_leaves_logging_as_it_was(tmp_path, caplog):
    train.train(_tiny(), str(tmp_path / "run"), stop_after=1)
    filters = list(logging.getLogger("absl").filters)
    with caplog.at_level("INFO"):
        assert load_params(str(tmp_path / "run")).step == 1
    assert not [r.getMessage() for r in caplog.records if "/orbax/" in r.pathname]
    assert logging.getLogger("absl").filters == filters  # the caller's logging, untouched


def test_asking_for_ema_weights_of_a_run_without_them_is_an_error(tmp_path):
    train.train(_tiny(), str(tmp_path / "run"), stop_after=1)
    assert load_params(str(tmp_path / "run")).weights == "params"
    with pytest.raises(CheckpointError, match=r"holds no EMA weights \(config.ema_decay was 0\)"):
        load_params(str(tmp_path / "run"), weights="ema")
