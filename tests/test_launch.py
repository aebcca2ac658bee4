"""The launch scripts: lint, --help, the exact commands of --dry-run, and real local runs.

Cluster commands (gcloud, sbatch, srun) are checked through --dry-run only; the local launcher
really starts 2 processes x 2 CPU devices of the trainer for 2 steps.
"""

import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch"))
RUNNABLE = [p for p in SCRIPTS if p.name != "common.sh"]
SHELLCHECK = os.path.join(os.path.dirname(sys.executable), "shellcheck")
ABLATIONS = sorted(p for p in (ROOT / "configs/ablations").glob("*.py") if p.name[0] != "_")

# The tiny run of the real multi-process test: a 1-block ViT of width 32 on 32x32 images, no
# probes.
TINY_RUN = [
    "--config",
    "configs/pretrain/demo.py:steps=2",
    "--config.image_every=0",
    "--config.log_every=1",
    "--config.batch_size=8",
    "--config.model.depth=1",
    "--config.model.width=32",
    "--config.model.num_heads=2",
    "--config.image_size=(32, 32)",
    "--config.probe.every=0",
]


STUB_BIN: Path | None = None  # cluster commands that fail if a test reaches them for real


@pytest.fixture(scope="module", autouse=True)
def stub_cluster_commands(tmp_path_factory):
    global STUB_BIN
    STUB_BIN = tmp_path_factory.mktemp("stub_bin")
    for name in ("gcloud", "sbatch", "srun"):
        stub = STUB_BIN / name
        stub.write_text(f"#!/usr/bin/env bash\necho 'test stub: {name} was run' >&2\nexit 97\n")
        stub.chmod(0o755)


def script_env(**extra: str) -> dict[str, str]:
    """This environment without the test process's fake-device XLA_FLAGS, with stubs for
    gcloud, sbatch and srun first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHON"] = sys.executable
    env["PATH"] = f"{STUB_BIN}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def run(
    script: str, *args: str, env: dict[str, str] | None = None, check: bool = True, timeout=60
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", str(ROOT / script), *args],
        cwd=ROOT,
        env=env or script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def commands(stdout: str) -> list[list[str]]:
    """The printed commands, each split into words as bash would, redirections left off."""
    parsed = []
    for line in stdout.splitlines():
        words = shlex.split(line)
        for end, word in enumerate(words):
            if word in (">", ">>", "|"):
                words = words[:end]
                break
        parsed.append(words)
    return parsed


def trainer_args(words: list[str]) -> list[str]:
    """The words after ``-m usfm_jax.train``."""
    start = words.index("usfm_jax.train")
    assert words[start - 1] == "-m"
    return words[start + 1 :]


def env_of(words: list[str]) -> dict[str, str]:
    """The NAME=VALUE words of an ``env ...`` command."""
    assert words[0] == "env"
    return dict(w.split("=", 1) for w in words[1:] if "=" in w and not w.startswith("-"))


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable bash script that stands in for the trainer's python."""
    path = tmp_path / "fake_python"
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


# --- every script ------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses_and_passes_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    lint = subprocess.run([SHELLCHECK, "-x", str(script)], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_help(script):
    result = run(str(script.relative_to(ROOT)), "--help")
    assert "Usage:" in result.stdout
    assert "--dry-run" in result.stdout


def test_scripts_are_executable():
    for script in RUNNABLE:
        assert os.access(script, os.X_OK), script


# --- launch/local/run.sh -----------------------------------------------------------------


