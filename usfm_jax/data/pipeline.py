"""grain input pipeline of pre-training: source -> shuffle -> batch -> host shard -> prefetch.

Every process reads a disjoint, deterministic block of each global batch of the shuffled stream;
``global_batch`` assembles those blocks into one ``jax.Array`` on the mesh. The global batches do
not depend on the number of processes.
"""

from __future__ import annotations

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from usfm_jax import parallel
from usfm_jax.data.synthetic import SyntheticUltrasound

SOURCES = ("synthetic",)


def create_source(
    cfg: ml_collections.ConfigDict, image_size: tuple[int, int], seed: int
) -> grain.sources.RandomAccessDataSource:
    """The random-access source named by ``config.data.source``."""
    if cfg.source == "synthetic":
        return SyntheticUltrasound(cfg.num_images, tuple(image_size), seed=seed)
    raise ValueError(f"config.data.source={cfg.source!r}: expected one of {SOURCES}")


def create_pretrain_dataset(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """An endless dataset of this process's share of each global batch.

    Elements are dicts of numpy arrays: ``image`` uint8 [B_local, H, W, 1], ``organ`` int32
    [B_local]; reshuffled every epoch.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if config.batch_size % process_count:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by "
            f"the {process_count} processes"
        )
    source = create_source(config.data, config.image_size, config.seed)
    ds = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
    # Global batch k is items [k B, (k + 1) B) of the stream whatever the number of processes;
    # process p holds its p-th block of rows, the rows its devices own in the global array.
    ds = ds.batch(config.batch_size // process_count, drop_remainder=True)
    ds = ds[process_index::process_count]
    return ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=config.data.num_threads,
            prefetch_buffer_size=config.data.prefetch,
        )
    )


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's batch -> one global array per key, sharded over the mesh's batch axes."""
    sharding = parallel.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
