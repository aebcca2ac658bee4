"""Compile the Pallas kernels for an NVIDIA GPU on any machine; report their resources.

Lowers a training step's Pallas kernels (``models.fused_attention``: forward and both backward
kernels; ``models.fused_mlp``: forward and backward; ``models.fused_norm``: a block's plain and
residual LayerNorms, forward and backward) for CUDA with JAX's cross-platform lowering,
takes the Triton IR out of each kernel's custom call, and compiles it with the ``triton`` package
(installed with torch) for the target GPU, down to a cubin. Prints per kernel the registers per
thread, spilled bytes (stack), shared memory, the resident blocks per SM this allows, the
tensor-core instruction used (Hopper's asynchronous ``wgmma`` or the older ``mma.sync``) and
how many of its asynchronous global -> shared copies move less than 16 bytes (loads Triton
could not vectorise: an unaligned row or a mask along the contiguous dimension): what
decides whether a tiling is worth measuring, found without a GPU.

    python benchmarks/pallas_kernels.py                 # ViT-B/16 at 224, default tilings
    python benchmarks/pallas_kernels.py --kernels attention --tiling warps_dq=8 \\
        --tiling block_q_dq=16,warps_dq=4
    python benchmarks/pallas_kernels.py --kernels mlp --mlp-tiling block_n=256
    python benchmarks/pallas_kernels.py --kernels norm --norm-tiling rows=8,warps=8

The ``triton`` package's compiler is not XLA's (jaxlib builds its own Triton); register counts
may differ a little from what runs, the absence of a lowering or compilation error much less so.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as triton_dialect

from benchmarks.train_step import mlp_tiling, norm_tiling, pallas_tiling
from usfm_jax.models import fused_attention, fused_mlp, fused_norm
from usfm_jax.models.fused_attention import Tiling
from usfm_jax.models.fused_mlp import MlpTiling
from usfm_jax.models.fused_norm import NormTiling

# registers and shared memory of one SM of an H100 (sm_90)
SM_REGISTERS = 65536
SM_SHARED_BYTES = 227 * 1024
KERNEL_FAMILIES = ("attention", "mlp", "norm")
# A global -> shared asynchronous copy in PTX, and its size in bytes (16: a vectorised load)
ASYNC_COPY = re.compile(r"cp\.async\.c[ag]\.shared\.global [^;]*?, 0x([0-9a-f]+)")


def kernel_irs(fn, *args: jax.ShapeDtypeStruct | None) -> list[tuple[str, int, int, bytes]]:
    """(name, num_warps, num_stages, Triton IR bytecode) of each Pallas kernel that
    ``jax.jit(fn)(*args)`` runs, lowered for CUDA."""
    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
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


def attention_irs(
    tiling: Tiling, batch: int, tokens: int, heads: int, head_dim: int, with_bias: bool = True
) -> list[tuple[str, int, int, bytes]]:
    """The attention kernels of a training step (bf16 operands, float32 biases; the qkv
    projection's bias as the model has one)."""
    qkv = jax.ShapeDtypeStruct((batch, tokens, 3, heads, head_dim), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((1, heads, tokens, tokens), jnp.float32) if with_bias else None
    qkv_bias = jax.ShapeDtypeStruct((3, heads, head_dim), jnp.float32)

    def loss(qkv, bias, qkv_bias):
        # the kernels without fused_attention's size limits, which come from this tool's figures;
        # interpret=None: Triton, since the lowering is for CUDA
        out = fused_attention._attention(qkv, bias, qkv_bias, tiling, None)
        return jnp.sum(out.astype(jnp.float32))

    argnums = (0, 1, 2) if with_bias else (0, 2)
    return kernel_irs(jax.grad(loss, argnums=argnums), qkv, bias, qkv_bias)


def mlp_irs(
    tiling: MlpTiling, tokens: int, width: int, hidden: int
) -> list[tuple[str, int, int, bytes]]:
    """The MLP kernels of a training step (bf16 operands, ``tokens`` rows)."""
    shapes = [(tokens, width), (width, hidden), (hidden,), (hidden, width), (width,)]
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in shapes]

    def loss(*args):
        out = fused_mlp.fused_mlp(*args, tiling=tiling)
        return jnp.sum(out.astype(jnp.float32))

    return kernel_irs(jax.grad(loss, argnums=tuple(range(5))), *args)


def norm_irs(
    tiling: NormTiling, batch: int, tokens: int, width: int
) -> list[tuple[str, int, int, bytes]]:
    """The LayerNorm kernels of a block (bf16 tokens and branch bias, float32 gamma and beta):
    the plain one (norm1) and the one with the residual add of the attention branch, its
    output bias and a drop-path factor (norm2)."""
    x = jax.ShapeDtypeStruct((batch, tokens, width), jnp.bfloat16)
    param = jax.ShapeDtypeStruct((width,), jnp.float32)
    branch_bias = jax.ShapeDtypeStruct((width,), jnp.bfloat16)
    scale = jax.ShapeDtypeStruct((batch,), jnp.float32)

    def loss(x, delta, gamma, beta, branch_bias, scale):
        norm = functools.partial(fused_norm.residual_layer_norm, eps=1e-6, tiling=tiling)
        x, y = norm(x, None, None, gamma, beta)
        x, z = norm(x, delta * y, scale, gamma, beta, branch_bias)
        return jnp.sum(x.astype(jnp.float32) * z)

    args = (x, x, param, param, branch_bias, scale)
    return kernel_irs(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), *args)


