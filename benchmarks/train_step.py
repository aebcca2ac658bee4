"""Steady-state speed of the pre-training step, in usfm_jax and in a PyTorch reference.

    python benchmarks/train_step.py --size base --batch-per-device 64 --frameworks jax,torch
    python benchmarks/train_step.py --size tiny --batch-per-device 8 --steps 10 \\
        --frameworks jax,torch                                              # CPU

For each framework the same harness measures, in a process of its own (JAX preallocates GPU
memory; each gets a clean device), the same step: one fixed synthetic batch on the device (data
loading excluded), warm-up steps excluded, the median of ``--steps`` synchronised steps. Model
FLOPs are counted analytically (matmuls and attention of every forward pass the objective runs,
x3 for training, rematerialised work not counted). MFU is given against the vendor's dense bf16
peak and against a matmul ceiling measured in the same process (an ``--ceiling``-sized square
matmul in the step's compute dtype). For usfm_jax, the cost of building the corrupted views
(mask sampling, noise, FFT band-stop) is measured on its own and reported as a share of the step.
The PyTorch reference is ``benchmarks/torch_reference.py`` (timm, bf16 autocast, torch.compile).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs.pretrain import usfm_vitb16  # noqa: E402
from usfm_jax.models import fused_attention, fused_mlp, fused_norm  # noqa: E402
from usfm_jax.models.factory import encoder_dims  # noqa: E402
from usfm_jax.models.triton_tiles import KernelTiling  # noqa: E402
from usfm_jax.models.vit import (  # noqa: E402
    ATTENTION_IMPLEMENTATIONS,
    MLP_IMPLEMENTATIONS,
    NORM_IMPLEMENTATIONS,
    PALLAS_IMPLEMENTATIONS,
)

# Dense bf16 peak per device, TFLOP/s (vendor figures).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5p": 459.0}
FRAMEWORKS = ("jax", "torch")
RESULT = "RESULT "  # prefix of the line a measuring process reports on


def model_flops_per_view(config) -> float:
    """Forward FLOPs of encoder + pixel head for one image (multiply-add = 2 FLOPs)."""
    width, depth, _ = encoder_dims(config.model)
    p, (h, w) = config.model.patch_size, config.image_size
    n = (h // p) * (w // p)
    t = n + 1
    block = 2 * t * 12 * width**2 + 4 * t * t * width  # qkv, proj, mlp; QK^T and AV
    embed = 2 * n * p * p * config.model.in_chans * width
    head = 2 * n * width * p * p * config.model.out_chans
    return depth * block + embed + head


def views_per_image(config) -> int:
    """Model inputs per image: two with both branches combined as 'both', else one."""
    both = config.spatial.enabled and config.frequency.enabled
    return 2 if both and config.objective.combine == "both" else 1


def build_config(args: argparse.Namespace, device_count: int, accelerator: bool):
    config = usfm_vitb16.get_config(f"size={args.size}")
    config.image_size = (args.image, args.image)
    config.batch_size = args.batch_per_device * device_count
    config.image_every = 0  # no previews: the step alone (and batches below num_preview_images)
    config.model.dtype = args.dtype or ("bfloat16" if accelerator else "float32")
    config.model.update(
        attention=args.attention,
        mlp=args.mlp,
        norm=args.norm,
        remat=args.remat,
        scan_layers=args.scan,
    )
    config.spatial.enabled = args.objective in ("spatial", "dual")
    config.frequency.enabled = args.objective in ("frequency", "dual")
    return config


def install_tilings(args: argparse.Namespace) -> None:
    """Makes the Pallas kernels' tilings those of ``args`` (each family's default where not
    given): the kernels read their module's default when the model calls them."""
    fused_attention.DEFAULT_TILING = args.pallas_tiling or fused_attention.Tiling()
    fused_mlp.DEFAULT_MLP_TILING = args.mlp_tiling or fused_mlp.MlpTiling()
    fused_norm.DEFAULT_NORM_TILING = args.norm_tiling or fused_norm.NormTiling()


