"""The step benchmark's harness (benchmarks/train_step.py): its FLOP count against XLA's, its
figures, and a real run of both frameworks in child processes."""

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import make_tiny_config
from flax import nnx

from benchmarks import compile_time, kernel_parity, kernel_sweep
from benchmarks import train_step as bench
from usfm_jax.models import fused_attention, fused_mlp, fused_norm
from usfm_jax.train_step import abstract_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("size", [(32, 48), (64, 64)])
def test_model_flops_match_xla_cost_analysis(size):
    """The analytic count is the matmul and attention FLOPs of XLA's own count of the forward
    pass; what XLA counts beyond it (softmax, norms, GELU, adds) is a few percent."""
    config = make_tiny_config(image_size=size, **{"model.patch_size": 16, "model.width": 64})
    model = abstract_model(config)
    graphdef, params = nnx.split(model)
    images = jax.ShapeDtypeStruct((1, *size, 1), jnp.float32)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    xla = forward.lower(params, images).compile().cost_analysis()["flops"]
    analytic = bench.model_flops_per_view(config)
    assert 0.85 * xla < analytic < xla


def _args(**kw) -> argparse.Namespace:
    return bench.parse_args(
        [f"--{k.replace('_', '-')}={v}" for k, v in {"size": "tiny", **kw}.items()]
    )


def test_figures_and_ratio_from_measurements():
    args = _args(image=224, batch_per_device=8, objective="dual")
    config = bench.build_config(args, 1, False)
    common = {"device": "NVIDIA H100 80GB HBM3", "device_count": 1, "dtype": "bfloat16"}
    jax_row = bench.summarise(
        {**common, "framework": "usfm_jax", "versions": "jax", "options": "o", "step_s": 0.5,
         "views_s": 0.01, "ceiling_tflops": 800.0}, args,
    )  # fmt: skip
    torch_row = bench.summarise(
        {**common, "framework": "PyTorch", "versions": "torch", "options": "o", "step_s": 1.0,
         "views_s": None, "ceiling_tflops": 700.0}, args,
    )  # fmt: skip
    flops = 3 * bench.model_flops_per_view(config) * 2 * 8  # dual: two views per image
    assert jax_row["img_s"] == pytest.approx(16.0)
    assert jax_row["tflops"] == pytest.approx(flops / 0.5 / 1e12)
    assert jax_row["mfu_peak"] == pytest.approx(jax_row["tflops"] / 989.0)
    assert jax_row["mfu_ceiling"] == pytest.approx(jax_row["tflops"] / 800.0)
    assert jax_row["views_share"] == pytest.approx(0.02)
    lines = bench.table([jax_row, torch_row], args)
    assert lines[2].endswith("| 2.0% | 2.00x |") and lines[3].endswith("| n/a | 1.00x |")
    cpu = bench.summarise({**jax_row, "device": "Intel Xeon, 2 cores"}, args)
    assert cpu["mfu_peak"] is None  # no vendor peak for a CPU


