"""Compile time of the pre-training step with and without ``model.scan_layers``.

    python benchmarks/compile_time.py --sizes base,large [--remat dots]

Deep encoders compile every block separately unless the blocks run as one ``lax.scan``. This
lowers and compiles the real step (dual objective, 224 px, batch 8, one device) from abstract
shapes (no parameters are allocated) and prints the seconds each takes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from benchmarks.aot_memory import lower_step
from benchmarks.train_step import require_positive
from configs.pretrain import usfm_vitb16
from usfm_jax.models.vit import SIZES


def compile_seconds(size: str, scan: bool, remat: str, batch: int) -> tuple[float, float]:
    """(lowering s, compilation s) of one train step; lowering includes tracing the state's
    initialiser for its shapes (a fraction of a second)."""
    config = usfm_vitb16.get_config(f"size={size}")
    config.batch_size = batch
    config.model.update(scan_layers=scan, remat=remat)
    start = time.perf_counter()
    lowered = lower_step(config, jax.devices()[:1])[0]
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="base,large", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--remat", default="none", choices=("none", "dots", "full"))
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    sizes = [size.strip() for size in args.sizes.split(",")]
    bad = [size for size in sizes if size not in SIZES]
    if bad:
        named = ", ".join(map(repr, bad))
        ap.error(f"--sizes {args.sizes!r}: {named} not a size; choose from {', '.join(SIZES)}")
    args.sizes = sizes
    require_positive(ap, args, ("batch",))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = jax.devices()[0]
    print(
        f"# {datetime.date.today()}  jax {jax.__version__}  {device.platform}: {device.device_kind}"
    )
    print("| size | scan_layers | remat | lower (s) | compile (s) |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        for scan in (False, True):
            lower, compile_ = compile_seconds(size, scan, args.remat, args.batch)
            print(f"| {size} | {scan} | {args.remat} | {lower:.1f} | {compile_:.1f} |", flush=True)


if __name__ == "__main__":
    main()
