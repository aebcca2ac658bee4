"""Steady-state speed of the pre-training step: step time, images/s, model TFLOP/s and MFU.

    python benchmarks/train_step.py --size base --image 224 --batch-per-device 64 --objective dual
    python benchmarks/train_step.py --size tiny --batch-per-device 8 --steps 10     # CPU

Data loading is excluded (one fixed synthetic batch lives on the devices); warm-up steps are
excluded; the step time is the median of ``--steps`` synchronised steps. Model FLOPs are counted
analytically (matmuls and attention of every forward pass the objective runs, x3 for training).
The cost of building the corrupted views (mask sampling + FFT band-stop) is measured on its own
and reported as a share of the step.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from configs.pretrain import usfm_vitb16
from usfm_jax import parallel
from usfm_jax.config_validation import ConfigError, validate
from usfm_jax.data.synthetic import SyntheticUltrasound
from usfm_jax.models.factory import DTYPES, encoder_dims
from usfm_jax.models.vit import resolve_attention
from usfm_jax.train_step import create_training

# Dense bf16 peak per device, TFLOP/s (vendor figures).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5p": 459.0}


def model_flops_per_view(config) -> float:
    """Forward FLOPs of encoder + head for one image (multiply-add = 2 FLOPs)."""
    width, depth, _ = encoder_dims(config.model)
    p, (h, w) = config.model.patch_size, config.image_size
    n = (h // p) * (w // p)
    t = n + 1
    block = 2 * t * 12 * width**2 + 4 * t * t * width  # qkv, proj, mlp; QK^T and AV
    embed = 2 * n * p * p * config.model.in_chans * width
    head = 2 * n * width * p * p * config.model.out_chans
    return depth * block + embed + head


def timed(fn, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="base")
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--batch-per-device", type=int, default=64)
    ap.add_argument("--objective", choices=("spatial", "frequency", "dual"), default="dual")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: bf16 on GPU/TPU)")
    ap.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto")
    ap.add_argument("--remat", choices=("none", "dots", "full"), default="none")
    ap.add_argument("--scan", action="store_true", help="one lax.scan over the blocks")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", metavar="DIR", help="also write a jax.profiler trace of 3 steps")
    args = ap.parse_args()

    device = jax.devices()[0]
    accelerator = device.platform != "cpu"
    config = usfm_vitb16.get_config(f"size={args.size}")
    config.image_size = (args.image, args.image)
    config.batch_size = args.batch_per_device * jax.device_count()
    config.model.dtype = args.dtype or ("bfloat16" if accelerator else "float32")
    config.model.update(attention=args.attention, remat=args.remat, scan_layers=args.scan)
    config.spatial.enabled = args.objective in ("spatial", "dual")
    config.frequency.enabled = args.objective in ("frequency", "dual")
    try:
        validate(config, jax.device_count())
    except ConfigError as e:
        sys.exit(f"error: {e}")

    mesh = parallel.create_mesh(config.mesh)
    objective, _, state, step, _ = create_training(config, mesh)
    source = SyntheticUltrasound(config.batch_size, config.image_size)
    images = np.stack([source[i]["image"] for i in range(config.batch_size)])
    batch = {"image": jax.device_put(images, parallel.batch_sharding(mesh))}

    holder = [state]

    def run_step():
        holder[0], metrics = step(holder[0], batch)
        return metrics

    views = jax.jit(
        lambda b, s: objective.views(b["image"].astype(jnp.float32) / 255.0, jax.random.key(0), s)
    )
    compile_start = time.perf_counter()
    jax.block_until_ready(run_step())
    compile_s = time.perf_counter() - compile_start
    timed(run_step, args.warmup)
    step_s = statistics.median(timed(run_step, args.steps))
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            timed(run_step, 3)
    jax.block_until_ready(views(batch, jnp.int32(0)))
    views_s = statistics.median(timed(lambda: views(batch, jnp.int32(0)), args.steps))

    num_views = objective.num_views(config.batch_size)
    tflops = 3 * model_flops_per_view(config) * num_views / step_s / 1e12 / jax.device_count()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device.device_kind), None)
    mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
    print(f"device: {device.device_kind} x{jax.device_count()}, jax {jax.__version__}")
    print(f"compile + first step: {compile_s:.1f} s")
    attention = resolve_attention(args.attention, DTYPES[config.model.dtype])
    variant = f"attn {attention}, remat {args.remat}" + (", scan" if args.scan else "")
    print(
        "| date | device | model | objective | dtype | options | batch/device | step ms "
        "| img/s/device | TFLOP/s/device | MFU | views share |"
    )
    print(
        f"| {datetime.date.today()} | {device.device_kind} | ViT-{args.size}/16 {args.image} "
        f"| {args.objective} | {config.model.dtype} | {variant} | {args.batch_per_device} "
        f"| {1e3 * step_s:.1f} | {args.batch_per_device / step_s:.1f} | {tflops:.3f} | {mfu} "
        f"| {100 * views_s / step_s:.1f}% |"
    )


if __name__ == "__main__":
    main()
