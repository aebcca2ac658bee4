"""The CPU runtime settings: a compiled step stops page-faulting its temporary buffer anew, and
steps compiled for a CPU mesh run their matmuls through oneDNN."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from scipy.special import erf

from usfm_jax import cpu_runtime, parallel
from usfm_jax.models.vit import gelu

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


def test_compiler_options_are_for_the_tuned_cpu_only(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv(cpu_runtime.ENV, "tuned")
    assert cpu_runtime.compiler_options("cpu") == cpu_runtime.CPU_COMPILER_OPTIONS
    assert cpu_runtime.compiler_options("gpu") == {}
    assert cpu_runtime.compiler_options("tpu") == {}
    with monkeypatch.context() as m:  # XLA builds oneDNN for x86 only
        m.setattr(platform, "machine", lambda: "aarch64")
        assert cpu_runtime.compiler_options("cpu") == {}
    # the user's own XLA_FLAGS setting of any of them wins
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=false")
    assert cpu_runtime.compiler_options("cpu") == {}
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv(cpu_runtime.ENV, "default")
    assert cpu_runtime.compiler_options("cpu") == {}


@pytest.mark.parametrize("setting", ["tuned", "default"])
def test_steps_compiled_in_a_mesh_take_the_cpu_options(monkeypatch, setting):
    """An MLP's gradient (a GELU between two matmuls: a pattern XLA's oneDNN fusion of dots
    with their elementwise neighbours fails to compile) runs through oneDNN matmuls when tuned
    and gives the float64 reference's numbers either way. (XLA_FLAGS is left as conftest sets
    it: this test may be the first to start the backend, which must see the 8 fake devices.)"""
    monkeypatch.setenv(cpu_runtime.ENV, setting)
    mesh = Mesh(np.asarray(jax.devices("cpu")[:1]).reshape(1, 1, 1), parallel.MESH_AXES)
    rng = np.random.default_rng(0)
    x, w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((40, 16), (16, 64), (64, 8)))

    def loss(w1, w2, x):
        return jnp.sum(gelu(x @ w1) @ w2)

    step = parallel.jit_in_mesh(jax.grad(loss, argnums=(0, 1)), mesh)
    onednn = setting == "tuned" and platform.machine().lower() in ("x86_64", "amd64")
    assert ("__onednn_fusion" in step.lower(w1, w2, x).compile().as_text()) == onednn
    g1, g2 = step(w1, w2, x)
    x64, w1_64, w2_64 = (a.astype(np.float64) for a in (x, w1, w2))
    h = x64 @ w1_64
    d_gelu = 0.5 * (1 + erf(h / np.sqrt(2))) + h * np.exp(-(h**2) / 2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(
        g2, (0.5 * h * (1 + erf(h / np.sqrt(2)))).T @ np.ones((40, 8)), rtol=1e-4
    )
    np.testing.assert_allclose(
        g1, x64.T @ (np.ones((40, 8)) @ w2_64.T * d_gelu), rtol=1e-4, atol=1e-5
    )