def test_arguments_are_checked():
    for bad in (
        ["--frameworks", "jax,tf"],
        ["--steps", "0"],
        ["--frameworks", ","],
        ["--attention", "pallas", "--pallas-tiling", "warps_dq=3"],
        ["--attention", "pallas", "--pallas-tiling", "bias_grad=dk"],
        ["--pallas-tiling", "warps_dq=8"],  # without --attention pallas
        ["--mlp", "pallas", "--mlp-tiling", "block_m=100"],
        ["--mlp-tiling", "warps=8"],  # without --mlp pallas
        ["--mlp", "cublas"],
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert bench.parse_args(["--frameworks", "torch, jax"]).frameworks == ["torch", "jax"]
    tiling = bench.parse_args(["--attention", "pallas", "--pallas-tiling", "warps_dq=8"])
    assert tiling.pallas_tiling == fused_attention.Tiling(warps_dq=8)
    tiling = bench.parse_args(["--attention", "pallas", "--pallas-tiling", "bias_grad=dkv"])
    assert tiling.pallas_tiling == fused_attention.Tiling(bias_grad="dkv")
    for mlp in ("pallas", "pallas_backward"):
        tiling = bench.parse_args(["--mlp", mlp, "--mlp-tiling", "block_n=256"])
        assert tiling.mlp_tiling == fused_mlp.MlpTiling(block_n=256)


@pytest.mark.parametrize(
    ("script", "bad", "error"),
    [
        ("input_pipeline.py", ["--threads", "0"], "--threads must be >= 1"),
        ("input_pipeline.py", ["--batches", "0"], "--batches must be >= 1"),
        ("input_pipeline.py", ["--resize", "100"], "--resize 100: the benchmark trains at 224 px"),
        ("ingest.py", ["--images", "10", "0"], "--images must be >= 1"),
        ("ingest.py", ["--workers", "0"], "--workers must be >= 1"),
        ("ingest.py", ["--code", "/nonexistent"], "--code /nonexistent: no usfm_jax/data/ingest"),
    ],
)
def test_data_benchmarks_check_their_arguments_before_any_work(script, bad, error):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *bad],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 2 and error in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("tool", "bad", "error"),
    [
        (compile_time, ["--sizes", "base,foo"], "'foo' not a size; choose from micro, tiny,"),
        (compile_time, ["--sizes", "base,"], "'' not a size; choose from"),
        (compile_time, ["--batch", "0"], "--batch must be >= 1"),
        (kernel_parity, ["--batch", "0"], "--batch must be >= 1"),
        (kernel_parity, ["--image", "0"], "--image must be >= 1"),
        (kernel_parity, ["--image", "70"], "--image 70: must be a multiple of the patch size 16"),
        (kernel_parity, ["--implementations", "flash"], "--implementations: 'flash' is not"),
    ],
)
def test_compile_time_and_kernel_parity_check_their_arguments(tool, bad, error, capsys):
    """A bad count, size or image is a usage error before any work, not a traceback at the end."""
    with pytest.raises(SystemExit) as exit_:
        tool.parse_args(bad)
    assert exit_.value.code == 2
    assert error in capsys.readouterr().err


def test_kernel_sweep_refuses_an_image_of_part_patches(capsys):
    with pytest.raises(SystemExit) as exit_:
        kernel_sweep.main(["--case", "xla", "--image", "70"])
    assert exit_.value.code == 2
    assert "--image 70: must be a multiple of the patch size 16" in capsys.readouterr().err


def test_compile_time_and_kernel_parity_take_good_arguments():
    args = compile_time.parse_args(["--sizes", "micro, base", "--batch", "2"])
    assert args.sizes == ["micro", "base"] and args.batch == 2
    args = kernel_parity.parse_args(["--image", "32", "--implementations", "xla,pallas/pallas"])
    assert args.implementations == [("xla", "xla", "xla"), ("pallas", "pallas", "xla")]


def test_kernel_tool_refuses_a_tiling_for_a_family_it_leaves_out(capsys):
    from benchmarks import pallas_kernels

    for bad in (
        ["--kernels", "mlp", "--pallas-tiling", "warps_dq=8"],
        ["--kernels", "attention", "--mlp-tiling", "block_m=64"],
    ):
        with pytest.raises(SystemExit):
            pallas_kernels.main(bad)
        assert "which --kernels leaves out" in capsys.readouterr().err