def variant_lines(path: str | os.PathLike) -> list[str]:
    """The runs of a variants file (benchmarks/variants/): one line of this script's options
    each; blank lines and # comments skipped."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def synthetic_batch(config, batch: int):
    """``batch`` synthetic B-mode images, uint8 [B, H, W, 1] (numpy)."""
    import numpy as np

    from usfm_jax.data.synthetic import SyntheticUltrasound

    source = SyntheticUltrasound(batch, config.image_size)
    return np.stack([source[i]["image"] for i in range(batch)])


def measure(
    fn: Callable[[], Any], sync: Callable[[Any], Any], warmup: int, steps: int
) -> dict[str, float]:
    """First call (compilation included), then ``warmup`` untimed calls, then the median of
    ``steps`` calls, each synchronised with the device by ``sync``."""

    def timed() -> float:
        start = time.perf_counter()
        sync(fn())
        return time.perf_counter() - start

    first = timed()
    for _ in range(warmup):
        timed()
    times = [timed() for _ in range(steps)]
    return {"first_s": first, "step_s": statistics.median(times), "min_s": min(times)}


def cpu_name() -> str:
    """The host CPU's model and core count (what a CPU measurement ran on)."""
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if "model name" in line), model
            )
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def ceiling_size(args: argparse.Namespace, accelerator: bool) -> int:
    """Side of the square matmul measured as the device's ceiling."""
    return args.ceiling or (8192 if accelerator else 2048)


def matmul_tflops(seconds: float, n: int) -> float:
    return 2 * n**3 / seconds / 1e12


# ------------------------------------------------------------------------------------------
# One framework, in this process
# ------------------------------------------------------------------------------------------


