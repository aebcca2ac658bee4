"""Several JAX processes on localhost (JAX's distributed runtime, gloo collectives on CPU)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import DEMO_CLI, ROOT

from usfm_jax import distributed
from usfm_jax.export import load_params

TOTAL = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(workdir, processes: int, devices: int, *extra: str) -> None:
    """Runs the training CLI as ``processes`` processes with ``devices`` CPU devices each."""
    cmd = [*DEMO_CLI, f"--config.total_steps={TOTAL}", f"--workdir={workdir}", *extra]
    _launch(cmd, workdir, processes, devices)


def _launch(cmd: list[str], workdir, processes: int, devices: int) -> None:
    """Runs ``cmd`` as ``processes`` processes of one JAX runtime (``distributed.ENV``), with
    ``devices`` CPU devices each; their output goes to workdir/process_I.log."""
    codes = _start([cmd] * processes, workdir, devices)
    for i, code in enumerate(codes):
        with open(os.path.join(workdir, f"process_{i}.log")) as f:
            assert code == 0, f"process {i} of {processes}:\n" + f.read()[-3000:]


def _start(cmds: list[list[str]], workdir, devices: int) -> list[int]:
    """The exit codes of ``cmds[i]`` run as process i of one JAX runtime (one process: none)."""
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    processes = len(cmds)
    if processes > 1:
        env.update(USFM_COORDINATOR=f"127.0.0.1:{_free_port()}", USFM_NUM_PROCESSES=str(processes))
    procs, logs = [], []
    for i, cmd in enumerate(cmds):
        logs.append(open(os.path.join(workdir, f"process_{i}.log"), "w"))  # noqa: SIM115
        env_i = dict(env, USFM_PROCESS_ID=str(i)) if processes > 1 else env
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env_i, stdout=logs[i], stderr=logs[i]))
    try:
        return [p.wait(timeout=600) for p in procs]
    finally:
        for p, log in zip(procs, logs, strict=True):
            p.kill()
            log.close()


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[int, float]:
    """Losses of the demo recipe in one process with 8 devices."""
    workdir = tmp_path_factory.mktemp("one_process")
    _run(workdir, 1, 8)
    return _losses(workdir)


def test_two_processes_match_one_and_their_checkpoint_resumes_in_two_and_one(tmp_path, one_process):
    """2 processes x 4 devices give the 1 x 8 loss curve (each process feeds its block of every
    global batch: had both read the same rows, the losses would differ); the checkpoint they
    write, with one data-iterator state per process, resumes in two processes and in one."""
    _run(tmp_path, 2, 4, "--stop_after=6")
    two = _losses(tmp_path)
    assert sorted(two) == list(range(1, 7))
    for step, loss in two.items():
        np.testing.assert_allclose(loss, one_process[step], rtol=1e-5, err_msg=f"step {step}")
    data = sorted(os.listdir(tmp_path / "checkpoints" / "6" / "data"))
    assert [n for n in data if n.endswith(".json")] == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]

    _run(tmp_path, 2, 4, "--stop_after=2")  # the same processes: each restores its iterator
    _run(tmp_path, 1, 8)  # another process count: the data stream is opened at step 8
    resumed = _losses(tmp_path)
    assert sorted(resumed) == list(range(1, TOTAL + 1))
    for step in range(7, TOTAL + 1):
        np.testing.assert_allclose(resumed[step], one_process[step], rtol=1e-5, err_msg=f"{step}")


def test_processes_started_with_another_command_all_stop_naming_the_difference(tmp_path):
    """Process 1 is given another learning rate and workdir: before, it trained replicated
    parameters of its own, and both processes aborted at their first checkpoint, saying
    nothing of why."""
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    base = [*DEMO_CLI, "--config.total_steps=4", f"--workdir={run}"]
    other = [*base, "--config.optimizer.base_lr=0.5", f"--workdir={elsewhere}"]
    assert _start([base, other], tmp_path, 2) == [1, 1]
    for i in range(2):
        last = (tmp_path / f"process_{i}.log").read_text().strip().splitlines()[-1]
        assert last == (
            "error: 1 of 2 processes were started with another command than process 0 (process "
            f"1: config.optimizer.base_lr: 0.016 -> 0.5, workdir: '{run}' -> '{elsewhere}'): "
            "give every process the same config, overrides and flags"
        ), last
    assert not run.exists() and not elsewhere.exists()


# The demo recipe with its parameters sharded over 4 devices (fsdp): in two processes, each holds
# shards the other does not, and writes them to a checkpoint file of its own.
SHARDED = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.fsdp_min_size=64"]


def test_a_checkpoint_damaged_where_one_process_alone_reads_is_set_aside_by_both(tmp_path):
    """Process 1's shard file of the step-4 checkpoint is cut: its read fails where process
    0's succeeds. Both must agree that the checkpoint is unusable (before, each process's
    orbax barrier met the other's fingerprint reduction and both aborted)."""
    run = [*SHARDED, "--config.checkpoint.every=2", "--config.total_steps=6"]
    _run(tmp_path, 2, 2, *run, "--stop_after=4")
    for path in (tmp_path / "checkpoints" / "4" / "state" / "ocdbt.process_1" / "d").iterdir():
        os.truncate(path, path.stat().st_size // 2)
    _run(tmp_path, 2, 2, *run)
    assert [name.split("-")[0] for name in os.listdir(tmp_path / "unusable_checkpoints")] == ["4"]
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 6
    logs = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
    assert "checkpoints/4 is unusable (unreadable on another process)" in logs[0], logs[0][-3000:]
    assert "checkpoints/4 is unusable (Exception: " in logs[1], logs[1][-3000:]


FINETUNE_CLI = [
    sys.executable, "-m", "usfm_jax.finetune", "--config=configs/finetune/classify.py:steps=4",
    "--config.image_size=(32, 32)", "--config.model.width=32", "--config.model.depth=1",
    "--config.model.num_heads=2", "--config.batch_size=8", "--config.eval_every=2",
    "--config.log_every=2", "--config.data.num_train=16", "--config.data.num_val=8",
    "--config.data.num_test=8", "--config.eval.num_overlays=1",
]  # fmt: skip


def test_a_fine_tune_sharded_over_two_processes_matches_one(tmp_path):
    """Selecting and exporting the best parameters gathers them from both processes (before:
    a fetch of arrays spanning the other process's devices failed, and without fsdp the
    export waited at a barrier only process 0 reached)."""
    cmd = [*FINETUNE_CLI, *SHARDED]
    for n in (1, 2):
        _launch([*cmd, f"--workdir={tmp_path}/run_{n}"], tmp_path / f"logs_{n}", n, 4 // n)
    one, two = (json.loads((tmp_path / f"run_{n}" / "results.json").read_text()) for n in (1, 2))
    assert two["best_step"] == one["best_step"]
    for split in ("val", "test"):
        for metric, value in one[split].items():
            np.testing.assert_allclose(two[split][metric], value, rtol=1e-5, err_msg=metric)
    best = [load_params(str(tmp_path / f"run_{n}" / "best")).params for n in (1, 2)]
    for a, b in zip(jax.tree.leaves(best[0]), jax.tree.leaves(best[1]), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_a_fine_tune_whose_processes_differ_stops_on_every_process(tmp_path):
    cmd = [*FINETUNE_CLI, f"--workdir={tmp_path / 'run'}"]
    assert _start([cmd, [*cmd, "--config.label_fraction=0.5"]], tmp_path, 2) == [1, 1]
    for i in range(2):
        log = (tmp_path / f"process_{i}.log").read_text()
        assert "process 1: config.label_fraction: 1.0 -> 0.5)" in log, log[-2000:]


# Every process holds the same evaluation batch; the mesh's data axis alternates between the
# processes' devices (as a multi-host TPU slice's topology can order them).
INTERLEAVED = """
import numpy as np, jax
from jax.experimental import multihost_utils
from usfm_jax import distributed, parallel
from usfm_jax.data.pipeline import global_batch_from_whole
distributed.initialize("auto")
by_process = [[d for d in jax.devices() if d.process_index == p] for p in (0, 1)]
devices = [d for pair in zip(*by_process, strict=True) for d in pair]
mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 4, 1), parallel.MESH_AXES)
whole = np.arange(24).reshape(8, 3)
batch = global_batch_from_whole({"x": whole}, mesh)["x"]
print("rows", multihost_utils.process_allgather(batch, tiled=True)[:, 0].tolist())
"""


def test_evaluation_batch_keeps_its_row_order_when_processes_interleave(tmp_path):
    """Predictions are compared with the labels the host holds: the global batch built from a
    whole evaluation batch must keep its rows in order whichever devices own them."""
    _launch([sys.executable, "-c", INTERLEAVED], tmp_path, 2, 2)
    for i in range(2):
        log = (tmp_path / f"process_{i}.log").read_text()
        assert "rows [0, 3, 6, 9, 12, 15, 18, 21]" in log, log[-2000:]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"USFM_COORDINATOR": "127.0.0.1:1234"}, "missing USFM_NUM_PROCESSES, USFM_PROCESS_ID"),
        (
            {"USFM_COORDINATOR": "localhost", "USFM_NUM_PROCESSES": "2", "USFM_PROCESS_ID": "0"},
            "USFM_COORDINATOR='localhost': expected host:port",
        ),
        (
            {"USFM_COORDINATOR": "h:1", "USFM_NUM_PROCESSES": "2", "USFM_PROCESS_ID": "2"},
            r"USFM_PROCESS_ID=2 is not in \[0, USFM_NUM_PROCESSES=2\)",
        ),
        (
            {"USFM_COORDINATOR": "h:1", "USFM_NUM_PROCESSES": "two", "USFM_PROCESS_ID": "0"},
            "must be integers",
        ),
    ],
)
def test_incomplete_or_malformed_settings_are_named(monkeypatch, env, message):
    for name in distributed.ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.initialize("auto")


def test_single_process_when_nothing_is_set(monkeypatch):
    for name in distributed.ENV:
        monkeypatch.delenv(name, raising=False)
    distributed.initialize("auto")  # returns without starting a runtime
    distributed.initialize("off")
    with pytest.raises(distributed.DistributedError, match="expected one of"):
        distributed.initialize("maybe")
    assert jax.process_count() == 1


def test_on_without_a_cluster_is_a_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV}
    cmd = [sys.executable, "-m", "usfm_jax.train", "--config=configs/pretrain/demo.py",
           f"--workdir={tmp_path / 'run'}", "--distributed=on"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.startswith("error: --distributed=on: JAX detects no cluster here ("), (
        done.stderr
    )
    assert done.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