def test_local_dry_run_shows_processes_with_one_coordinator(tmp_path):
    workdir = tmp_path / "run"
    env = script_env(XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d")
    result = run(
        "launch/local/run.sh",
        "--processes=3",
        "--devices-per-process",
        "4",
        "--dry-run",
        "--",
        *TINY_RUN,
        "--workdir",
        str(workdir),
        env=env,
    )
    lines = commands(result.stdout)
    assert lines[0] == ["cd", str(ROOT)]
    assert lines[1] == ["mkdir", "-p", f"{workdir}/logs"]
    assert lines[-1] == ["wait"]
    processes = [words for words in lines if "usfm_jax.train" in words]
    assert len(processes) == 3
    envs = [env_of(words) for words in processes]
    assert [e["USFM_PROCESS_ID"] for e in envs] == ["0", "1", "2"]
    assert {e["USFM_NUM_PROCESSES"] for e in envs} == {"3"}
    coordinators = {e["USFM_COORDINATOR"] for e in envs}
    assert len(coordinators) == 1
    assert coordinators.pop().startswith("127.0.0.1:")
    for e in envs:
        assert e["JAX_PLATFORMS"] == "cpu"
        assert e["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4"
    for words in processes:  # the trainer arguments arrive word for word
        assert trainer_args(words) == [*TINY_RUN, "--workdir", str(workdir)]
    logs = [shlex.split(line.split(" > ")[1])[0] for line in result.stdout.splitlines()[2:-1]]
    assert logs == [f"{workdir}/logs/process_{i}.log" for i in range(3)]
    assert not workdir.exists()  # a dry run runs nothing


def test_local_dry_run_port_and_errors(tmp_path):
    result = run(
        "launch/local/run.sh", "--port", "12345", "--dry-run", "--", "--workdir=w", "--config=c"
    )
    assert "USFM_COORDINATOR=127.0.0.1:12345" in result.stdout
    assert result.stdout.count("usfm_jax.train") == 2  # default: 2 processes
    missing = run("launch/local/run.sh", "--dry-run", "--", "--config", "c", check=False)
    assert missing.returncode != 0 and "--workdir" in missing.stderr
    bad = run("launch/local/run.sh", "--processes", "0", "--", "--workdir", "w", check=False)
    assert bad.returncode != 0 and "--processes" in bad.stderr
    octal = run("launch/local/run.sh", "--processes", "010", "--dry-run", "--", "--workdir=w",
                check=False)  # fmt: skip
    assert octal.returncode == 2 and "(no leading zeros), got '010'" in octal.stderr
    high = run("launch/local/run.sh", "--port=70000", "--dry-run", "--", "--workdir=w", check=False)
    assert high.returncode == 2 and "at most 65535" in high.stderr
    no_value = run("launch/local/run.sh", "--processes", "--", "--workdir=w", check=False)
    assert no_value.returncode == 2 and "--processes needs a value" in no_value.stderr
    with socket.socket() as server:  # a port something listens on
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        python = fake_python(tmp_path, "echo started\n")
        busy = run("launch/local/run.sh", f"--port={port}", "--", "--workdir", tmp_path / "w",
                   env=script_env(PYTHON=python), check=False)  # fmt: skip
    assert busy.returncode == 2 and f"--port {port} is in use" in busy.stderr
    assert not (tmp_path / "w" / "logs").exists()  # nothing started


def test_local_real_run_two_processes_two_devices(tmp_path):
    workdir = tmp_path / "run"
    result = run(
        "launch/local/run.sh",
        "--processes",
        "2",
        "--devices-per-process",
        "2",
        "--",
        *TINY_RUN,
        "--workdir",
        str(workdir),
        timeout=180,
        check=False,
    )
    logs = {p.name: p.read_text() for p in (workdir / "logs").glob("*.log")}
    assert result.returncode == 0, result.stderr + logs.get("process_1.log", "")
    assert sorted(logs) == ["process_0.log", "process_1.log"]
    assert "2 processes x 2 devices" in result.stderr
    assert json.loads((workdir / "summary.json").read_text())["step"] == 2
    assert (workdir / "checkpoints").is_dir()
    assert "step 2" in result.stdout  # process 0's output is streamed


def test_local_failed_process_is_named(tmp_path):
    workdir = tmp_path / "run"
    result = run(
        "launch/local/run.sh",
        "--quiet",
        "--",
        "--config",
        "configs/no_such_config.py",
        "--workdir",
        str(workdir),
        check=False,
    )
    assert result.returncode != 0
    assert "FAILED: process" in result.stderr
    assert "process 0 exited" in result.stderr or "process 1 exited" in result.stderr
    assert "no_such_config.py" in result.stderr  # the end of its log


def test_local_failure_stops_the_other_processes(tmp_path):
    python = fake_python(
        tmp_path,
        'if [[ $USFM_PROCESS_ID == 1 ]]; then echo "process 1 breaks"; exit 3; fi\n'
        "trap 'echo stopped by SIGTERM; exit 0' TERM\n"
        "while true; do sleep 0.1; done\n",
    )
    start = time.monotonic()
    result = run(
        "launch/local/run.sh",
        "--port=1",
        "--quiet",
        "--",
        "--workdir",
        str(tmp_path / "run"),
        env=script_env(PYTHON=python),
        check=False,
    )
    assert result.returncode == 1
    assert time.monotonic() - start < 20
    assert "process 1 exited with status 3" in result.stderr
    assert "process 1 breaks" in result.stderr
    assert "FAILED: process 1 of 2" in result.stderr
    assert "stopped by SIGTERM" in (tmp_path / "run/logs/process_0.log").read_text()


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["SIGTERM", "Ctrl-C"])
def test_local_stop_signal_reaches_every_process(tmp_path, ctrl_c):
    python = fake_python(
        tmp_path,
        "trap 'echo checkpoint and exit; exit 0' TERM\necho ready\n"
        "while true; do sleep 0.1; done\n",
    )
    logs = tmp_path / "run/logs"
    launcher = subprocess.Popen(
        ["bash", "launch/local/run.sh", "--port=1", "--quiet", "--", "--workdir", logs.parent],
        cwd=ROOT,
        env=script_env(PYTHON=python),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(
                (logs / f"process_{i}.log").exists()
                and "ready" in (logs / f"process_{i}.log").read_text()
                for i in range(2)
            ):
                break
            time.sleep(0.1)
        if ctrl_c:  # a terminal sends SIGINT to every process of the foreground group
            os.killpg(launcher.pid, signal.SIGINT)
        else:
            launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=20)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, stderr
    for i in range(2):
        assert "checkpoint and exit" in (logs / f"process_{i}.log").read_text()


# --- launch/tpu --------------------------------------------------------------------------


def tpu(command: str, *args: str, **env: str) -> list[list[str]]:
    result = run("launch/tpu/tpu.sh", command, "--dry-run", *args, env=script_env(**env))
    return commands(result.stdout)


def remote(words: list[str]) -> list[str]:
    """The shell words of a gcloud ssh --command=..."""
    (command,) = [w for w in words if w.startswith("--command=")]
    return shlex.split(command.removeprefix("--command="))


def test_tpu_run_starts_the_trainer_on_every_worker():
    workdir = "gs://bucket/usfm/vitb16"
    (ssh,) = tpu(
        "run",
        "--name",
        "usfm-v5p",
        "--zone=us-east5-a",
        "--env",
        "LIBTPU_INIT_ARGS=--xla_tpu_x=1",
        "--",
        "--config",
        "configs/pretrain/usfm_vitb16.py",
        "--workdir",
        workdir,
        "--config.image_size=(224, 224)",
    )
    assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert "usfm-v5p" in ssh and "--zone=us-east5-a" in ssh and "--worker=all" in ssh
    words = remote(ssh)
    assert words[:3] == ["cd", "usfm_jax", "&&"]
    assert words[3:6] == ["bash", "launch/tpu/worker.sh", "start"]
    assert "LIBTPU_INIT_ARGS=--xla_tpu_x=1" in words
    after = words[words.index("--") + 1 :]
    assert after == [
        "--distributed=on",
        "--config",
        "configs/pretrain/usfm_vitb16.py",
        "--workdir",
        workdir,
        "--config.image_size=(224, 224)",
    ]


def test_tpu_run_multislice_and_wait():
    start, wait = tpu(
        "run", "--name=qr", "--slices=2", "--wait", "--", "--config=c", "--workdir=gs://b/r"
    )
    assert start[:5] == ["gcloud", "compute", "tpus", "queued-resources", "ssh"]
    assert "--node=all" in start and "--worker=all" in start
    assert "--distributed=on" in remote(start)
    assert "--node=0" in wait and "--worker=0" in wait
    assert remote(wait)[-3:] == ["wait", "--job", "train"]


def test_tpu_create_variants():
    (vm,) = tpu("create", "--name", "t", "--accelerator-type", "v5p-64", "--project=p")
    assert vm == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "t",
        "--project=p",
        "--accelerator-type=v5p-64",
        "--version=v2-alpha-tpuv5",
    ]
    (spot,) = tpu("create", "--name=t", "--accelerator-type=v6e-8", "--spot", "--", "--reserved")
    assert "--version=v2-alpha-tpuv6e" in spot and spot[-2:] == ["--spot", "--reserved"]
    (queued,) = tpu("create", "--name=t", "--queued", TPU_ACCELERATOR="v4-32", TPU_ZONE="z")
    assert queued[3:5] == ["queued-resources", "create"]
    assert "--runtime-version=tpu-ubuntu2204-base" in queued and "--node-id=t" in queued
    assert "--zone=z" in queued
    (slices,) = tpu("create", "--name=t", "--slices=4", "--accelerator-type=v5litepod-16")
    assert "--node-count=4" in slices and "--runtime-version=v2-alpha-tpuv5-lite" in slices


