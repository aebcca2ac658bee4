"""Ahead-of-time compile of the pre-training step for an NVIDIA GPU, on a machine without one.

    python3 -m venv /tmp/gpuaot && /tmp/gpuaot/bin/pip install -r requirements-gpu-aot.txt
    /tmp/gpuaot/bin/python benchmarks/gpu_aot.py --size base --batch-per-device 128 \\
        --attention pallas --mlp pallas
    /tmp/gpuaot/bin/python benchmarks/gpu_aot.py --variants benchmarks/variants/gpu_pallas.txt

XLA:GPU compiles the real train step for the GPU a target description names
(``benchmarks/gpu_targets/h100_sxm.txtpb``), through JAX's PJRT topology API, with neither GPU
nor driver. A configuration is given in ``benchmarks/train_step.py``'s options (a variants file
has one per line), so what a GPU session will time can be checked before its time is spent:

- that the step compiles for the GPU: the Pallas kernels through jaxlib's own Triton, cuDNN's
  fused attention, XLA flags (``--xla-flag``, passed as compiler options);
- per-device memory (XLA's ``memory_analysis``) against what JAX lets a process allocate
  (``--mem-fraction`` of the device: JAX's default 0.75; the launchers set 0.90);
- the kernels the step launches and the bytes each reads and writes (its operands and results
  once; inside a fusion, a sliced operand or a buffer updated in place by its parts), by kind
  (``profile_summary``'s categories). The memory-bound kernels (all but matmuls and attention)
  move their bytes at best at the HBM bandwidth, so bytes / ``--bandwidth`` is a floor on their
  time; on the H100 of 2026-11-22 the step's GELU kernels ran at ~2.1 TB/s (docs/benchmarks.md).

Not modelled: autotuning, which needs a GPU to time on; without it XLA compiles every GEMM as
a Triton GEMM. ``--gemm auto`` (the default) asks for cuBLAS, which the autotuner picked for
every GEMM of the step on the H100, except in variants whose ``--xla-flag`` chooses between
cuBLAS and Triton GEMMs (``--xla_gpu_triton_gemm_any=true``, ...): those get XLA's untuned
choice under their flags. Custom calls (cuBLAS, cuDNN, Pallas) count every operand and result
whole (their scratch space not): the Pallas attention kernels, which read and write slots of
the [B, T, 3, heads, Dh] gradient in place, are overcounted by ~20%. Tables:
docs/benchmarks.md, "Compiled for an H100 without one".
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import os
import re
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))

import jax  # noqa: E402

from benchmarks import aot_memory, profile_summary, train_step  # noqa: E402
from usfm_jax.config_validation import validate  # noqa: E402
from usfm_jax.models.factory import DTYPES, encoder_dims  # noqa: E402
from usfm_jax.models.vit import resolve_attention, resolve_norm  # noqa: E402

GiB = 2**30
DEFAULT_TARGET = BENCHMARKS / "gpu_targets" / "h100_sxm.txtpb"
# Device-to-device copy on the project's H100s, TB/s: a ceiling for memory-bound kernels.
DEFAULT_BANDWIDTH = 3.0
# GEMM-choosing flags: a variant that sets one gets XLA's choice of cuBLAS or Triton under it.
GEMM_CHOICE_FLAGS = (
    "xla_gpu_enable_triton_gemm", "xla_gpu_triton_gemm_any", "xla_gpu_cublas_fallback",
    "xla_gpu_cudnn_gemm_fusion_level",
)  # fmt: skip
COMPUTE_BOUND = ("matmul", "attention")
# Instructions that launch no kernel: buffers, tuples and control flow (looked into); nor does
# an asynchronous operation's *-done (its *-start is counted).
NO_KERNEL = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "add-dependency", "opt-barrier", "partition-id", "replica-id", "while", "conditional", "call",
}  # fmt: skip
_ARRAY = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|bf16|f8\w*|f16|f32|f64|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16, "f16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128}
_SHAPE = re.compile(r" = (.*?) [a-z][\w\-]*\(")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLED = re.compile(
    r"\b(?:body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_PARAMETER = re.compile(r"parameter\((\d+)\)")


def array_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape (an array or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * bits // 8
    return total


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel-launching instruction of an optimised HLO module."""

    name: str  # the HLO instruction
    category: str  # profile_summary's
    launches: int  # per run of the module (a loop body's: its trip count)
    bytes: int  # of its operands and results, per launch
    op_name: str  # the JAX operation it comes from (HLO metadata), for reading

    @property
    def moved(self) -> int:
        return self.launches * self.bytes


