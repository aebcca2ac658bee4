"""Ingest throughput and memory: files/s and the ingest process's peak memory as data grows.

    python benchmarks/ingest.py [--images 2000 8000] [--workers N] [--code DIR]

Writes synthetic B-mode PNGs (256x320, 4 organs of uneven size), then ingests the first N of
them (a CSV manifest) with the real ingest in a fresh process, once per N, with the default
options (shorter side 256, PNG level 6, train split only). Reports files/s and the ingest
process's peak resident memory (its workers not counted); memory that grows with N is memory
held per image, flat memory means the records stream to disk. ``--code`` benchmarks another
checkout of the repository (e.g. the commit before a change) on the same files.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import PIL.Image

from benchmarks.train_step import require_positive
from usfm_jax.data.synthetic import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the organs of every 20 files (60/25/10/5%): any first N files hold them in these shares
ORGANS = ["liver"] * 12 + ["kidney"] * 5 + ["thyroid"] * 2 + ["breast"]
SCENES = 256  # distinct synthetic scenes; the files are these, each stamped with its index
SIZE = (256, 320)
# run in a fresh process (``-c``), so that its peak memory is the ingest's alone
INGEST = """
import json, resource, sys, time
from usfm_jax.data.ingest import Options, ingest
if __name__ == "__main__":
    manifest, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    start = time.perf_counter()
    card = ingest(manifest, out, "bench", Options(crop="none"), workers=workers)
    print(json.dumps({
        "seconds": time.perf_counter() - start,
        "images": sum(card["images"]["train"].values()),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))
"""


def write_file(args: tuple[str, int]) -> tuple[str, str]:
    """Writes one PNG: a scene of its organ, its index stamped into the first pixels (no two
    files have the same pixels: the ingest keeps exact duplicates once)."""
    root, index = args
    organ = ORGANS[index % len(ORGANS)]
    image, _ = generate(0, index % SCENES, SIZE, organ=sorted(set(ORGANS)).index(organ))
    image[0, :4] = np.frombuffer(index.to_bytes(4, "little"), np.uint8)
    path = os.path.join(root, f"{index:07d}.png")
    PIL.Image.fromarray(image).save(path)
    return path, organ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--code", default=ROOT, help="the checkout whose ingest runs")
    args = ap.parse_args()
    require_positive(ap, args, ("workers",))
    if min(args.images) < 1:
        ap.error("--images must be >= 1")
    if not os.path.isfile(os.path.join(args.code, "usfm_jax", "data", "ingest.py")):
        ap.error(f"--code {args.code}: no usfm_jax/data/ingest.py there")
    count = max(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        files = os.path.join(tmp, "files")
        os.makedirs(files)
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            rows = pool.map(write_file, [(files, i) for i in range(count)], chunksize=64)
        size = sum(os.path.getsize(p) for p, _ in rows) / len(rows) / 1024
        print(f"{count} PNG files of {SIZE[0]}x{SIZE[1]}, {size:.0f} KiB each", flush=True)
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.code)}
        for n in sorted(args.images):
            manifest = os.path.join(tmp, f"first_{n}.csv")
            with open(manifest, "w", newline="") as f:
                csv.writer(f).writerows([("path", "organ"), *rows[:n]])
            out = os.path.join(tmp, f"out_{n}")
            result = subprocess.run(
                [sys.executable, "-c", INGEST, manifest, out, str(args.workers)], cwd=tmp,
                env=env, stdout=subprocess.PIPE, text=True, check=True,
            )  # fmt: skip
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            print(
                f"{n:>8} files: {figures['images'] / figures['seconds']:7.0f} files/s, "
                f"peak memory {figures['peak_rss_mib']:7.0f} MiB (ingest process; "
                f"{args.workers} workers)", flush=True,
            )  # fmt: skip


if __name__ == "__main__":
    main()
