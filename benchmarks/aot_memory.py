"""Ahead-of-time compile of the pre-training step for a Cloud TPU topology: per-device memory.

    pip install -r requirements-aot.txt      # requirements.txt + libtpu (the TPU compiler)
    python benchmarks/aot_memory.py                                     # the default table
    python benchmarks/aot_memory.py --topology v5p:2x2x1 --size base --batch_per_device 32
    python benchmarks/aot_memory.py --topology v5e:2x2 --size large --fsdp 1 4 --remat dots

Runs on a machine without TPUs: libtpu describes the topology (``jax.experimental.topologies``)
and XLA:TPU compiles the real train step (``usfm_jax.train_step.make_train_step`` with the run's
shardings, donated state, bf16 compute) for its devices. The train state is never allocated: its
shapes come from ``jax.eval_shape`` of ``train_step.state_initializer``. Memory is XLA's
``memory_analysis()`` of the compiled step, per device: arguments (the state shard, donated and
updated in place, plus the device's slice of the batch), temporaries (activations, gradients,
optimizer scratch, collectives' buffers), outputs not aliased to arguments (the metrics) and the
program itself. Not counted: the host input pipeline and host memory, the runtime's own HBM
reservations, the preview step. "state" is the per-device shard of parameters + Adam moments
computed from the shardings; TFLOP/step/device is XLA's cost_analysis() estimate. A step XLA
cannot fit fails to compile (it rematerialises first, then reports RESOURCE_EXHAUSTED): its row
says so. See docs/aot_memory.md for measured tables.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import math
import os
import re
import sys
import time
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.pretrain import usfm_vitb16
from usfm_jax import parallel
from usfm_jax.objectives.dual import create_objective
from usfm_jax.optim import create_optimizer
from usfm_jax.train_step import (
    abstract_model,
    jit_train_step,
    make_train_step,
    state_initializer,
)

GiB = 2**30

# HBM per chip, GiB (Google Cloud TPU documentation: v4 32 GiB, v5e 16 GiB, v5p 95 GiB,
# v6e (Trillium) 32 GiB). One JAX device per chip: v4 and v5p are compiled as megacore (both
# TensorCores of a chip form one device), as Cloud TPU VMs run them. Keyed by device_kind.
HBM_GIB = {"TPU v4": 32, "TPU v5": 95, "TPU v5p": 95, "TPU v5 lite": 16, "TPU v6 lite": 32}

# Generations whose chips have two TensorCores: compiled with chip_config_name="megacore".
MEGACORE = ("v4", "v5p", "v5")

DEFAULT_TOPOLOGIES = ("v5p:2x2x1", "v4:2x2x1", "v5e:2x2")

SIZE_LETTERS = {"tiny": "T", "small": "S", "base": "B", "large": "L", "huge": "H", "giant": "g"}


def compile_only_environment() -> None:
    """Settings for compiling for a device this machine lacks; before JAX starts a backend.

    Host-side tracing (eval_shape, lowering) runs on the CPU backend: the accelerator is the
    compile target only. libtpu probes the GCE metadata server for the host's accelerator and
    worker list unless told; a compile-only topology needs neither, so these only silence its
    warnings (topology and chip come from --topology, whatever the values here).
    """
    jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def topology_devices(name: str) -> list:
    """The compile-only devices of a TPU topology such as ``v5p:2x2x1`` or ``v5e:2x2``."""
    from jax.experimental import topologies

    generation = name.split(":")[0]
    kwargs = {"chip_config_name": "megacore"} if generation in MEGACORE else {}
    try:
        return list(
            topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices
        )
    except RuntimeError as e:  # JaxRuntimeError is one too
        if "TPU support not installed" in str(e):
            sys.exit(
                "error: libtpu is not installed, so no TPU topology can be described: "
                "pip install -r requirements-aot.txt"
            )
        if "lockfile" in str(e):
            sys.exit(
                "error: another process holds libtpu (/tmp/libtpu_lockfile): wait for it to end, "
                "or run with ALLOW_MULTIPLE_LIBTPU_LOAD=1"
            )
        raise


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as dots


def make_config(size: str, batch: int, fsdp: int, args):
    config = usfm_vitb16.get_config(f"size={size}")
    config.batch_size = batch
    config.mesh.data = -1
    config.mesh.fsdp = fsdp
    config.spatial.enabled = args.objective in ("spatial", "dual")
    config.frequency.enabled = args.objective in ("frequency", "dual")
    config.image_size = (args.image, args.image)
    if args.remat is not None:
        config.model.remat = args.remat
    for item in args.set:
        field, _, value = item.partition("=")
        *parents, name = field.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        if name not in node:
            raise SystemExit(f"error: --set {item}: config has no field {field}")
        node[name] = parse_value(value)
    return config


def shard_bytes(abstract, shardings) -> int:
    """Bytes of one device's shards of a pytree (fsdp_spec only splits dimensions evenly)."""
    sizes = jax.tree.map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize,
        abstract,
        shardings,
    )
    return sum(jax.tree.leaves(sizes))


def flops_of(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend or version reports it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def lower_step(config, devices: list) -> tuple:
    """The real train step of ``config`` for ``devices`` (compile-only ones will do), lowered
    from abstract shapes: (lowered step, mesh, abstract train state, the state's shardings).
    Nothing is allocated."""
    mesh = parallel.create_mesh(config.mesh, devices)
    objective = create_objective(config)
    tx, schedule = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    abstract_state = jax.eval_shape(state_initializer(config, tx))
    shardings = parallel.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
    graphdef = nnx.graphdef(abstract_model(config))
    step = jit_train_step(
        make_train_step(config, graphdef, objective, tx, schedule), shardings, mesh
    )
    state_arg = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )
    h, w = config.image_size
    images = jax.ShapeDtypeStruct(
        (config.batch_size, h, w, 1), jnp.uint8, sharding=parallel.batch_sharding(mesh)
    )
    return step.lower(state_arg, {"image": images}), mesh, abstract_state, shardings