def test_tpu_setup_copies_the_tree_and_installs_on_every_worker():
    stdout = run("launch/tpu/tpu.sh", "setup", "--name=t", "--dry-run").stdout
    pack, scp, rm, ssh = commands(stdout)
    git, tar = (shlex.split(part) for part in stdout.splitlines()[0].split(" | "))
    assert git[:4] == ["git", "-C", str(ROOT), "ls-files"] and pack == git
    assert tar[:3] == ["tar", "-C", str(ROOT)]
    tarball = tar[-1]
    assert scp[3:5] == ["tpu-vm", "scp"] and tarball in scp and "--worker=all" in scp
    assert rm == ["rm", "-f", tarball]
    assert "--worker=all" in ssh
    words = remote(ssh)
    assert words[:3] == ["mkdir", "-p", "usfm_jax"] and "tar" in words
    assert words[-3:] == ["bash", "launch/tpu/worker.sh", "setup"]
    (clone,) = tpu("setup", "--name=t", "--repo-url=https://example.com/u.git", "--ref=abc")
    script = " ".join(remote(clone))
    assert "git clone -q https://example.com/u.git usfm_jax" in script
    assert "checkout -q abc" in script and script.endswith("worker.sh setup")


def test_tpu_logs_stop_status_delete():
    (logs,) = tpu("logs", "--name=t", "--worker=3", "--job=sweep1", "--no-follow")
    assert "--worker=3" in logs
    assert remote(logs)[-5:] == ["logs", "--job", "sweep1", "--lines", "100"]
    (stop,) = tpu("stop", "--name=t")
    assert "--worker=all" in stop and remote(stop)[-5:-2] == ["stop", "--job", "train"]
    describe, status = tpu("status", "--name=t")
    assert describe[3:5] == ["tpu-vm", "describe"] and "--worker=all" in status
    (delete,) = tpu("delete", "--name=t", "--yes")
    assert delete[3:] == ["tpu-vm", "delete", "t", "--quiet"]
    (qr,) = tpu("delete", "--name=t", TPU_QUEUED="1")
    assert qr[3:] == ["queued-resources", "delete", "t", "--force"]


