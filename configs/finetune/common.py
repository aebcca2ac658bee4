"""The fine-tuning recipe shared by the three tasks (demo scale by default).

``get_config(task, arg)``: ``arg`` is the config file's argument string, e.g.
``--config=configs/finetune/classify.py:steps=600``. Defaults fit the synthetic tasks and the
CPU demo encoder (``configs/pretrain/demo.py``): 64x64 gray images, a 4-block ViT of width 128;
a checkpoint given as ``--config.init`` brings its own architecture and normalisation.

Where the literature has a recipe we follow its form: BEiT / USFM fine-tuning with layer-wise
lr decay and drop path 0.1; the UPerNet decoder of BEiT's segmentation; the linear probe on the
frozen encoder's mean-pooled tokens. The values (lr, layer decay, clip, UPerNet width) are ours,
for the demo; USFM's official ones for ViT-B/16 are in docs/finetune.md.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg
from configs.pretrain import demo


def get_config(task: str, arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, steps=300, fraction=1.0, probe=False)
    c = ml_collections.ConfigDict()
    c.task = task  # classify | segment | enhance
    c.seed = 0  # initialisation, label subset and data order; the splits do not depend on it
    # "" trains from random initialisation; else a usfm_jax workdir / step / export, or PyTorch
    # weights (.safetensors / .pth, or a hub directory), through usfm_jax.convert.
    c.init = ""
    c.init_format = "auto"  # PyTorch weights: auto | timm-beit | usfm | timm-vit | ...
    # PyTorch weights without a card: the input normalisation they were trained with ("": the
    # format's; imagenet | clip | inception | MEAN/STD, e.g. 0.5/0.25 for a gray model)
    c.init_normalization = ""
    c.init_num_heads = 0  # a plain ViT without a card, of a width no standard size has (0: none)
    c.label_fraction = args.fraction  # stratified, seeded subset of the training split
    c.image_size = (64, 64)  # position tables of a checkpoint are resampled to it
    c.batch_size = 32
    c.total_steps = args.steps
    c.log_every = 25
    c.max_bad_steps = 20  # stop after this many consecutive non-finite (skipped) steps
    c.eval_every = 50  # validation (and the best checkpoint) every N steps and at the end

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # breast lesion cases of the embedded generator, or "tfds"
    c.data.seed = 1234  # synthetic: the cases; fixed, so val / test never change
    c.data.num_train = 400
    c.data.num_val = 100
    c.data.num_test = 200
    c.data.tfds_dir = ""  # tfds: DATA_DIR/NAME/1.0.0 from usfm_jax.data.ingest (train/val/test)
    c.data.hflip = 0.5
    # enhance from clean images alone: none (pairs) | speckle | gaussian | downsample
    c.data.degradation = "none"
    # speckle: 0-1; gaussian: std; downsample: factor > 1; 0: the kind's default (1, 0.1, 2)
    c.data.degradation_level = 0.0
    c.data.num_threads = 2
    c.data.prefetch = 2  # batches read ahead: at least num_threads (a batch per thread)
    c.data.worker_count = 0

    # Used only without c.init (random initialisation); a checkpoint brings its own.
    c.normalization = ml_collections.ConfigDict(dict(mean=0.5, std=0.25))
    pretrain = demo.get_config()
    c.model = ml_collections.ConfigDict(pretrain.model.to_dict())
    c.model.drop_path_rate = 0.1

    c.head = ml_collections.ConfigDict()
    c.head.mode = "linear_probe" if args.probe else "finetune"  # or frozen encoder
    c.head.layer_decay = 0.75  # lr of block i: decay ** (depth - i); 1: none
    c.head.pool = "mean"  # classify: mean of patch tokens | cls
    c.head.decoder = "upernet"  # segment: upernet | linear (light)
    c.head.channels = 64  # segment: UPerNet width (512 in BEiT's ADE20K recipe)
    c.head.refine_width = 32  # enhance: width of the full-resolution refinement

    c.loss = ml_collections.ConfigDict(dict(label_smoothing=0.1, dice_weight=1.0))

    c.optimizer = ml_collections.ConfigDict(pretrain.optimizer.to_dict())
    c.optimizer.update(base_lr=4e-3, weight_decay=0.05, clip_norm=1.0, min_lr_ratio=0.01)
    c.optimizer.warmup_steps = c.get_ref("total_steps") // 10  # follows --config.total_steps
    c.mesh = ml_collections.ConfigDict(pretrain.mesh.to_dict())

    c.eval = ml_collections.ConfigDict()
    c.eval.select = ""  # the validation metric that picks the best step ("": the task's first)
    c.eval.num_overlays = 16  # test cases drawn as PNG overlays
    return c.lock()
