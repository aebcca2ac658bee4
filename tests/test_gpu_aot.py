"""The GPU ahead-of-time tool (benchmarks/gpu_aot.py): its reading of an optimised HLO module
(kernels and the bytes they move) and its options. The compile for a GPU itself needs JAX's CUDA
plugin (requirements-gpu-aot.txt), which the test environment does not install."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu_aot, train_step
from configs.pretrain import usfm_vitb16
from usfm_jax.models.factory import encoder_dims

ROOT = Path(__file__).resolve().parent.parent
F32 = 128 * 256 * 4  # bytes of one f32[128, 256]


def test_array_bytes_of_arrays_and_tuples():
    assert gpu_aot.array_bytes("f32[128,256]{1,0}") == F32
    shape = "(bf16[2,3]{1,0}, f32[4]{0}, pred[8]{0}, s4[4]{0}, u8[0]{0}, f8e4m3fn[2]{0}, s32[])"
    assert gpu_aot.array_bytes(shape) == 12 + 16 + 8 + 2 + 0 + 2 + 4


def _loop_hlo(trips: int) -> str:
    """A compiled loop of ``trips`` iterations of one elementwise kernel over f32[128, 256] (two
    operands, one result); its entry takes six arguments, so its header carries /*index=5*/."""

    def f(x, y, a, b, c, d):
        step = lambda i, carry: jnp.tanh(carry) * 2.0 + y
        return jax.lax.fori_loop(0, trips, step, x) + a + b + c + d

    args = [jnp.ones((128, 256))] * 2 + [jnp.ones(())] * 4
    return jax.jit(f).lower(*args).compile().as_text()


def test_traffic_counts_each_loop_iteration():
    """Bytes moved by the loop body's kernel (read the carry and y, write the result: 3 arrays)
    times the loop's trip count, plus the entry's kernel after the loop (read the loop's result
    and four scalars, write one array); the loop's counter and compare add a few bytes."""
    traffic = {
        trips: gpu_aot.by_category(gpu_aot.step_kernels(_loop_hlo(trips))) for trips in (4, 8)
    }
    for trips, by_category in traffic.items():
        kernels, moved = by_category["elementwise"]
        expected = 3 * F32 * trips + 2 * F32
        assert expected <= moved < expected + 100 * (trips + 1)
        assert kernels >= trips + 1
    loop_bytes = traffic[8]["elementwise"][1] - traffic[4]["elementwise"][1]
    assert 4 * 3 * F32 <= loop_bytes < 4 * 3 * F32 + 400


def test_slices_and_in_place_updates_count_their_parts():
    """A loop reading one row of a big array and writing one row of a buffer in place (as a
    scan over layers does) moves two rows per trip, not two whole arrays."""

    def f(big, buffer):
        def step(i, buffer):
            row = jax.lax.dynamic_slice(big, (i, 0), (1, 256))
            return jax.lax.dynamic_update_slice(buffer, jnp.tanh(row) * 2.0, (i, 0))

        return jax.lax.fori_loop(0, 8, step, buffer)

    arrays = jnp.ones((128, 256)), jnp.zeros((128, 256))
    hlo = jax.jit(f, donate_argnums=1).lower(*arrays).compile().as_text()
    kernels = gpu_aot.step_kernels(hlo)
    moved = sum(k.moved for k in kernels if k.category == "elementwise")
    row = 256 * 4
    assert 8 * 2 * row <= moved < 8 * 2 * row + 400  # + the loop's counter and indices
    assert max(k.bytes for k in kernels) < 3 * row


SYNTHETIC = """
%fused_a (p0: f32[1024], p1: f32[8]) -> f32[1024] {
  %p0 = f32[1024]{0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  %c = s32[] constant(0)
  %dus = f32[1024]{0} dynamic-update-slice(%p0, %p1, %c)
  ROOT %neg = f32[1024]{0} negate(%dus)
}
%fused_b (p0: f32[1024]) -> f32[2046] {
  %p0 = f32[1024]{0} parameter(0)
  %s0 = f32[1023]{0} slice(%p0), slice={[0:1023]}
  %s1 = f32[1023]{0} slice(%p0), slice={[1:1024]}
  ROOT %cat = f32[2046]{0} concatenate(%s0, %s1), dimensions={0}
}
%sum (l: f32[], r: f32[]) -> f32[] {
  %l = f32[] parameter(0)
  %r = f32[] parameter(1)
  ROOT %s = f32[] add(%l, %r)
}
ENTRY %main (x: f32[1024], y: f32[8], a: bf16[64,64], b: bf16[64,64]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %y = f32[8]{0} parameter(1)
  %a = bf16[64,64]{1,0} parameter(2)
  %b = bf16[64,64]{1,0} parameter(3)
  %f1 = f32[1024]{0} fusion(%x, %y), kind=kLoop, calls=%fused_a
  %f2 = f32[2046]{0} fusion(%x), kind=kLoop, calls=%fused_b
  %gemm = (bf16[64,64]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas"
  %ars = f32[1024]{0} all-reduce-start(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%sum
  %ard = f32[1024]{0} all-reduce-done(%ars)
  ROOT %t = (f32[1024]{0}, f32[2046]{0}, f32[1024]{0}) tuple(%f1, %f2, %ard)
}
"""