def _arguments(line: str, opcode: str) -> list[str]:
    """The operand names of an instruction's line, in order."""
    return _OPERAND.findall(line[line.index(f" {opcode}(") + len(opcode) + 2 :].split(")")[0])


def kernel_bytes(
    line: str,
    opcode: str,
    result: str,
    operands: list[tuple[str, str]],
    computations: dict[str, list[tuple[str, str, str]]],
) -> int:
    """Bytes a kernel reads and writes: its result and each distinct operand (name, shape) at
    most once (q, k and v from one qkv array: once). In a fusion, an operand that is only sliced
    counts as its slices, and a buffer updated in place (a dynamic-update-slice that is the
    fusion's result, as in a loop over layers) as the update written, not as the whole buffer
    read and written. A custom call's scratch space (its u8 / s8 result) is not counted."""
    if opcode == "custom-call":  # a library call's scratch space is a u8 / s8 result
        result = re.sub(r"\b[su]8\[[\d,]*\](\{[^}]*\})?", "", result)
    written = array_bytes(result)
    whole = {name: array_bytes(shape) for name, shape in operands}
    called = profile_summary.CALLS.search(line)
    body = computations.get(called.group(1), []) if opcode == "fusion" and called else []
    shapes = {n: _SHAPE.search(text).group(1) for n, _, text in body}
    uses: dict[str, list[tuple[str, str, list[str]]]] = collections.defaultdict(list)
    root: set[str] = set()
    for n, op, text in body:
        args = _arguments(text, op)
        for a in set(args):
            uses[a].append((op, n, args))
        if text.lstrip().startswith("ROOT "):
            root = set(args) if op == "tuple" else {n}
    read = {name: 0 for name in whole}
    for n, op, text in body:
        if op != "parameter":
            continue
        name, shape = operands[int(_PARAMETER.search(text).group(1))]
        users = uses.get(n, [])
        if users and all(u[0] in ("slice", "dynamic-slice") and u[2][0] == n for u in users):
            read[name] += sum(array_bytes(shapes[u[1]]) for u in users)
        elif users and all(
            u[0] == "dynamic-update-slice" and u[2][0] == n and u[1] in root for u in users
        ):  # the result is this buffer, updated in place: only the update is written
            written -= array_bytes(shape) - sum(array_bytes(shapes[u[2][1]]) for u in users)
        else:
            read[name] += array_bytes(shape)
    if not body:
        read = whole
    return written + sum(min(read[name], whole[name]) for name in whole)


def step_kernels(hlo: str) -> list[Kernel]:
    """The kernels one run of an optimised HLO module's entry computation launches: loops
    counted by their trip counts, every branch of a conditional counted (an upper estimate;
    the step has none)."""
    computations = profile_summary.hlo_computations(hlo)
    contents = profile_summary.hlo_contents(computations)
    kernels: list[Kernel] = []

    def visit(name: str, times: int, depth: int = 0) -> None:
        instructions = computations.get(name, [])
        shapes = {n: _SHAPE.search(line).group(1) for n, _, line in instructions}
        for inst, opcode, line in instructions:
            if opcode in NO_KERNEL or opcode.endswith("-done"):
                called = _CALLED.findall(line) + [
                    b.strip().lstrip("%")
                    for group in _BRANCHES.findall(line)
                    for b in group.split(",")
                    if b.strip()
                ]
                trips = _TRIPS.search(line)
                for inner in called if depth < 8 else []:
                    visit(inner, times * (int(trips.group(1)) if trips else 1), depth + 1)
                continue
            operands = [(o, shapes.get(o, "")) for o in _arguments(line, opcode)]
            moved = kernel_bytes(line, opcode, shapes[inst], operands, computations)
            op_name = _OP_NAME.search(line)
            kernels.append(
                Kernel(
                    name=inst,
                    category=profile_summary.category(contents.get(inst, {opcode})),
                    launches=times,
                    bytes=moved,
                    op_name=op_name.group(1) if op_name else "",
                )
            )

    visit("ENTRY", 1)
    return kernels