def test_tpu_errors():
    assert "--name" in run("launch/tpu/tpu.sh", "run", "--dry-run", check=False).stderr
    no_type = run("launch/tpu/tpu.sh", "create", "--name=t", "--dry-run", check=False)
    assert no_type.returncode != 0 and "--accelerator-type" in no_type.stderr
    odd = run("launch/tpu/tpu.sh", "create", "--name=t", "--accelerator-type=x9", check=False)
    assert odd.returncode != 0 and "--version" in odd.stderr
    dry = run("launch/tpu/tpu.sh", "create", "--name=t", "--accelerator-type=v7-8", "--dry-run",
              check=False)  # fmt: skip
    assert dry.returncode == 2 and "gcloud" not in dry.stdout  # stops: nothing to run
    worker = run("launch/tpu/tpu.sh", "logs", "--name=t", "--worker=-1", "--dry-run", check=False)
    assert worker.returncode == 2 and "--worker must be a whole number" in worker.stderr


def test_tpu_worker_start_status_stop(tmp_path):
    """worker.sh runs on the TPU VMs; here on this machine with a stand-in trainer."""
    python = fake_python(
        tmp_path,
        'echo "args: $*"\ntrap \'echo "SIGTERM: checkpoint"; exit 0\' TERM\n'
        "while true; do sleep 0.1; done\n",
    )
    env = script_env(PYTHON=python)
    common = ["--job", "j1", "--log-dir", str(tmp_path / "logs")]
    dry = run("launch/tpu/worker.sh", "start", *common, "--dry-run", "--", "--workdir", "w")
    assert "nohup" in dry.stdout and not (tmp_path / "logs").exists()
    run("launch/tpu/worker.sh", "start", *common, "--env", "A=1", "--", "--workdir", "w", env=env)
    try:
        again = run("launch/tpu/worker.sh", "start", *common, "--", "w", env=env, check=False)
        assert again.returncode != 0 and "already running" in again.stderr
        assert "is running" in run("launch/tpu/worker.sh", "status", *common).stderr
    finally:
        stopped = run("launch/tpu/worker.sh", "stop", *common, "--timeout=20")
    assert "exited with status 0" in stopped.stderr
    assert run("launch/tpu/worker.sh", "wait", *common).returncode == 0
    log = (tmp_path / "logs/j1.log").read_text()
    assert "args: -m usfm_jax.train --workdir w" in log and "SIGTERM: checkpoint" in log


