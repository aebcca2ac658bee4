"""Process settings under which XLA:CPU runs a training step at full speed.

XLA:CPU allocates one temporary buffer per execution of a compiled step (1.1 GB for the ViT-tiny
dual step on 8 images, 16 views). Two defaults make that allocation expensive on Linux:

- JAX dispatches CPU executions to a worker thread; glibc gives each thread its own malloc
  arena, and a non-main arena serves any allocation larger than 64 MB with a fresh ``mmap``;
- glibc serves large allocations with ``mmap`` anyway and unmaps them on free.

So every step page-faulted its whole working set anew: ~290,000 minor faults per ViT-tiny step,
~20% of its time (``benchmarks/train_step.py``; docs/benchmarks.md). Executing on the calling
thread and keeping freed memory in the heap for the next step removes them.

And XLA:CPU runs matmuls faster through oneDNN than through its default, YNNPACK (which keeps
the elementwise work, the reductions and the softmax it fuses into attention's first matmul):
~10% off the ViT-tiny step. Those are per-executable options (``compiler_options``), given only
to a computation on one CPU device of this process with executions on the calling thread:
XLA:CPU (jaxlib 0.10.2) aborts the process (``object_pool.h`` "Check failed: available_.size()
== num_created_" in ``OneDnnFusionThunk``'s destructor) when an executable with oneDNN fusions
is freed while one of its executions is still running, which asynchronous dispatch and
several devices executing in parallel both allow.

    cpu_runtime.execute_inline()        # before anything touches a JAX backend
    ...
    cpu_runtime.keep_freed_memory()     # once the backend is known to be the CPU
    jax.jit(step, compiler_options=cpu_runtime.compiler_options(mesh.devices.flat))

Set ``USFM_CPU_RUNTIME=default`` to leave JAX's, XLA's and glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Iterable
from typing import Any

import jax
from absl import logging

ENV = "USFM_CPU_RUNTIME"
# glibc's mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# XLA:CPU's DebugOptions for compiled steps: each matmul on its own through oneDNN. Not the
# "DOT" fusion type, which also fuses elementwise neighbours into oneDNN graphs: with jaxlib
# 0.10.2 oneDNN fails to compile some of those (e.g. gelu(x @ w1) @ w2) and the process aborts.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


def _enabled() -> bool:
    value = os.environ.get(ENV, "tuned").strip().lower()
    if value not in ("tuned", "default"):
        raise ValueError(f"{ENV}={value!r}: expected 'tuned' or 'default'")
    return value == "tuned"


def execute_inline() -> None:
    """Runs CPU executions on the calling thread (``jax_cpu_enable_async_dispatch=False``).

    Read when JAX creates its CPU client: call before anything touches a backend. Python then
    waits for each CPU step instead of running ahead, which costs nothing when the step itself
    occupies every core. Accelerator backends are unaffected."""
    if _enabled():
        jax.config.update("jax_cpu_enable_async_dispatch", False)


def executes_inline() -> bool:
    """Whether CPU executions run on the calling thread (``execute_inline`` was in effect)."""
    return not jax.config.read("jax_cpu_enable_async_dispatch")


def keep_freed_memory() -> bool:
    """Makes glibc serve large allocations from the heap and never return freed memory to the
    system, so that each step reuses the pages of the last one; True if applied.

    The process keeps its peak heap size for its lifetime: meant for a process whose peak is its
    training step. A no-op (False) off glibc, or with ``USFM_CPU_RUNTIME=default``."""
    if not _enabled() or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    # mallopt(3): M_MMAP_MAX 0 disables mmap for large requests; M_TRIM_THRESHOLD -1 disables
    # trimming. Each returns 1 on success.
    applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    if not applied:
        logging.warning("mallopt refused the settings; XLA:CPU steps will page-fault each step")
    return applied


def configure_for_backend() -> None:
    """``keep_freed_memory`` if JAX's default backend is the CPU (initialises the backends)."""
    if jax.default_backend() == "cpu":
        keep_freed_memory()


def compiler_options(devices: Iterable[jax.Device]) -> dict[str, Any]:
    """``jax.jit`` compiler options for a step that runs on ``devices`` (a mesh's, all
    processes'): ``CPU_COMPILER_OPTIONS`` for one x86 CPU device of this process with
    ``execute_inline`` in effect. None elsewhere: off x86 (XLA's oneDNN support is for x86),
    with several local devices or asynchronous dispatch (the abort in this module's docstring),
    with ``USFM_CPU_RUNTIME=default``, or when ``XLA_FLAGS`` names any of them (the user's
    setting is kept)."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    user_set = any(name in os.environ.get("XLA_FLAGS", "") for name in CPU_COMPILER_OPTIONS)
    one_cpu = len(local) == 1 and local[0].platform == "cpu"
    if not (one_cpu and executes_inline() and x86) or user_set or not _enabled():
        return {}
    return dict(CPU_COMPILER_OPTIONS)