def by_category(kernels: list[Kernel]) -> dict[str, tuple[int, int]]:
    """Per category: (launches, bytes moved), most bytes first."""
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for k in kernels:
        totals[k.category][0] += k.launches
        totals[k.category][1] += k.moved
    return {name: (n, b) for name, (n, b) in sorted(totals.items(), key=lambda kv: -kv[1][1])}


def gpu_devices(target: Path, gpus: int) -> list:
    """Compile-only devices of ``gpus`` GPUs of the kind ``target`` describes, on one host."""
    from jax.experimental import topologies

    try:
        description = topologies.get_topology_desc(
            platform="cuda", target_config=target.read_text(), topology=f"1x1x{gpus}"
        )
    except NotImplementedError:  # no CUDA plugin: JAX has no topology for the platform
        sys.exit(
            "error: JAX's CUDA plugin is not installed, so nothing can be compiled for a GPU: "
            "pip install -r requirements-gpu-aot.txt"
        )
    return list(description.devices)


def compiler_options(args: argparse.Namespace, gemm: str) -> dict[str, bool | int | str]:
    """XLA options of one variant: the GEMM backend, then its ``--xla-flag`` values (typed:
    XLA takes a bool option as a bool, not as the text of a flag). ``gemm`` "auto": cuBLAS,
    unless the variant sets one of GEMM_CHOICE_FLAGS: XLA's choice under its flags then."""
    flags: dict[str, bool | int | str] = {}
    for flag in args.xla_flag:
        name, sep, value = flag.lstrip("-").partition("=")
        if not name.startswith("xla_") or not sep:
            raise ValueError(f"--xla-flag {flag!r}: expected --xla_NAME=VALUE")
        lowered = value.lower()
        if lowered in ("true", "false"):
            flags[name] = lowered == "true"
        else:
            flags[name] = int(value) if value.lstrip("-").isdigit() else value
    if gemm == "auto":
        gemm = "xla" if any(name in GEMM_CHOICE_FLAGS for name in flags) else "cublas"
    options: dict[str, bool | int | str] = {}
    if gemm != "xla":
        options["xla_gpu_enable_triton_gemm"] = gemm == "triton"
    return options | flags


