"""Ablation: masked patches filled with the image mean (the fill of USFM code's block-wise
masking, on the random mask-patches of the other rules).

Argument ``demo`` applies it to the CPU demo recipe instead of the full ViT-B/16 one.
"""

import ml_collections

from configs.common import ablation_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ablation_base(arg)
    c.spatial.rule = "mean"
    return c
