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
import jax.numpy as jnp
from flax import nnx

from benchmarks.train_step import require_positive
from configs.pretrain import usfm_vitb16
from usfm_jax import parallel
from usfm_jax.models.vit import SIZES
from usfm_jax.objectives.dual import create_objective
from usfm_jax.optim import create_optimizer
from usfm_jax.train_step import (
    abstract_model,
    jit_train_step,
    make_train_step,
    state_initializer,
)


def compile_seconds(size: str, scan: bool, remat: str, batch: int) -> tuple[float, float]:
    """(lowering s, compilation s) of one train step."""
    config = usfm_vitb16.get_config(f"size={size}")
    config.batch_size = batch
    config.model.update(scan_layers=scan, remat=remat)
    mesh = parallel.create_mesh(config.mesh, jax.devices()[:1])
    tx, schedule = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    state = jax.eval_shape(state_initializer(config, tx))
    shardings = parallel.state_shardings(state, mesh, config.mesh.fsdp_min_size)
    graphdef = nnx.graphdef(abstract_model(config))
    step = make_train_step(config, graphdef, create_objective(config), tx, schedule)
    h, w = config.image_size
    images = jax.ShapeDtypeStruct((batch, h, w, 1), jnp.uint8)
    start = time.perf_counter()
    lowered = jit_train_step(step, shardings, mesh).lower(state, {"image": images})
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