def compile_variant(argv: list[str], devices: list, gemm: str, hlo: Path | None = None) -> dict:
    """AOT-compiles one train_step.py configuration for ``devices``; the row of the table.
    ``hlo``: where to write the optimised HLO text."""
    args = train_step.parse_args(argv)
    train_step.install_tilings(args)
    config = train_step.build_config(args, len(devices), accelerator=True)
    dtype = DTYPES[config.model.dtype]
    config.model.attention = resolve_attention(config.model.attention, dtype, backend="gpu")
    width = encoder_dims(config.model)[0]
    config.model.norm = resolve_norm(config.model.norm, dtype, width, backend="gpu")
    validate(config, len(devices), backend="gpu")
    start = time.perf_counter()
    lowered = aot_memory.lower_step(config, devices)[0]
    compiled = lowered.compile(compiler_options(args, gemm))
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    if hlo:
        hlo.write_text(text)
    return aot_memory.memory_gib(compiled) | {
        "compile_s": seconds,
        "kernels": step_kernels(text),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Other options are benchmarks/train_step.py's and describe the configuration.",
    )
    ap.add_argument("--variants", type=Path, help="a file of train_step.py option lines")
    ap.add_argument("--target", type=Path, default=DEFAULT_TARGET, help="GPU target description")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs of one host (data parallel)")
    ap.add_argument(
        "--gemm",
        choices=("auto", "cublas", "triton", "xla"),
        default="auto",
        help="GEMM backend: cuBLAS; XLA's Triton GEMMs; XLA's choice without autotuning; auto: "
        "cuBLAS unless a variant's --xla-flag chooses between cuBLAS and Triton",
    )
    ap.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH, help="HBM TB/s")
    ap.add_argument(
        "--mem-fraction",
        type=float,
        default=float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75)),
        help="of the device's memory JAX may allocate (XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's "
        "default 0.75)",
    )
    ap.add_argument("--categories", action="store_true", help="per variant: bytes by category")
    ap.add_argument("--top", type=int, default=0, help="per variant: the N kernels moving most")
    ap.add_argument("--hlo", type=Path, metavar="DIR", help="write each variant's optimised HLO")
    args, rest = ap.parse_known_args(argv)
    if args.variants and rest:
        ap.error(f"give --variants or train_step.py options, not both: {' '.join(rest)}")
    if not args.target.is_file():
        ap.error(f"--target {args.target}: no such file")
    variants = train_step.variant_lines(args.variants) if args.variants else [shlex.join(rest)]
    aot_memory.compile_only_environment()  # (and the CUDA plugin skips its check of a driver)
    devices = gpu_devices(args.target, args.gpus)
    memory = re.search(r"device_memory_size:\s*(\d+)", args.target.read_text())
    device_gib = int(memory.group(1)) / GiB if memory else float("inf")
    usable_gib = args.mem_fraction * device_gib
    print(
        f"# {datetime.date.today()}, compiled on {train_step.cpu_name()} for {args.gpus} x "
        f"{devices[0].device_kind} ({args.target.name}), jax {jax.__version__}, "
        f"jax-cuda13-plugin {metadata.version('jax-cuda13-plugin')}, --gemm {args.gemm}, "
        f"memory-bound kernels at {args.bandwidth} TB/s"
    )
    print(
        f"| variant | compile s | arguments GiB | temporaries GiB | total GiB "
        f"| fits {usable_gib:.1f} GiB ({args.mem_fraction:g} of {device_gib:.1f}) | kernels "
        f"| matmul GB | attention GB | other GB | other ms at {args.bandwidth} TB/s |"
    )
    print("|---" * 11 + "|", flush=True)
    failed = False
    details = []
    if args.hlo:
        args.hlo.mkdir(parents=True, exist_ok=True)
    for number, line in enumerate(variants, 1):
        hlo = args.hlo / f"variant{number:02d}.hlo.txt" if args.hlo else None
        try:
            row = compile_variant(shlex.split(line), devices, args.gemm, hlo)
        except (Exception, SystemExit) as e:  # a failed row; the other variants go on
            failed = True
            print(f"| `{line}` | failed: {type(e).__name__}: {' '.join(str(e).split())[:300]} |")
            continue
        kernels = row["kernels"]
        gigabytes = {name: moved / 1e9 for name, (_, moved) in by_category(kernels).items()}
        other = sum(v for k, v in gigabytes.items() if k not in COMPUTE_BOUND)
        print(
            f"| `{line}` | {row['compile_s']:.0f} | {row['args_gib']:.2f} | {row['temp_gib']:.2f} "
            f"| {row['total_gib']:.2f} | {'yes' if row['total_gib'] <= usable_gib else '**no**'} "
            f"| {sum(k.launches for k in kernels)} "
            f"| {gigabytes.get('matmul', 0):.1f} | {gigabytes.get('attention', 0):.1f} "
            f"| {other:.1f} | {other / args.bandwidth:.1f} |",
            flush=True,
        )
        details.append((line, kernels))
    for line, kernels in details if args.categories or args.top else []:
        print(f"\n`{line}`")
        if args.categories:
            print(f"\n| category | kernels | GB | ms at {args.bandwidth} TB/s |\n|---|---|---|---|")
            for name, (launches, moved) in by_category(kernels).items():
                ms = moved / 1e9 / args.bandwidth
                print(f"| {name} | {launches} | {moved / 1e9:.1f} | {ms:.2f} |")
        if args.top:
            print("\n| kernel | category | launches | GB | JAX operation |\n|---|---|---|---|---|")
            for k in sorted(kernels, key=lambda k: -k.moved)[: args.top]:
                op = k.op_name.removeprefix("jit(train_step)/")[-90:]
                print(f"| {k.name} | {k.category} | {k.launches} | {k.moved / 1e9:.2f} | {op} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