def test_every_kernel_sweep_case_parses():
    """Each line of benchmarks/kernel_cases/ is one case of kernel_sweep.py on a GPU: each must
    name implementations and tilings that exist, and tile only Pallas kernels."""
    files = sorted((ROOT / "benchmarks" / "kernel_cases").glob("*.txt"))
    assert files
    for cases in files:
        parsed = [kernel_sweep.parse_case(line) for line in bench.variant_lines(cases)]
        assert parsed, cases
        tiled = [t for _, t in parsed if t.pallas_tiling or t.mlp_tiling or t.norm_tiling]
        assert tiled, cases


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("flash", r"'flash' is not ATTENTION\[/MLP\[/NORM\]\]"),
        ("pallas attn:warps=8", r"FAMILY:name=value,\.\.\. with FAMILY one of"),
        ("cudnn attention:warps=8", r"the attention kernels of 'cudnn' are not Pallas"),
        ("xla/pallas mlp:rows=2", r"name=integer pairs of \['block_m'"),
        ("pallas attention:block_q=48", r"block_q must be a power of two >= 16"),
        ("  ", r"an empty case"),
        ("pallas attention:warps=8 attention:block_q=32", r"a second attention tiling"),
        ("xla/xla/xla norm:rows=2", r"the norm kernels of 'xla/xla/xla' are not Pallas"),
    ],
)
def test_a_bad_kernel_sweep_case_is_named(case, match):
    with pytest.raises((ValueError, argparse.ArgumentTypeError), match=match):
        kernel_sweep.parse_case(case)


def test_kernel_sweep_reports_a_failed_case_and_goes_on(capsys, monkeypatch):
    """cuDNN cannot run on this CPU: its row says why, and the next cases are still timed, each
    with the tilings its line names (installed as train_step.py installs them) and no other;
    the defaults are back afterwards."""
    for module, name in (
        (fused_attention, "DEFAULT_TILING"),
        (fused_mlp, "DEFAULT_MLP_TILING"),
        (fused_norm, "DEFAULT_NORM_TILING"),
    ):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    seen = []

    def time_case(*args):
        seen.append(fused_norm.DEFAULT_NORM_TILING)
        return timed(*args)

    timed = kernel_sweep.time_case
    monkeypatch.setattr(kernel_sweep, "time_case", time_case)
    options = "--size micro --image 32 --batch 2 --depth 2 --steps 2 --warmup 1"
    cases = ["cudnn", "xla/xla/pallas norm:rows=2,warps=2", "xla/xla/auto  norm:rows=1"]
    kernel_sweep.main([*options.split(), *(arg for case in cases for arg in ("--case", case))])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0] == "| case | ms | ms / block |"
    assert rows[1].startswith("| cudnn | failed: ") and "cuDNN" in rows[1]
    labels = ("xla/xla/pallas norm:rows=2,warps=2", "xla/xla/auto norm:rows=1")
    for row, label in zip(rows[2:], labels, strict=True):
        name, ms, per_block = (cell.strip() for cell in row.strip("|").split("|"))
        assert name == label and float(ms) > 0
        assert float(per_block) == pytest.approx(float(ms) / 2, abs=0.01)
    tilings = [fused_norm.NormTiling(), fused_norm.NormTiling(rows=2, warps=2)]
    assert seen == [*tilings, fused_norm.NormTiling(rows=1)]  # cuDNN's case is traced too
    assert fused_norm.NormTiling() == fused_norm.DEFAULT_NORM_TILING


def test_every_sweep_variant_parses():
    """Each line of a variants file is one train_step.py run on a lent accelerator: a typo
    there would cost device time, so every line must parse here, and XLA must know every
    --xla-flag (it aborts on an unknown one; GPU flags are known to the CPU build too)."""
    xla_flags = set()
    for variants in sorted((ROOT / "benchmarks" / "variants").glob("*.txt")):
        runs = bench.variant_lines(variants)
        assert runs, variants
        for line in runs:
            xla_flags.update(bench.parse_args(line.split()).xla_flag)
    assert xla_flags
    env = {**os.environ, "XLA_FLAGS": " ".join(sorted(xla_flags))}
    code = "import jax; jax.numpy.ones(2).block_until_ready()"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_both_frameworks_measured_by_one_run(tmp_path):
    out = tmp_path / "rows.jsonl"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--size", "tiny",
        "--image", "32", "--batch-per-device", "2", "--steps", "2", "--warmup", "0",
        "--frameworks", "jax,torch", "--torch-compile", "none", "--ceiling", "128",
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["framework"] for r in rows] == ["usfm_jax", "PyTorch"]
    for r in rows:
        assert r["step_s"] > 0 and r["img_s"] == pytest.approx(2 / r["step_s"])
        assert r["ceiling_tflops"] > 0
    ratio = rows[0]["img_s"] / rows[1]["img_s"]
    assert f"usfm_jax / PyTorch: {ratio:.2f}x" in done.stdout
    assert 0 < rows[0]["views_share"] < 1 and rows[1]["views_share"] is None
    table_rows = [line for line in done.stdout.splitlines() if line.startswith("| 20")]
    assert len(table_rows) == 2 and table_rows[1].endswith("| 1.00x |")


