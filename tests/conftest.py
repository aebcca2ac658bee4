"""Test setup: 8 fake CPU devices for sharding tests, and a tiny run config."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import ml_collections
import pytest

from configs.pretrain import demo


def make_tiny_config(**overrides) -> ml_collections.ConfigDict:
    """The demo recipe shrunk for tests: a 2-block ViT of width 32 on 32x48 images."""
    c = demo.get_config("steps=8")
    c.image_size = (32, 48)
    c.batch_size = 16
    c.data.num_images = 64
    c.model.update(width=32, depth=2, num_heads=2)
    c.frequency.update(center_protect=1, base_bw=3, max_increase=8, ratio=0.4)
    c.optimizer.update(warmup_steps=2)
    c.log_every = 4
    c.image_every = 4
    c.num_preview_images = 2
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


@pytest.fixture
def tiny_config() -> ml_collections.ConfigDict:
    return make_tiny_config()
