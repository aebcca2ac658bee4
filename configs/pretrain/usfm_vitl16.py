"""USFM dual MIM with a ViT-L/16 encoder (304M parameters), sharded with FSDP.

The recipe of ``usfm_vitb16`` with a larger encoder. Parameters and Adam moments take 3.6 GB in
float32; FSDP splits every large weight over ``mesh.fsdp`` devices (8: two v5p hosts of 4 chips,
or one 8-GPU node), so each holds about 1/8 of them, and blocks are rematerialised (``dots``:
matmul outputs kept) to fit the activations of a 2048 batch. Argument: ``size=huge`` for
ViT-H/16 (632M, over 16 devices) or ``size=giant`` for ViT-g/14 (1.0B, over 32), both with their
blocks scanned.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg
from configs.pretrain import usfm_vitb16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="large")
    c = usfm_vitb16.get_config(f"size={args.size}")
    c.mesh.fsdp = {"large": 8, "huge": 16, "giant": 32}.get(args.size, 8)
    c.mesh.data = -1  # the remaining devices (hosts, slices) split the batch
    c.model.remat = "dots"
    c.model.scan_layers = args.size in ("huge", "giant")  # 32-40 blocks: compile one
    c.model.drop_path_rate = {"large": 0.2, "huge": 0.3, "giant": 0.4}.get(args.size, 0.1)
    if args.size == "giant":  # ViT-g/14: 1.0B parameters
        c.model.patch_size = 14
        c.spatial.mask_patch_size = 28
    return c
