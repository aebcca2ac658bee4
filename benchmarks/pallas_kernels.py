"""Compile the Pallas attention kernels for an NVIDIA GPU on any machine; report their resources.

Lowers ``models.fused_attention`` (forward and both backward kernels) for CUDA with JAX's
cross-platform lowering, takes the Triton IR out of each kernel's custom call, and compiles it
with the ``triton`` package (installed with torch) for the target GPU, down to a cubin. Prints
per kernel the registers per thread, spilled bytes (stack), shared memory and the resident blocks
per SM this allows: what decides whether a tiling is worth measuring, found without a GPU.

    python benchmarks/attention_kernels.py                       # ViT-B/16 at 224, default tiling
    python benchmarks/attention_kernels.py --tiling warps_dq=8 --tiling block_q_dq=16,warps_dq=4

The ``triton`` package's compiler is not XLA's (jaxlib builds its own Triton); register counts
may differ a little from what runs, the absence of a lowering or compilation error much less so.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as triton_dialect

from benchmarks.train_step import pallas_tiling
from usfm_jax.models import fused_attention
from usfm_jax.models.fused_attention import Tiling

# registers and shared memory of one SM of an H100 (sm_90)
SM_REGISTERS = 65536
SM_SHARED_BYTES = 227 * 1024


def kernel_irs(
    tiling: Tiling, batch: int, tokens: int, heads: int, head_dim: int, with_bias: bool = True
) -> list[tuple[str, int, int, bytes]]:
    """(name, num_warps, num_stages, Triton IR bytecode) of each kernel of a training step
    (bf16 operands), lowered for CUDA."""
    qkv = jax.ShapeDtypeStruct((batch, tokens, 3, heads, head_dim), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((1, heads, tokens, tokens), jnp.float32) if with_bias else None

    def loss(qkv, bias):
        # the kernels without fused_attention's size limits, which come from this tool's figures
        out = fused_attention._attention(qkv, bias, tiling, False)
        return jnp.sum(out.astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1) if with_bias else 0))
    module = step.trace(qkv, bias).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    found = []

    def visit(op: ir.Operation) -> None:
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.name == "stablehlo.custom_call":
                        config = ir.DictAttr(child.attributes["mhlo.backend_config"])
                        found.append(
                            (
                                ir.StringAttr(config["name"]).value,
                                ir.IntegerAttr(config["num_warps"]).value,
                                ir.IntegerAttr(config["num_stages"]).value,
                                ir.StringAttr(config["ir"]).value_bytes,
                            )
                        )
                    visit(child.operation)

    visit(module.operation)
    return found


def compile_kernel(
    name: str, warps: int, stages: int, bytecode: bytes, capability: int, workdir: str
) -> dict:
    """Compiles one kernel's Triton IR to a cubin; its resource usage as reported by cuobjdump."""
    import triton
    from triton.backends.compiler import GPUTarget

    with ir.Context() as context:
        triton_dialect.register_dialect(context)
        text = str(ir.Module.parse(bytecode))
    source = os.path.join(workdir, f"{name}.ttir")
    pathlib.Path(source).write_text(text)
    kernel = triton.compile(
        source,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": warps, "num_stages": stages},
    )
    cubin = os.path.join(workdir, f"{name}.cubin")
    pathlib.Path(cubin).write_bytes(kernel.asm["cubin"])
    tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    usage = subprocess.run(
        [str(tools / "cuobjdump"), "--dump-resource-usage", cubin],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fields = dict(
        item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split()
    )
    registers = int(fields["REG"])
    shared = int(kernel.metadata.shared)
    threads = 32 * warps
    blocks = min(
        SM_REGISTERS // (registers * threads), SM_SHARED_BYTES // max(shared, 1), 2048 // threads
    )
    return dict(
        registers=registers, spill_bytes=int(fields["STACK"]), shared=shared, blocks_per_sm=blocks
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiling", type=pallas_tiling, action="append", help="name=int,...")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--no-bias", action="store_true", help="without a position bias")
    parser.add_argument("--capability", type=int, default=90, help="compute capability, e.g. 90")
    args = parser.parse_args()
    try:
        import triton
    except ImportError:
        sys.exit("error: this needs the triton package (pip install triton; torch brings it)")
    print(f"jax {jax.__version__}, triton {triton.__version__}, target sm_{args.capability}")
    print(f"batch {args.batch}, {args.tokens} tokens, {args.heads} heads of {args.head_dim}")
    header = (
        f"{'kernel':<24} {'warps':>5} {'regs':>5} {'spill B':>8} {'shared B':>9} {'blocks/SM':>9}"
    )
    for tiling in args.tiling or [Tiling()]:
        print(f"\n{tiling}\n{header}")
        irs = kernel_irs(
            tiling, args.batch, args.tokens, args.heads, args.head_dim, not args.no_bias
        )
        with tempfile.TemporaryDirectory() as workdir:
            for name, warps, stages, bytecode in irs:
                r = compile_kernel(name, warps, stages, bytecode, args.capability, workdir)
                print(
                    f"{name:<24} {warps:>5} {r['registers']:>5} {r['spill_bytes']:>8} "
                    f"{r['shared']:>9} {r['blocks_per_sm']:>9}"
                )


if __name__ == "__main__":
    main()
