"""Ablation: branches alternate from step to step.

Argument ``demo`` applies it to the CPU demo recipe instead of the full ViT-B/16 one.
"""

import ml_collections

from configs.common import ablation_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ablation_base(arg)
    c.objective.combine = "alternate"
    return c
