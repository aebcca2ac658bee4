"""The CPU demo: a small BEiT-style ViT learns dual MIM on synthetic B-mode images in minutes.

Same recipe as ``usfm_vitb16`` scaled down: 64x64 single-channel images, a 4-block ViT of width
128, batch 32, float32. Argument: ``steps=N`` changes the length.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg
from configs.pretrain import usfm_vitb16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, steps=600)
    c = usfm_vitb16.get_config("size=tiny")
    c.image_size = (64, 64)
    c.batch_size = 32
    c.total_steps = args.steps
    c.data.num_images = 4096
    c.data.num_threads = 2
    c.model.update(width=128, depth=4, num_heads=4, in_chans=1, dtype="float32", drop_path_rate=0.0)
    c.spatial.mask_patch_size = 16
    c.frequency.update(center_protect=2, base_bw=4, max_increase=8)
    c.optimizer.base_lr = 1.6e-2  # warmup: a tenth of total_steps, as in the full recipe
    c.checkpoint.every = 200
    c.log_every = 25
    # a preview every quarter of the run, also when --config.total_steps changes its length
    c.image_every = c.get_ref("total_steps") // 4
    c.probe.update(every=150, num_train=512, num_test=256)
    return c