def test_profile_summary_attributes_kernels_inside_cuda_graphs(tmp_path):
    """XLA:GPU runs the step as CUDA-graph command buffers; the trace then names each kernel,
    not the HLO operation. The summary maps fusion kernels back to their HLO instruction and
    library kernels (cuBLAS, cuDNN) to a category by name."""
    from benchmarks import profile_summary as ps

    def event(name, op, dur):
        return {
            "ph": "X",
            "name": name,
            "dur": dur,
            "args": {"hlo_module": "jit_step", "hlo_op": op},
        }

    trace = {
        "traceEvents": [
            event("loop_add_fusion_3", "command_buffer_1", 1000),
            event("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", "command_buffer_1", 4000),
            event("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", "command_buffer_1", 2000),
            event("void cudnn::fusion::fmha_dbias<true>(void const*)", "command_buffer_1", 500),
            event("usfm_attention_dq", "command_buffer_1", 700),  # a Pallas kernel, by its name
            event("usfm_mlp_forward", "command_buffer_1", 800),  # a Pallas matmul
            event("usfm_norm_scaled_backward", "command_buffer_1", 600),  # a Pallas LayerNorm
            event("usfm_mlp_backward", "custom-call.7", 900),  # one outside a graph: by its HLO
            event("input_reduce_fusion", "input_reduce_fusion", 300),  # outside a graph
            {"ph": "X", "name": "host work", "dur": 9000, "args": {}},
        ]
    }
    path = tmp_path / "x.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    times, module = ps.op_times(path, None)
    assert module == "jit_step"
    assert times == pytest.approx(
        {
            "loop_add_fusion.3": 1.0,
            "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT": 4.0,
            "cudnn_generated_fort_native_sdpa_sm90_flash_bprop": 2.0,
            "void cudnn::fusion::fmha_dbias<true>(void const*)": 0.5,
            "usfm_attention_dq": 0.7,
            "usfm_mlp_forward": 0.8,
            "usfm_norm_scaled_backward": 0.6,
            "custom-call.7": 0.9,
            "input_reduce_fusion": 0.3,
        }
    )
    hlo = ps.hlo_contents(
        ps.hlo_computations(
            "%fused_add.3 (p0: f32[4]) -> f32[4] {\n  ROOT %a = f32[4]{0} add(%p0, %p0)\n}\n"
            "ENTRY %main (x: f32[4]) -> f32[4] {\n"
            "  %loop_add_fusion.3 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_add.3\n"
            '  ROOT %custom-call.7 = f32[4]{0} custom-call(%x), custom_call_target="__gpu$xla.gpu.'
            'triton", backend_config={name="usfm_mlp_backward", ir="..."}\n}\n'
        )
    )
    kinds = {op: ps.category(hlo.get(op, {op.split(".")[0]})) for op in times if "reduce" not in op}
    assert kinds == {
        "loop_add_fusion.3": "elementwise",
        "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT": "matmul",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop": "attention",
        "void cudnn::fusion::fmha_dbias<true>(void const*)": "attention",
        "usfm_attention_dq": "attention",
        "usfm_mlp_forward": "matmul",
        "usfm_norm_scaled_backward": "layer norm",
        "custom-call.7": "matmul",
    }
