"""The grain pre-training pipeline: shapes, determinism, disjoint per-process shards."""

import itertools

import jax
import numpy as np
import pytest
from conftest import make_tiny_config

from usfm_jax import parallel
from usfm_jax.data.pipeline import create_pretrain_dataset, create_source, global_batch
from usfm_jax.data.synthetic import SyntheticUltrasound


def _fingerprints(config, process_index: int, process_count: int, batches: int) -> list[bytes]:
    ds = create_pretrain_dataset(config, process_index=process_index, process_count=process_count)
    out = []
    for batch in itertools.islice(iter(ds), batches):
        out.extend(image.tobytes() for image in batch["image"])
    return out


def test_batches_have_the_configured_shape_and_type():
    config = make_tiny_config()
    batch = next(iter(create_pretrain_dataset(config, process_index=0, process_count=1)))
    assert batch["image"].shape == (16, 32, 48, 1) and batch["image"].dtype == np.uint8
    assert batch["organ"].shape == (16,)


def test_stream_is_deterministic_and_reshuffled_each_epoch():
    config = make_tiny_config()
    config.data.num_images = 32  # two batches of 16 per epoch
    first = _fingerprints(config, 0, 1, 4)
    assert first == _fingerprints(config, 0, 1, 4)
    epoch1, epoch2 = first[:32], first[32:]
    assert sorted(epoch1) == sorted(epoch2) and len(set(epoch1)) == 32  # every image once
    assert epoch1 != epoch2  # in a new order


def test_processes_read_disjoint_slices_that_cover_the_data():
    config = make_tiny_config()
    config.data.num_images = 64
    shards = [_fingerprints(config, i, 4, 4) for i in range(4)]  # 4 x 4 batches of 4 = 64
    assert all(len(s) == 16 for s in shards)
    seen = [f for s in shards for f in s]
    assert len(set(seen)) == 64
    assert set(seen) == {SyntheticUltrasound(64, (32, 48))[i]["image"].tobytes() for i in range(64)}


def test_global_batches_do_not_depend_on_the_number_of_processes():
    config = make_tiny_config()
    one = _fingerprints(config, 0, 1, 2)  # two global batches of 16
    four = [_fingerprints(config, p, 4, 2) for p in range(4)]  # 2 x 4 rows per process
    for k in range(2):
        rows = [f for p in range(4) for f in four[p][4 * k : 4 * k + 4]]
        assert rows == one[16 * k : 16 * (k + 1)]


def test_batch_not_divisible_by_processes_is_rejected():
    config = make_tiny_config()
    with pytest.raises(ValueError, match="batch_size=16 is not divisible by the 3 processes"):
        create_pretrain_dataset(config, process_index=0, process_count=3)
    config.data.source = "dicom"
    with pytest.raises(ValueError, match=r"config\.data\.source='dicom'"):
        create_source(config.data, config.image_size, 0)


def test_global_batch_is_sharded_over_the_mesh():
    config = make_tiny_config()
    config.mesh.update(data=4, fsdp=2)
    mesh = parallel.create_mesh(config.mesh)
    local = next(iter(create_pretrain_dataset(config, process_index=0, process_count=1)))
    batch = global_batch(local, mesh)
    assert batch["image"].sharding.spec == parallel.batch_sharding(mesh).spec
    assert len(batch["image"].addressable_shards) == 8
    assert batch["image"].addressable_shards[0].data.shape == (2, 32, 48, 1)
    np.testing.assert_array_equal(jax.device_get(batch["image"]), local["image"])
