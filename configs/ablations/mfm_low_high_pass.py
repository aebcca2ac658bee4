"""Ablation: MFM's low-pass / high-pass mask instead of band-stop, with its spectral loss (and,
as MFM, the real part of the inverse FFT as the corrupted image, not its magnitude).

Argument ``demo`` applies it to the CPU demo recipe instead of the full ViT-B/16 one.
"""

import ml_collections

from configs.common import ablation_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ablation_base(arg)
    c.frequency.kind = "low_high_pass"
    c.frequency.output = "real"
    c.objective.frequency_pixel_weight = 0.0
    c.objective.frequency_fft_weight = 1.0
    return c
