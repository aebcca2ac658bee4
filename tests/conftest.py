"""Test setup: 8 fake CPU devices for sharding tests, a shared compilation cache, and a tiny run
config."""

import json
import os
import subprocess
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# XLA's executables on disk, shared by the test workers and the runs they start as subprocesses
# (keyed by the program, the options and the devices: a hit is what compiling would give); the
# suite's many short runs of the same steps then compile each once.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax")),
)
# every executable, not only those that took a second to compile (JAX's default): the many
# small ones are compiled again by each worker and run otherwise (-8% time on a cold cache)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import ml_collections
import pytest
from absl import flags

from configs.pretrain import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The training CLI on the demo recipe, shrunk for runs in a subprocess (resume, signals, several
# processes): a 2-block ViT of width 32, no probes, a loss line every step, a checkpoint every 4.
DEMO_CLI = [
    sys.executable, "-m", "usfm_jax.train", "--config", "configs/pretrain/demo.py",
    "--config.model.width=32", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.probe.every=0", "--config.log_every=1", "--config.image_every=0",
    "--config.checkpoint.every=4", "--config.optimizer.warmup_steps=3",
]  # fmt: skip


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
    c.probe.every = 0  # tests/test_probe.py turns it on
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


@pytest.fixture
def tiny_config() -> ml_collections.ConfigDict:
    return make_tiny_config()


@pytest.fixture
def grain_worker_processes() -> None:
    """In-process runs with config.data.worker_count > 0: grain's worker processes read absl
    flags, which a program's app.run would have parsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def biomedclip_file(tmp_path, width=768, depth=12, heads=12, image=224, proj=512, seed=0):
    """An open_clip checkpoint with BiomedCLIP's key names and shapes (random weights): the
    timm ViT trunk under visual.trunk., the projection, and a text tower to be ignored.
    Returns (path, the timm trunk, the projection weight [proj, width])."""
    import timm
    import torch

    torch.manual_seed(seed)
    if (width, depth, heads, image) == (768, 12, 12, 224):  # BiomedCLIP's trunk, by name
        trunk = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    else:
        trunk = timm.models.vision_transformer.VisionTransformer(
            img_size=image, patch_size=16, embed_dim=width, depth=depth, num_heads=heads,
            num_classes=0, global_pool="token",
        )  # fmt: skip
    trunk.eval()
    with torch.no_grad():
        for p in trunk.parameters():  # away from the initial values (zero biases, unit norms)
            p.add_(0.05 * torch.randn_like(p))
    sd = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    weight = 0.05 * torch.randn(proj, width)
    sd["visual.head.proj.weight"] = weight
    sd["text.transformer.embeddings.word_embeddings.weight"] = torch.randn(30, 8)
    sd["text.proj.0.weight"] = torch.randn(8, 8)
    sd["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(sd, path)
    return path, trunk, weight


def compile_pallas_kernels(*args: str) -> list[dict]:
    """``benchmarks/pallas_kernels.py ARGS --json`` in a process of its own (Triton's compiler
    brings its own LLVM, kept out of the test workers): one dict per compiled kernel."""
    script = os.path.join(ROOT, "benchmarks", "pallas_kernels.py")
    run = subprocess.run(
        [sys.executable, script, *args, "--json"], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]