def measure_jax(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from usfm_jax import cpu_runtime, parallel
    from usfm_jax.config_validation import ConfigError, validate
    from usfm_jax.models.factory import DTYPES, encoder_dims
    from usfm_jax.models.vit import resolve_attention, resolve_norm
    from usfm_jax.train_step import create_training

    install_tilings(args)
    cpu_runtime.execute_inline()  # as usfm_jax.train runs (before the backend starts)
    cpu_runtime.configure_for_backend()
    device = jax.devices()[0]
    config = build_config(args, jax.device_count(), device.platform != "cpu")
    try:
        validate(config, jax.device_count())
    except ConfigError as e:
        sys.exit(f"error: {e}")
    mesh = parallel.create_mesh(config.mesh)
    objective, _, state, step, _ = create_training(config, mesh)
    images = synthetic_batch(config, config.batch_size)
    batch = {"image": jax.device_put(images, parallel.batch_sharding(mesh))}
    holder = [state]

    def run_step():
        holder[0], metrics = step(holder[0], batch)
        return metrics

    result = measure(run_step, jax.block_until_ready, args.warmup, args.steps)
    if args.profile:  # 3 steps, and the optimised HLO for benchmarks/profile_summary.py
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for _ in range(3):
                jax.block_until_ready(run_step())
        hlo = step.lower(holder[0], batch).compile().as_text()
        with open(os.path.join(args.profile, "step.hlo.txt"), "w") as f:
            f.write(hlo)
    views = jax.jit(
        lambda b: objective.views(b["image"].astype(jnp.float32) / 255.0, jax.random.key(0), 0)
    )
    views_s = measure(lambda: views(batch), jax.block_until_ready, 1, args.steps)["step_s"]
    dtype = DTYPES[config.model.dtype]
    n = ceiling_size(args, device.platform != "cpu")
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    cpu_options = cpu_runtime.compiler_options(mesh.devices.flat)  # those the step compiles with
    matmul = jax.jit(lambda x: x @ x, compiler_options=cpu_options)
    ceiling_s = measure(lambda: matmul(a), jax.block_until_ready, 2, 10)["step_s"]
    attention = resolve_attention(args.attention, dtype)
    norm = resolve_norm(args.norm, dtype, encoder_dims(config.model)[0])
    return {
        **result,
        "framework": "usfm_jax",
        "versions": f"jax {jax.__version__}",
        "device": device.device_kind if device.platform != "cpu" else cpu_name(),
        "device_count": jax.device_count(),
        "dtype": config.model.dtype,
        "options": f"attn {attention}, remat {args.remat}"
        + (f", {args.pallas_tiling}" if args.pallas_tiling else "")
        + (f", mlp {args.mlp}" if args.mlp != "xla" else "")
        + (f", {args.mlp_tiling}" if args.mlp_tiling else "")
        + (f", norm {norm}" if norm != "xla" else "")
        + (f", {args.norm_tiling}" if args.norm_tiling else "")
        + (", scan" if args.scan else "")
        + (", oneDNN matmuls" if cpu_options else "")
        + "".join(f", {flag}" for flag in args.xla_flag),
        "views_s": views_s,
        "ceiling_tflops": matmul_tflops(ceiling_s, n),
    }


def measure_torch(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks import torch_reference
    from usfm_jax import cpu_runtime

    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_runtime.keep_freed_memory()  # the same host allocator policy as the usfm_jax process
    device = torch.device("cuda" if cuda else "cpu")
    config = build_config(args, 1, cuda)
    problems = torch_reference.unsupported(config)
    if problems:
        sys.exit("error: the PyTorch reference does not implement: " + "; ".join(problems))
    torch.manual_seed(config.seed)
    torch.set_float32_matmul_precision("high")  # TF32 where float32 remains, as XLA on GPU
    compile_mode = None if args.torch_compile == "none" else args.torch_compile
    step = torch_reference.DualStep(config, device, compile_mode=compile_mode)
    batch = torch.from_numpy(synthetic_batch(config, args.batch_per_device)).to(device)
    sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
    result = measure(lambda: step.step(batch), sync, args.warmup, args.steps)
    dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    n = ceiling_size(args, cuda)
    a = torch.randn(n, n, device=device, dtype=dtype)
    ceiling_s = measure(lambda: a @ a, sync, 2, 10)["step_s"]
    name = torch.cuda.get_device_name() if cuda else cpu_name()
    return {
        **result,
        "framework": "PyTorch",
        "versions": f"torch {torch.__version__.split('+')[0]}",
        "device": name,
        "device_count": 1,
        "dtype": torch_reference.model_dtype_name(config),
        "options": f"timm, torch.compile {args.torch_compile}",
        "views_s": None,
        "ceiling_tflops": matmul_tflops(ceiling_s, n),
    }


# ------------------------------------------------------------------------------------------
# The harness: each framework in a child process, then one table
# ------------------------------------------------------------------------------------------


def run_child(framework: str, argv: list[str], args: argparse.Namespace) -> dict[str, Any] | None:
    """Measures ``framework`` in a fresh process; None (and its error shown) if it failed."""
    env = dict(os.environ)
    if framework == "torch":
        env["JAX_PLATFORMS"] = "cpu"  # the torch process must not claim the GPU for JAX
    elif args.xla_flag:
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *args.xla_flag]).strip()
    command = [sys.executable, os.path.abspath(__file__), *argv, "--framework", framework]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        print(f"{framework}: failed (exit {done.returncode})", file=sys.stderr)
        print(done.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(lines[-1][len(RESULT) :])


def summarise(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Adds images/s, TFLOP/s and MFU (per device) to a measurement."""
    config = build_config(args, result["device_count"], accelerator=False)
    step_s = result["step_s"]
    tflops = 3 * model_flops_per_view(config) * views_per_image(config) * args.batch_per_device
    tflops /= step_s * 1e12
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in result["device"]), None)
    views = result["views_s"]
    return {
        **result,
        "img_s": args.batch_per_device / step_s,
        "tflops": tflops,
        "mfu_peak": tflops / peak if peak else None,
        "mfu_ceiling": tflops / result["ceiling_tflops"],
        "views_share": views / step_s if views is not None else None,
    }


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Markdown rows (docs/benchmarks.md's columns); the ratio against the PyTorch row."""
    torch_img_s = next((r["img_s"] for r in rows if r["framework"] == "PyTorch"), None)
    lines = [
        "| date | device | framework | model | objective | dtype | options | batch/device "
        "| step ms | img/s/device | TFLOP/s/device | MFU (peak) | MFU (matmul ceiling) "
        "| views share | vs PyTorch |",
        "|---" * 15 + "|",
    ]
    for r in rows:
        ratio = f"{r['img_s'] / torch_img_s:.2f}x" if torch_img_s else "n/a"
        lines.append(
            f"| {datetime.date.today()} | {r['device']} | {r['versions']} "
            f"| ViT-{args.size}/16 {args.image} | {args.objective} | {r['dtype']} "
            f"| {r['options']} | {args.batch_per_device} | {1e3 * r['step_s']:.1f} "
            f"| {r['img_s']:.1f} | {r['tflops']:.3f} | {percent(r['mfu_peak'])} "
            f"| {percent(r['mfu_ceiling'])} of {r['ceiling_tflops']:.2f} "
            f"| {percent(r['views_share'])} | {ratio} |"
        )
    return lines


def _tiling_parser(cls: type[KernelTiling]) -> Callable[[str], KernelTiling]:
    """An argparse type for a kernel family's tiling ('name=value,...')."""

    def parse(text: str) -> KernelTiling:
        try:
            return cls.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


pallas_tiling = _tiling_parser(fused_attention.Tiling)
mlp_tiling = _tiling_parser(fused_mlp.MlpTiling)
norm_tiling = _tiling_parser(fused_norm.NormTiling)


def add_tiling_arguments(ap: argparse.ArgumentParser) -> None:
    """--pallas-tiling, --mlp-tiling, --norm-tiling: each Pallas kernel family's tiling (see
    ``install_tilings``)."""
    for flag, parse, kernels, example in (
        (
            "--pallas-tiling",
            pallas_tiling,
            "attention",
            "warps_dq=8 or bias_grad=dkv,...; models.fused_attention.Tiling",
        ),
        ("--mlp-tiling", mlp_tiling, "MLP", "block_m=64,warps=4; models.fused_mlp.MlpTiling"),
        ("--norm-tiling", norm_tiling, "LayerNorm", "rows=8,warps=8; models.fused_norm.NormTiling"),
    ):
        ap.add_argument(
            flag,
            type=parse,
            default=None,
            metavar="NAME=VALUE,...",
            help=f"block sizes / warps of the Pallas {kernels} kernels, e.g. {example}",
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="base")
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--batch-per-device", type=int, default=64)
    ap.add_argument("--objective", choices=("spatial", "frequency", "dual"), default="dual")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: bf16 on GPU/TPU)")
    ap.add_argument("--attention", choices=ATTENTION_IMPLEMENTATIONS, default="auto")
    ap.add_argument("--mlp", choices=MLP_IMPLEMENTATIONS, default="xla")
    ap.add_argument("--norm", choices=NORM_IMPLEMENTATIONS, default="auto")
    add_tiling_arguments(ap)
    ap.add_argument("--remat", choices=("none", "dots", "full"), default="none")
    ap.add_argument("--scan", action="store_true", help="one lax.scan over the blocks")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", metavar="DIR", help="also write a jax.profiler trace of 3 steps")
    ap.add_argument(
        "--frameworks", default="jax", help="comma-separated, measured in turn: jax, torch"
    )
    ap.add_argument(
        "--torch-compile",
        default="default",
        choices=("default", "max-autotune", "max-autotune-no-cudagraphs", "none"),
        help="torch.compile mode of the PyTorch reference",
    )
    ap.add_argument(
        "--ceiling",
        type=int,
        default=None,
        help="side of the square matmul measured as the ceiling (default 8192; 2048 on CPU)",
    )
    ap.add_argument(
        "--xla-flag",
        action="append",
        default=[],
        help="an extra XLA flag for the usfm_jax process, e.g. --xla-flag=--xla_cpu_use_onednn=true"
        " (repeatable)",
    )
    ap.add_argument("--json", metavar="FILE", help="append the measured rows as JSON lines")
    ap.add_argument("--framework", choices=FRAMEWORKS, help=argparse.SUPPRESS)  # a child
    args = ap.parse_args(argv)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    bad = sorted(set(frameworks) - set(FRAMEWORKS))
    if bad or not frameworks:
        ap.error(f"--frameworks {args.frameworks!r}: choose from {', '.join(FRAMEWORKS)}")
    args.frameworks = frameworks
    if args.pallas_tiling and args.attention != "pallas":
        ap.error("--pallas-tiling applies to --attention pallas only")
    if args.mlp_tiling and args.mlp not in PALLAS_IMPLEMENTATIONS:
        ap.error(f"--mlp-tiling applies to the Pallas MLP kernels (--mlp {PALLAS_IMPLEMENTATIONS})")
    if args.norm_tiling and args.norm == "xla":
        ap.error("--norm-tiling applies to the Pallas LayerNorm (--norm pallas, or auto on a GPU)")
    require_positive(ap, args, ("steps", "batch_per_device", "image"))
    return args


def require_positive(ap: argparse.ArgumentParser, args: argparse.Namespace, names) -> None:
    """Refuses, before any work, a count or size below 1 (it would fail only at the end)."""
    for name in names:
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")


def main() -> None:
    args = parse_args()
    if args.framework:  # a child: measure, report one line
        measure_fn = measure_jax if args.framework == "jax" else measure_torch
        print(RESULT + json.dumps(measure_fn(args)), flush=True)
        return
    argv = sys.argv[1:]
    rows = []
    for framework in args.frameworks:
        print(f"measuring {framework} ...", file=sys.stderr, flush=True)
        result = run_child(framework, argv, args)
        if result is not None:
            rows.append(summarise(result, args))
            print(
                f"{framework}: compile + first step {result['first_s']:.1f} s, "
                f"matmul ceiling {result['ceiling_tflops']:.2f} TFLOP/s",
                file=sys.stderr,
            )
    if not rows:
        sys.exit("error: no framework could be measured")
    print("\n".join(table(rows, args)))
    jax_row = next((r for r in rows if r["framework"] == "usfm_jax"), None)
    torch_row = next((r for r in rows if r["framework"] == "PyTorch"), None)
    if jax_row and torch_row:
        print(
            f"usfm_jax / PyTorch: {jax_row['img_s'] / torch_row['img_s']:.2f}x images/s "
            f"(step {1e3 * jax_row['step_s']:.1f} vs {1e3 * torch_row['step_s']:.1f} ms)"
        )
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "date": str(datetime.date.today())}) + "\n")
    if len(rows) < len(args.frameworks):
        sys.exit(1)


if __name__ == "__main__":
    main()
