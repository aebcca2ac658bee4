"""Where the time of a profiled step goes, by kind of operation.

    python benchmarks/train_step.py ... --profile /tmp/prof     # writes the trace and step.hlo.txt
    python benchmarks/profile_summary.py /tmp/prof [--top 15]

Reads the newest ``*.trace.json.gz`` that ``jax.profiler.trace`` wrote under the directory, keeps
the events of the step's HLO module that name an HLO operation (GPU kernels, XLA:CPU thunks),
and sums their durations per operation (inside XLA:GPU's CUDA-graph command buffers, where the
event names only the kernel, per kernel: a fusion's kernel is named after its HLO instruction,
a cuBLAS / cuDNN kernel is categorised by its name). With the step's optimised HLO
(``step.hlo.txt``, written by ``train_step.py --profile``) each operation is put in a category
from the instructions it runs: matmul (dot, convolution, cuBLAS / YNNPACK calls, the Pallas MLP
kernels), attention (cuDNN fused attention, the Pallas attention kernels), fft, gather /
scatter, reduction, copy / transpose, collective, elementwise. Durations are summed over threads
and streams: on a multi-core CPU the total is CPU time, not wall time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

HLO_FILE = "step.hlo.txt"
# (category, opcodes or call targets that put an operation in it), first match wins
CATEGORIES = (
    ("attention", ("__cudnn$fmha",)),  # cuDNN's fused attention
    ("matmul", ("dot", "convolution", "__cublas", "__onednn$matmul")),
    ("other Triton kernels", ("__gpu$xla.gpu.triton",)),  # Pallas kernels not named below
    ("fft", ("fft",)),
    ("collective", ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")),
    ("scatter", ("scatter",)),
    ("gather", ("gather",)),
    ("reduction", ("reduce", "reduce-window")),
    ("rng", ("rng-bit-generator", "rng")),
    ("copy / transpose", ("copy", "transpose")),
)
# GPU kernels that are not XLA fusions (library calls), by a piece of their name; used where the
# trace names the kernel only (inside CUDA-graph command buffers)
KERNEL_CATEGORIES = (
    ("attention", ("sdpa", "fmha", "flash", "cudnn::fusion")),
    ("matmul", ("nvjet", "gemm", "cublas", "cutlass", "splitKreduce")),
    ("fft", ("fft",)),
)
# this project's Pallas kernels, by the name they are given (in the HLO and as GPU kernels):
# checked first, as they are Triton custom calls like any other
PALLAS_KERNELS = (
    ("attention", "usfm_attention"),
    ("matmul", "usfm_mlp"),
    ("layer norm", "usfm_norm"),
)
_PALLAS_NAME = re.compile(r"\b(usfm_[a-z_]+)")
_FUSION_KERNEL = re.compile(r"([a-z][a-z_]*?)_(\d+)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_COMPUTATION = re.compile(r"^(?:(ENTRY) )?%?([\w.\-]+) .*\{\s*$")  # unindented


def newest_trace(directory: Path) -> Path:
    traces = sorted(directory.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    traces = [t for t in traces if not t.name.startswith("perfetto")]
    if not traces:
        raise FileNotFoundError(f"no *.trace.json.gz under {directory} (jax.profiler output)")
    return traces[-1]


def op_times(trace: Path, module: str | None) -> tuple[dict[str, float], str]:
    """Summed duration (ms) per HLO operation of ``module`` (default: the module with the most
    time, i.e. the step), and that module's name."""
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    per_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        args = e.get("args", {})
        if e.get("ph") == "X" and "hlo_op" in args:
            op = args["hlo_op"]
            if op.startswith("command_buffer"):  # a CUDA graph: the kernel names the operation
                op = kernel_operation(e.get("name", op))
            per_module[args.get("hlo_module", "")][op] += e.get("dur", 0) / 1e3
    if not per_module:
        raise ValueError(f"{trace}: no events naming an HLO operation")
    if module is None:
        module = max(per_module, key=lambda m: sum(per_module[m].values()))
    if module not in per_module:
        raise ValueError(f"{trace}: no module {module!r}; have {sorted(per_module)}")
    return dict(per_module[module]), module


def kernel_operation(kernel: str) -> str:
    """The HLO instruction an XLA kernel is named after (``loop_add_fusion_3`` ->
    ``loop_add_fusion.3``; identical fusions share one kernel and its name); a library
    kernel's own name otherwise."""
    match = _FUSION_KERNEL.fullmatch(kernel)
    return f"{match.group(1)}.{match.group(2)}" if match else kernel


def hlo_computations(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """The computations of an HLO module's text: name -> its instructions as (name, opcode,
    line), in order; the entry computation is named ENTRY."""
    computations: dict[str, list[tuple[str, str, str]]] = {}
    current = None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = computations.setdefault(header.group(1) or header.group(2), [])
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            current.append((match.group(1), match.group(2), line))
    return computations


def hlo_contents(computations: dict[str, list[tuple[str, str, str]]]) -> dict[str, set[str]]:
    """Per instruction of an HLO module (``hlo_computations``' reading of it): the opcodes
    (and custom-call targets) it runs, looking through fusions into their computations."""

    def runs(name: str, opcode: str, line: str, depth: int = 0) -> set[str]:
        found = {opcode, opcode.removesuffix("-start")}  # all-reduce-start: an all-reduce
        target = _TARGET.search(line)
        if target:
            found.add(target.group(1))
            kernel = _PALLAS_NAME.search(line)
            if kernel:
                found.add(kernel.group(1))
        called = CALLS.search(line)
        if called and depth < 8:
            for inner in computations.get(called.group(1), []):
                found |= runs(*inner, depth=depth + 1)
        return found

    return {
        name: runs(name, opcode, line) | {name.split(".")[0]}
        for instructions in computations.values()
        for name, opcode, line in instructions
    }


def category(contents: set[str]) -> str:
    for name, prefix in PALLAS_KERNELS:
        if any(c.startswith(prefix) for c in contents):
            return name
    for name, markers in CATEGORIES:
        if any(c == m or (m.startswith("__") and m in c) for m in markers for c in contents):
            return name
    for name, pieces in KERNEL_CATEGORIES:
        if any(p in c for p in pieces for c in contents):
            return name
    return "elementwise"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("directory", type=Path, help="the --profile directory")
    ap.add_argument("--module", help="HLO module (default: the one with the most time)")
    ap.add_argument("--top", type=int, default=15, help="operations listed")
    ap.add_argument("--steps", type=int, default=3, help="steps in the trace (per-step ms)")
    args = ap.parse_args()
    try:
        times, module = op_times(newest_trace(args.directory), args.module)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    hlo = args.directory / HLO_FILE
    contents = hlo_contents(hlo_computations(hlo.read_text())) if hlo.exists() else {}
    total = sum(times.values())
    print(f"module {module}: {total / args.steps:.1f} ms of operations per step")
    by_category = collections.Counter()
    for op, ms in times.items():
        by_category[category(contents.get(op, {op.split(".")[0]}))] += ms
    print("| category | ms / step | share |\n|---|---|---|")
    for name, ms in by_category.most_common():
        print(f"| {name} | {ms / args.steps:.1f} | {100 * ms / total:.1f}% |")
    print("\n| operation | category | ms / step | share |\n|---|---|---|---|")
    for op, ms in sorted(times.items(), key=lambda kv: -kv[1])[: args.top]:
        kind = category(contents.get(op, {op.split(".")[0]}))
        print(f"| {op[:72]} | {kind} | {ms / args.steps:.2f} | {100 * ms / total:.1f}% |")


if __name__ == "__main__":
    main()
