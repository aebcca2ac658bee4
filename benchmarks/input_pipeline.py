"""Host input pipeline throughput: images/s per CPU core for decode + organ mix + augment + batch.

    python benchmarks/input_pipeline.py [--images 1024] [--source_size 256 320] [--threads 1]

Writes a small dataset with the real ingest (synthetic B-mode PNGs, 4 organs of uneven size,
shorter side 256 like the default ingest), then reads it through the pre-training pipeline
(`config.data.source = "tfds"`, balanced organs, default augmentations, 224x224 output) with
``--threads`` reader threads, and reports steady-state images/s and images/s per thread. A
single thread measures one core; the costs of the stages are measured alone for the analysis.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from benchmarks.train_step import require_positive
from configs.pretrain import usfm_vitb16
from usfm_jax.data.augment import AugmentConfig, augment
from usfm_jax.data.ingest import Options, ingest
from usfm_jax.data.pipeline import create_pretrain_dataset, decode_image
from usfm_jax.data.synthetic import generate


def write_exports(root: str, images: int, size: tuple[int, int]) -> None:
    shares = {"liver": 0.6, "kidney": 0.25, "thyroid": 0.1, "breast": 0.05}
    index = 0
    for organ_id, (organ, share) in enumerate(shares.items()):
        os.makedirs(os.path.join(root, organ))
        for _ in range(max(1, int(images * share))):
            image, _ = generate(0, index, size, organ=organ_id)
            PIL.Image.fromarray(image).save(os.path.join(root, organ, f"{index}.png"))
            index += 1


def per_image_ms(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return 1e3 * (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--source_size", type=int, nargs=2, default=(256, 320))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--png_compression", type=int, default=6, help="ingest's zlib level")
    ap.add_argument("--resize", type=int, default=256, help="ingest's shorter side")
    args = ap.parse_args()
    require_positive(ap, args, ("images", "threads", "batch", "batches"))
    if args.resize and args.resize < 224:  # the pipeline would upsample to 224 x 224
        ap.error(f"--resize {args.resize}: the benchmark trains at 224 px; give >= 224 (0: keep)")

    with tempfile.TemporaryDirectory() as tmp:
        write_exports(os.path.join(tmp, "exports"), args.images, tuple(args.source_size))
        options = Options(resize=args.resize, crop="none", png_compression=args.png_compression)
        exports, out = os.path.join(tmp, "exports"), os.path.join(tmp, "tfds")
        card = ingest(exports, out, "bench", options, workers=os.cpu_count())
        config = usfm_vitb16.get_config()
        config.data.update(source="tfds", tfds_dir=card["data_dir"], num_threads=args.threads,
                           prefetch=4)  # fmt: skip
        config.batch_size = args.batch
        it = iter(create_pretrain_dataset(config, process_index=0, process_count=1))
        for _ in range(3):  # warm-up: thread pools, caches, first block layout
            next(it)
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        elapsed = time.perf_counter() - start
        assert batch["image"].shape == (args.batch, 224, 224, 1)
        rate = args.batches * args.batch / elapsed

        source = tfds.builder_from_directory(card["data_dir"]).as_data_source(
            split="train", decoders={"image": tfds.decode.SkipDecoding()}
        )
        n = min(len(source), 200)
        decode_ms = per_image_ms(lambda i: decode_image(source[i % n]["image"]), n)
        raw = [decode_image(source[i]["image"]) for i in range(n)]
        cfg = AugmentConfig.from_mapping((224, 224), config.data.augment)
        rng = np.random.default_rng(0)
        augment_ms = per_image_ms(lambda i: augment(raw[i % n], rng, cfg), 4 * n)
        png = io.BytesIO()
        PIL.Image.fromarray(raw[0][..., 0]).save(
            png, format="PNG", compress_level=args.png_compression
        )

    kib = len(png.getvalue()) / 1024
    print(f"source {raw[0].shape[:2]} PNG (level {args.png_compression}) ~{kib:.0f} KiB -> "
          f"224x224, batch {args.batch}, "
          f"{args.threads} thread(s) on {os.cpu_count()} cores")  # fmt: skip
    print(f"pipeline: {rate:.0f} images/s = {rate / args.threads:.0f} images/s per thread")
    bound = 1e3 / (decode_ms + augment_ms)
    print(f"stages alone, one core: TFDS read + PNG decode {decode_ms:.2f} ms/image, "
          f"augment {augment_ms:.2f} ms/image (sequential bound {bound:.0f} images/s)")  # fmt: skip


if __name__ == "__main__":
    main()
