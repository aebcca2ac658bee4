"""URFM: representation-based masked image modeling, ViT-B/16 student at 224, BiomedCLIP teacher.

URFM (Kang et al. 2025) publishes the idea and the released weights' shape (an MAE ViT-B/16
with a decoder 768 wide and 8 blocks deep, saved as a timm ViT), not the recipe. Our choices,
from its public peers (docs/urfm.md), marked "ours":
- student: MAE-style (encoder on the visible 25%, decoder with mask tokens), plain ViT
  (absolute positions, qkv bias), random patch masking at ratio 0.75 (MAE / MILAN; ours);
- targets: the teacher's patch tokens after its final norm, normalised per token by LayerNorm
  without affine (MaskDistill, FD; ours); loss smooth-L1 with beta 2 on masked tokens (FD; ours);
- teacher: BiomedCLIP's visual tower in open_clip's file (``--config.teacher.path``), fed the
  gray image with CLIP's own normalisation and size;
- optimizer: AdamW (0.9, 0.95), weight decay 0.05, base lr 1.5e-4 per 256 images -> 3e-4 per
  512, cosine decay to 0, no drop path (MAE; ours); gradients clipped at norm 5 as in the USFM
  recipe (a guard MAE does without; ours); 100k steps at batch 2048 with 10k warmup (ours); an
  EMA of the weights with decay 0.9999 (URFM's files hold EMA weights; the decay is ours),
  exported by default.

Arguments: ``size=base`` (encoder size), ``demo`` (a CPU-sized run of ``steps=400``: 64x64
images, a 4-block student, a decoder 64 wide and 2 deep, ratio 0.5, EMA 0.99; pass a small
teacher with a 4x4 patch grid: docs/urfm.md shows how to make one from the pixel demo).
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg
from configs.pretrain import demo, usfm_vitb16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="base", demo=False, steps=400)
    if args.demo:
        c = demo.get_config(f"steps={args.steps}")
    else:
        c = usfm_vitb16.get_config(f"size={args.size}")
    c.spatial.enabled = False
    c.frequency.enabled = False
    c.representation.enabled = True
    c.model.variant = "vit"
    c.model.in_chans = 3
    c.optimizer.update(base_lr=3e-4, b2=0.95, min_lr_ratio=0.0)
    c.model.drop_path_rate = 0.0
    c.ema_decay = 0.9999  # URFM released EMA weights (ours: the decay)
    if args.demo:
        c.representation.decoder.update(width=64, depth=2, num_heads=4)
        c.representation.ratio = 0.5  # 8 of 16 patches visible: enough context to learn from
        c.optimizer.update(base_lr=1.6e-2)
        c.image_every = 0  # no pixel branch: no image previews
        c.ema_decay = 0.99
    return c