def test_updates_not_in_place_overlapping_slices_and_scratch_space():
    """An update whose result is used further is a whole new buffer; slices overlapping each
    other read the operand at most once; a cuBLAS call's 4 MiB workspace is no traffic; an
    asynchronous all-reduce is one collective."""
    kernels = gpu_aot.step_kernels(SYNTHETIC)
    assert {k.name: k.category for k in kernels}["ars"] == "collective"
    moved = {k.name: k.bytes for k in kernels}
    assert moved == {
        "f1": 4096 + 4096 + 32,  # write, read x whole, read y
        "f2": 2046 * 4 + 4096,  # write both slices, read x once
        "gemm": 3 * 64 * 64 * 2,  # write, read a and b
        "ars": 2 * 4096,  # all-reduce-done is no second kernel
    }


def test_memory_of_a_compiled_step_adds_up():
    """Arguments are the inputs' bytes; a donated input's output is not counted twice."""
    from benchmarks import aot_memory

    x = jnp.ones((256, 1024))  # 1 MiB
    compiled = jax.jit(lambda x: x * 2, donate_argnums=0).lower(x).compile()
    memory = aot_memory.memory_gib(compiled)
    assert memory["args_gib"] * 2**30 == x.nbytes
    assert memory["out_gib"] == 0  # aliased to the donated argument
    parts = ("args_gib", "temp_gib", "out_gib", "code_gib")
    assert memory["total_gib"] == pytest.approx(sum(memory[p] for p in parts))


def test_compiler_options_are_typed_and_checked():
    """cuBLAS GEMMs unless asked otherwise or a variant's flags choose between cuBLAS and
    Triton; flag values typed as XLA takes them."""
    options = lambda gemm, *flags: gpu_aot.compiler_options(
        train_step.parse_args([f"--xla-flag={flag}" for flag in flags]), gemm
    )
    assert options("auto", "--xla_gpu_autotune_level=0", "--xla_gpu_enable_command_buffer=") == {
        "xla_gpu_enable_triton_gemm": False,
        "xla_gpu_autotune_level": 0,
        "xla_gpu_enable_command_buffer": "",
    }
    assert options("auto", "--xla_gpu_triton_gemm_any=True") == {"xla_gpu_triton_gemm_any": True}
    assert options("auto", "--xla_gpu_cublas_fallback=false") == {"xla_gpu_cublas_fallback": False}
    assert options("auto", "--xla_gpu_enable_cublaslt=true") == {
        "xla_gpu_enable_triton_gemm": False,
        "xla_gpu_enable_cublaslt": True,
    }
    assert options("triton") == {"xla_gpu_enable_triton_gemm": True}
    assert options("xla") == {}
    with pytest.raises(ValueError, match="expected --xla_NAME=VALUE"):
        options("auto", "--xla_gpu_x")


def test_compiles_for_a_gpu_or_names_the_install():
    """With JAX's CUDA plugin: the step, with both Pallas kernels, compiles for the H100, each
    block running the three attention kernels (forward, dk / dv, dq) once; without it, one line
    saying what to install (not a NotImplementedError from inside JAX)."""
    command = [sys.executable, "benchmarks/gpu_aot.py", "--size", "tiny", "--image", "32"]
    command += ["--batch-per-device", "2", "--attention", "pallas", "--mlp", "pallas"]
    command += ["--categories"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    plugin = importlib.util.find_spec("jax_plugins") and importlib.util.find_spec(
        "jax_plugins.xla_cuda13"
    )
    if not plugin:
        assert result.returncode == 1, result.stdout + result.stderr
        assert "pip install -r requirements-gpu-aot.txt" in result.stderr
        return
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 x NVIDIA H100 80GB HBM3" in result.stdout
    row = [line for line in result.stdout.splitlines() if line.startswith("| `--size tiny")]
    cells = row[0].split(" | ")
    assert cells[5] == "yes" and int(cells[6]) > 0  # fits; kernels
    depth = encoder_dims(usfm_vitb16.get_config("size=tiny").model)[1]
    assert f"| attention | {3 * depth} |" in result.stdout


def test_cli_refuses_both_variants_and_options(tmp_path, capsys):
    variants = tmp_path / "v.txt"
    variants.write_text("# a comment\n\n--size tiny\n")
    assert train_step.variant_lines(variants) == ["--size tiny"]
    with pytest.raises(SystemExit):
        gpu_aot.main(["--variants", str(variants), "--size", "tiny"])
    assert "give --variants or train_step.py options, not both" in capsys.readouterr().err
