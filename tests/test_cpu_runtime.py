"""The CPU runtime settings: a compiled step stops page-faulting its temporary buffer anew, and
steps compiled for a CPU mesh run their matmuls through oneDNN."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from scipy.special import erf

from usfm_jax import cpu_runtime

# A gradient step whose temporary buffer (~68 MB) is far above glibc's mmap threshold; prints
# the size of that buffer and the minor page faults of each of twelve executions, as JSON.
_PROBE = """
import json, resource, sys
from usfm_jax import cpu_runtime
cpu_runtime.execute_inline()
import jax, jax.numpy as jnp
cpu_runtime.configure_for_backend()
def loss(w1, w2, x):
    return jnp.sum(jnp.tanh(jnp.tanh(x @ w1) @ w2))
step = jax.jit(jax.grad(loss, argnums=(0, 1)))
x = jnp.full((8192, 128), 0.01); w1 = jnp.full((128, 1024), 0.01); w2 = jnp.full((1024, 128), 0.01)
temp = step.lower(w1, w2, x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(w1, w2, x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"temp_pages": temp // 4096, "faults": faults}))
"""


def _probe(setting: str) -> dict:
    env = {**os.environ, cpu_runtime.ENV: setting, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_tuned_runtime_reuses_the_pages_of_the_last_step():
    default, tuned = _probe("default"), _probe("tuned")
    pages = default["temp_pages"]
    assert pages > 8192  # the probe's buffer is large enough to be mmapped by default
    # by default every execution faults in at least its whole temporary buffer again
    assert min(default["faults"]) >= pages
    # tuned, the heap settles within a few executions (it may still grow now and then, as
    # freed blocks fragment) and then touches no new page
    assert statistics.median(tuned["faults"][-6:]) < pages // 20


def test_unknown_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(cpu_runtime.ENV, "fast")
    with pytest.raises(ValueError, match="USFM_CPU_RUNTIME='fast': expected 'tuned' or 'default'"):
        cpu_runtime.execute_inline()


def test_default_setting_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(cpu_runtime.ENV, "default")
    assert cpu_runtime.keep_freed_memory() is False


def test_compiler_options_are_for_one_tuned_cpu_device_executing_inline(monkeypatch):
    cpu = jax.devices("cpu")  # the backend starts with conftest's 8 devices before XLA_FLAGS go
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv(cpu_runtime.ENV, "tuned")
    monkeypatch.setattr(cpu_runtime, "executes_inline", lambda: True)
    assert cpu_runtime.compiler_options(cpu[:1]) == cpu_runtime.CPU_COMPILER_OPTIONS
    assert cpu_runtime.compiler_options(cpu[:2]) == {}  # devices executing in parallel
    other = types.SimpleNamespace(process_index=jax.process_index() + 1, platform="cpu")
    assert cpu_runtime.compiler_options([other, cpu[0]]) == cpu_runtime.CPU_COMPILER_OPTIONS
    for name in ("gpu", "tpu"):
        accelerator = types.SimpleNamespace(process_index=jax.process_index(), platform=name)
        assert cpu_runtime.compiler_options([accelerator]) == {}
    with monkeypatch.context() as m:  # XLA builds oneDNN for x86 only
        m.setattr(platform, "machine", lambda: "aarch64")
        assert cpu_runtime.compiler_options(cpu[:1]) == {}
    with monkeypatch.context() as m:  # asynchronous dispatch
        m.setattr(cpu_runtime, "executes_inline", lambda: False)
        assert cpu_runtime.compiler_options(cpu[:1]) == {}
    # the user's own XLA_FLAGS setting of any of them wins
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=false")
    assert cpu_runtime.compiler_options(cpu[:1]) == {}
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv(cpu_runtime.ENV, "default")
    assert cpu_runtime.compiler_options(cpu[:1]) == {}


# An MLP's gradient (a GELU between two matmuls: a pattern XLA's oneDNN fusion of dots with
# their elementwise neighbours fails to compile), jitted in a mesh of argv[1] devices; prints
# whether it runs through oneDNN, then its gradients, as JSON.
_MESH_STEP = """
import json, sys
from usfm_jax import cpu_runtime
cpu_runtime.execute_inline()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from usfm_jax import parallel
from usfm_jax.models.vit import gelu
n = int(sys.argv[1])
mesh = Mesh(np.asarray(jax.devices()[:n]).reshape(1, n, 1), parallel.MESH_AXES)
rng = np.random.default_rng(0)
x, w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((40, 16), (16, 64), (64, 8)))
loss = lambda w1, w2, x: jnp.sum(gelu(x @ w1) @ w2)
step = parallel.jit_in_mesh(jax.grad(loss, argnums=(0, 1)), mesh)
onednn = "__onednn_fusion" in step.lower(w1, w2, x).compile().as_text()
g1, g2 = step(w1, w2, x)
print(json.dumps({"onednn": onednn, "g1": np.asarray(g1).tolist(), "g2": np.asarray(g2).tolist()}))
"""


@pytest.mark.parametrize("setting, devices", [("tuned", 1), ("tuned", 2), ("default", 1)])
def test_steps_compiled_in_a_mesh_take_the_cpu_options(setting, devices):
    """As the entry points run (``execute_inline``): a 1-device mesh's step runs its matmuls
    through oneDNN when tuned, a 2-device one's does not, and each gives the float64
    reference's numbers."""
    env = {**os.environ, cpu_runtime.ENV: setting, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _MESH_STEP, str(devices)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert result["onednn"] == (setting == "tuned" and devices == 1 and x86)
    rng = np.random.default_rng(0)
    x, w1, w2 = (rng.standard_normal(s) for s in ((40, 16), (16, 64), (64, 8)))
    h = x @ w1
    d_gelu = 0.5 * (1 + erf(h / np.sqrt(2))) + h * np.exp(-(h**2) / 2) / np.sqrt(2 * np.pi)
    g2 = (0.5 * h * (1 + erf(h / np.sqrt(2)))).T @ np.ones((40, 8))
    np.testing.assert_allclose(result["g2"], g2, rtol=1e-4)
    g1 = x.T @ (np.ones((40, 8)) @ w2.T * d_gelu)
    np.testing.assert_allclose(result["g1"], g1, rtol=1e-4, atol=1e-5)


# Jits a step in a mesh of argv[1] devices, calls it three times without waiting and frees it,
# 60 times over: what made XLA:CPU abort in the destructor of an executable with oneDNN
# fusions still in use (object_pool.h), when those were given to every CPU mesh.
_FREE_WHILE_RUNNING = """
import gc, sys
from usfm_jax import cpu_runtime
if sys.argv[2] == "inline":
    cpu_runtime.execute_inline()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from usfm_jax import parallel
n = int(sys.argv[1])
mesh = Mesh(np.asarray(jax.devices()[:n]).reshape(1, n, 1), parallel.MESH_AXES)
x = jax.device_put(jnp.ones((n * 256, 512)), parallel.batch_sharding(mesh))
w = jnp.ones((512, 512))
for i in range(60):
    step = parallel.jit_in_mesh(lambda x, w, i=i: jnp.tanh(jnp.tanh(x @ w + i) @ w) @ w, mesh)
    results = [step(x, w) for _ in range(3)]
    del step
    jax.clear_caches()
    gc.collect()
    del results
print("done")
"""


@pytest.mark.parametrize("devices, dispatch", [(1, "async"), (4, "async"), (4, "inline")])
def test_freeing_a_running_step_does_not_abort(devices, dispatch):
    env = {**os.environ, cpu_runtime.ENV: "tuned", "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    out = subprocess.run(
        [sys.executable, "-c", _FREE_WHILE_RUNNING, str(devices), dispatch],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-2000:]
