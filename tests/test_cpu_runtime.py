"""The CPU runtime settings: a compiled step stops page-faulting its temporary buffer anew."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys

import pytest

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
