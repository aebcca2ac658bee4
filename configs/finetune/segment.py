"""Fine-tuning for segment (see configs/finetune/common.py): on the synthetic breast lesion
task by default; argument ``steps=N,fraction=F,probe``."""

from __future__ import annotations

import ml_collections

from configs.finetune import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return common.get_config("segment", arg)