def memory_gib(compiled) -> dict[str, float]:
    """XLA's memory analysis of a compiled step, per device, GiB: arguments, temporaries,
    outputs not aliased to arguments, the program, and their total."""
    mem = compiled.memory_analysis()
    outputs = mem.output_size_in_bytes - mem.alias_size_in_bytes
    parts = {
        "args_gib": mem.argument_size_in_bytes,
        "temp_gib": mem.temp_size_in_bytes,
        "out_gib": outputs,
        "code_gib": mem.generated_code_size_in_bytes,
    }
    return {name: size / GiB for name, size in parts.items()} | {
        "total_gib": sum(parts.values()) / GiB
    }


OOM = re.compile(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def compile_step(topology: str, devices: list, args, size: str, fsdp: int) -> dict:
    """AOT-compiles one configuration; returns the row of the table.

    A step that cannot fit is an answer, not an error: XLA:TPU rematerialises what it can to fit
    the chip, then fails the compile with RESOURCE_EXHAUSTED (CompileTimeHbmOom); the row then
    holds the temporaries it asked for. Other compile errors propagate.
    """
    n = len(devices)
    batch = args.batch_per_device * n
    config = make_config(size, batch, fsdp, args)
    start = time.perf_counter()  # lowering and compilation
    lowered, mesh, abstract_state, shardings = lower_step(config, devices)
    kind = devices[0].device_kind
    hbm = HBM_GIB.get(kind)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    row = {
        "topology": topology,
        "chip": kind,
        "chips": n,
        "model": f"ViT-{SIZE_LETTERS.get(size, size)}/{config.model.patch_size}",
        "params_m": params / 1e6,
        "remat": config.model.get("remat", "none"),
        "batch": batch,
        "mesh": f"{mesh.shape['data']}x{mesh.shape['fsdp']}",
        "state_gib": shard_bytes(abstract_state, shardings) / GiB,
        "hbm_gib": hbm,
    }
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        oom = OOM.search(str(e))
        if not oom:
            raise
        return row | {
            "temp_gib": float(oom.group(1)),
            "fits": f"**no**: XLA needs {oom.group(1)} GiB of temporaries, {oom.group(2)} usable",
            "compile_s": time.perf_counter() - start,
        }
    compile_s = time.perf_counter() - start
    memory = memory_gib(compiled)
    return (
        row
        | memory
        | {
            "fits": "n/a" if hbm is None else ("yes" if memory["total_gib"] <= hbm else "**no**"),
            "tflops": (flops_of(compiled) or float("nan")) / 1e12,
            "compile_s": compile_s,
        }
    )


HEADER = (
    "| topology | chips | model | params | remat | global batch | mesh data x fsdp "
    "| state GiB | arguments GiB | temporaries GiB | total GiB | HBM GiB | fits "
    "| TFLOP/step/device | compile s |"
)


def format_row(r: dict) -> str:
    hbm = "?" if r["hbm_gib"] is None else r["hbm_gib"]
    num = lambda key: f"{r[key]:.2f}" if key in r else "-"
    return (
        f"| {r['topology']} ({r['chip']}) | {r['chips']} | {r['model']} | {r['params_m']:.1f}M "
        f"| {r['remat']} | {r['batch']} | {r['mesh']} | {num('state_gib')} | {num('args_gib')} "
        f"| {num('temp_gib')} | {num('total_gib')} | {hbm} | {r['fits']} | {num('tflops')} "
        f"| {r['compile_s']:.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topology", nargs="+", default=list(DEFAULT_TOPOLOGIES))
    ap.add_argument("--size", nargs="+", default=["base", "large"])
    ap.add_argument("--batch_per_device", type=int, default=32)
    ap.add_argument(
        "--fsdp", nargs="+", default=["1", "all"], help="fsdp axis sizes; 'all': every device"
    )
    ap.add_argument("--objective", choices=("dual", "spatial", "frequency"), default="dual")
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument(
        "--remat", choices=("none", "dots", "full"), default=None, help="default: the config's"
    )
    ap.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="config overrides, e.g. optimizer.grad_accum_steps=2 model.head=transformer",
    )
    args = ap.parse_args()

    compile_only_environment()
    topologies = {name: topology_devices(name) for name in args.topology}  # fails early
    print(
        f"# {datetime.date.today()}, jax {jax.__version__}, libtpu {metadata.version('libtpu')}, "
        f"objective {args.objective}, {args.image}x{args.image}, {args.batch_per_device} images "
        f"per device ({'2 views each' if args.objective == 'dual' else '1 view each'})"
        + (f", --set {' '.join(args.set)}" if args.set else "")
    )
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    failed = False
    for topology, devices in topologies.items():
        for size in args.size:
            for fsdp_arg in args.fsdp:
                fsdp = len(devices) if fsdp_arg == "all" else int(fsdp_arg)
                try:
                    row = compile_step(topology, devices, args, size, fsdp)
                except Exception as e:  # report and go on with the other configurations
                    failed = True
                    message = " ".join(str(e).split())[:300]
                    print(
                        f"| {topology} | {len(devices)} | ViT-{SIZE_LETTERS.get(size, size)} "
                        f"| fsdp={fsdp} | compile failed: {type(e).__name__}: {message} |",
                        flush=True,
                    )
                    continue
                print(format_row(row), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