# --- launch/gpu --------------------------------------------------------------------------


def test_slurm_unknown_option_is_an_error():
    bad = run("launch/gpu/slurm.sbatch", "--bogus", "--dry-run", "--", "--workdir", "w",
              check=False)  # fmt: skip
    assert bad.returncode == 2 and "unknown option '--bogus'" in bad.stderr and not bad.stdout


def test_slurm_dry_run_shows_srun_with_the_trainer():
    args = ["--config", "configs/pretrain/usfm_vitb16.py", "--workdir", "/shared/runs/v"]
    env = script_env(XLA_FLAGS="--xla_gpu_foo=1")
    cd, srun = commands(run("launch/gpu/slurm.sbatch", "--dry-run", "--", *args, env=env).stdout)
    assert cd == ["cd", str(ROOT)]
    assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "env"]
    assert trainer_args(srun) == ["--distributed=on", *args]
    variables = env_of(srun[2:])
    assert variables["XLA_FLAGS"] == (
        "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_foo=1"
    )
    assert variables["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert "JAX_LOCAL_DEVICE_IDS" not in variables


def test_slurm_dry_run_from_environment_and_one_task_per_node():
    env = script_env(
        CONFIG="configs/pretrain/demo.py",
        WORKDIR="/w",
        TRAINER_ARGS="--stop_after=5",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_GPUS_PER_NODE="h100:4",
    )
    _, srun = commands(run("launch/gpu/slurm.sbatch", "--dry-run", env=env).stdout)
    assert trainer_args(srun) == [
        "--distributed=on",
        "--config",
        "configs/pretrain/demo.py",
        "--workdir",
        "/w",
        "--stop_after=5",
    ]
    assert env_of(srun[2:])["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
    missing = run("launch/gpu/slurm.sbatch", "--dry-run", check=False)
    assert missing.returncode != 0 and "CONFIG" in missing.stderr


def test_slurm_batch_script_returns_the_trainer_status(tmp_path):
    """Outside a cluster, with srun and the trainer's python standing in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    python = fake_python(tmp_path, 'echo "trainer $*"; exit 3\n')
    env = script_env(PYTHON=python)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    result = run("launch/gpu/slurm.sbatch", "--", "--workdir", "w", env=env, check=False)
    assert result.returncode == 3
    assert "trainer -m usfm_jax.train --distributed=on --workdir w" in result.stdout


def test_submit_dry_run():
    cd, sbatch = commands(
        run(
            "launch/gpu/submit.sh",
            "--nodes=4",
            "--gpus-per-node",
            "8",
            "--time=48:00:00",
            "--sbatch-arg=--qos=high",
            "--dry-run",
            "--",
            "--config",
            "c.py",
            "--workdir",
            "/shared/runs/vitb16",
        ).stdout
    )
    assert cd == ["cd", str(ROOT)]
    assert sbatch == [
        "sbatch",
        "--job-name=usfm-vitb16",
        "--nodes=4",
        "--gpus-per-node=8",
        "--ntasks-per-node=8",
        "--time=48:00:00",
        "--qos=high",
        "launch/gpu/slurm.sbatch",
        "--",
        "--config",
        "c.py",
        "--workdir",
        "/shared/runs/vitb16",
    ]
    per_node = run("launch/gpu/submit.sh", "--per-node", "--dry-run", "--", "--workdir=w").stdout
    assert "--ntasks-per-node=1" in per_node


def test_single_node_gpu_dry_run():
    _, cmd = commands(
        run("launch/gpu/single_node.sh", "--gpus=0,1", "--dry-run", "--", "--workdir=w").stdout
    )
    assert env_of(cmd)["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert trainer_args(cmd) == ["--distributed=off", "--workdir=w"]


# --- launch/sweep.sh ---------------------------------------------------------------------


def test_sweep_dry_run_one_command_per_ablation():
    result = run(
        "launch/sweep.sh",
        "--workdir-root",
        "runs/ablations",
        "--configs",
        "configs/ablations/*.py",
        "--arg",
        "demo",
        "--dry-run",
        "--",
        "--config.total_steps=100",
    )
    lines = commands(result.stdout)
    assert lines[:2] == [["cd", str(ROOT)], ["mkdir", "-p", "runs/ablations/sweep_logs"]]
    runs = [trainer_args(words) for words in lines[2:]]
    assert len(runs) == len(ABLATIONS) > 10
    workdirs = [args[args.index("--workdir") + 1] for args in runs]
    assert workdirs == [f"runs/ablations/{p.stem}" for p in ABLATIONS]
    for args, path in zip(runs, ABLATIONS, strict=True):
        assert args[args.index("--config") + 1] == f"configs/ablations/{path.name}:demo"
        assert args[-1] == "--config.total_steps=100"


def test_sweep_dry_run_overrides_file(tmp_path):
    overrides = tmp_path / "overrides.txt"
    overrides.write_text(
        "# ratio sweep\n"
        "--config.spatial.ratio=0.4 --config.model.depth=2\n"
        "\n"
        "--config.image_size='(32, 32)'\n"
        "--config.spatial.ratio=0.4 --config.model.depth=2\n"
    )
    result = run(
        "launch/sweep.sh",
        "--workdir-root=gs://b/sweep",
        "--config",
        "configs/pretrain/demo.py",
        "--overrides-file",
        str(overrides),
        "--tpu",
        "my-tpu",
        "--dry-run",
    )
    lines = commands(result.stdout)[1:]
    assert len(lines) == 3
    assert all(words[:3] == ["launch/tpu/tpu.sh", "run", "--name"] for words in lines)
    runs = [words[words.index("--") + 1 :] for words in lines]
    workdirs = [args[3] for args in runs]
    assert len(set(workdirs)) == 3 and all(w.startswith("gs://b/sweep/demo__") for w in workdirs)
    assert runs[0][4:] == ["--config.spatial.ratio=0.4", "--config.model.depth=2"]
    assert runs[1][4:] == ["--config.image_size=(32, 32)"]
    jobs = [words[words.index("--job") + 1] for words in lines]
    assert jobs == [w.rsplit("/", 1)[1] for w in workdirs]
    overrides.write_text("--config.spatial.ratio=0.4 --workdir=/tmp/elsewhere\n")
    redirect = run("launch/sweep.sh", "--workdir-root=w", "--config", "configs/pretrain/demo.py",
                   "--overrides-file", str(overrides), "--dry-run", check=False)  # fmt: skip
    assert redirect.returncode == 2 and "--workdir is set per run" in redirect.stderr
    both = run("launch/sweep.sh", "--workdir-root=w", "--config", "configs/pretrain/demo.py",
               "--local", "--slurm", "--dry-run", check=False)  # fmt: skip
    assert both.returncode == 2 and "--local and --slurm exclude each other" in both.stderr


def test_sweep_continues_past_a_failed_run(tmp_path):
    python = fake_python(
        tmp_path, 'echo "run $*"\nif [[ $* == *spatial_only* ]]; then exit 4; fi\n'
    )
    root = tmp_path / "sweep"
    result = run(
        "launch/sweep.sh",
        "--workdir-root",
        str(root),
        "--config=configs/ablations/spatial_only.py",
        "--config=configs/ablations/dual.py",
        "--configs=configs/ablations/mask_*.py",
        env=script_env(PYTHON=python),
        check=False,
    )
    assert result.returncode == 1
    assert "1 of 3 runs failed: spatial_only" in result.stderr
    assert "dual: ok" in result.stderr and "mask_token: ok" in result.stderr
    logs = sorted(p.name for p in (root / "sweep_logs").iterdir())
    assert logs == ["dual.log", "mask_token.log", "spatial_only.log"]
    assert f"--workdir {root}/dual" in (root / "sweep_logs/dual.log").read_text()