def compile_kernel(
    name: str, warps: int, stages: int, bytecode: bytes, capability: int, workdir: str
) -> dict:
    """Compiles one kernel's Triton IR to a cubin; its resource usage as reported by cuobjdump
    and the tensor-core instruction in its PTX."""
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
    ptx = kernel.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    copies = [int(size, 16) for size in ASYNC_COPY.findall(ptx)]
    return dict(
        registers=registers,
        spill_bytes=int(fields["STACK"]),
        shared=shared,
        blocks_per_sm=blocks,
        mma=mma,
        async_copies=len(copies),
        narrow_copies=sum(size < 16 for size in copies),
    )


def families(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = set(names) - set(KERNEL_FAMILIES)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {KERNEL_FAMILIES}, got {text!r}"
        )
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kernels", type=families, default=list(KERNEL_FAMILIES), help="attention,mlp,norm"
    )
    parser.add_argument(
        "--tiling",
        "--pallas-tiling",  # train_step.py's name for it
        type=pallas_tiling,
        action="append",
        help="attention: name=value,... (e.g. warps_dq=8,bias_grad=dkv)",
    )
    parser.add_argument("--mlp-tiling", type=mlp_tiling, action="append", help="MLP: name=int,...")
    parser.add_argument(
        "--norm-tiling", type=norm_tiling, action="append", help="LayerNorm: name=int,..."
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=197, help="per image")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--no-bias", action="store_true", help="attention without position bias")
    parser.add_argument("--hidden", type=int, default=None, help="MLP width (default 4x model)")
    parser.add_argument("--capability", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel instead")
    args = parser.parse_args(argv)
    for option, tilings, family in (("--tiling", args.tiling, "attention"),
                                    ("--mlp-tiling", args.mlp_tiling, "mlp"),
                                    ("--norm-tiling", args.norm_tiling, "norm")):  # fmt: skip
        if tilings and family not in args.kernels:
            parser.error(f"{option} is for the {family} kernels, which --kernels leaves out")
    try:
        import triton
    except ImportError:
        sys.exit("error: this needs the triton package (pip install triton; torch brings it)")
    width = args.heads * args.head_dim
    hidden = args.hidden or 4 * width
    if not args.json:
        print(f"jax {jax.__version__}, triton {triton.__version__}, target sm_{args.capability}")
        print(f"batch {args.batch}, {args.tokens} tokens, {args.heads} heads of {args.head_dim}")
    runs = []
    if "attention" in args.kernels:
        for tiling in args.tiling or [Tiling()]:
            bias = not args.no_bias
            irs = attention_irs(tiling, args.batch, args.tokens, args.heads, args.head_dim, bias)
            runs.append((tiling, irs))
    if "mlp" in args.kernels:
        for tiling in args.mlp_tiling or [MlpTiling()]:
            runs.append((tiling, mlp_irs(tiling, args.batch * args.tokens, width, hidden)))
    if "norm" in args.kernels:
        for tiling in args.norm_tiling or [NormTiling()]:
            runs.append((tiling, norm_irs(tiling, args.batch, args.tokens, width)))
    header = (
        f"{'kernel':<26} {'warps':>5} {'regs':>5} {'spill B':>8} {'shared B':>9} "
        f"{'blocks/SM':>9} {'mma':>8} {'copies < 16 B':>14}"
    )
    for tiling, irs in runs:
        if not args.json:
            print(f"\n{tiling}\n{header}")
        with tempfile.TemporaryDirectory() as workdir:
            for name, warps, stages, bytecode in irs:
                r = compile_kernel(name, warps, stages, bytecode, args.capability, workdir)
                if args.json:
                    print(json.dumps(dict(tiling=str(tiling), kernel=name, warps=warps, **r)))
                    continue
                print(
                    f"{name:<26} {warps:>5} {r['registers']:>5} {r['spill_bytes']:>8} "
                    f"{r['shared']:>9} {r['blocks_per_sm']:>9} {r['mma']:>8} "
                    f"{r['narrow_copies']:>7} of {r['async_copies']:<4}"
                )


if __name__ == "__main__":
    main()
