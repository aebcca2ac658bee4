"""Device mesh and sharding rules: batches over the data axes, large weights over ``fsdp``."""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from usfm_jax import cpu_runtime

# dcn: data parallelism across TPU slices (or nodes), over the data-centre network;
# data: data parallelism within a slice; fsdp: data parallelism that also shards parameters.
MESH_AXES = ("dcn", "data", "fsdp")
BATCH_AXES = MESH_AXES  # the global batch is split over every axis


class MeshError(ValueError):
    """``config.mesh`` does not fit the devices at hand."""


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Axis sizes from ``config.mesh``; one axis may be -1 for "all remaining devices"."""
    sizes = [cfg[name] for name in MESH_AXES]
    described = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise MeshError(f"config.mesh: at most one axis may be -1, got {described}")
    bad = [n for n, s in zip(MESH_AXES, sizes, strict=True) if s == 0 or s < -1]
    if bad:
        raise MeshError(f"config.mesh.{bad[0]}={cfg[bad[0]]}: expected >= 1, or -1 for the rest")
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
        raise MeshError(f"config.mesh ({described}) does not divide {num_devices} devices")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"config.mesh ({described}) uses {math.prod(sizes)} devices, "
            f"but {num_devices} are present"
        )
    return tuple(sizes)


def batch_shards(sizes: Mapping[str, int]) -> int:
    """Into how many shards a batch splits on a mesh of axis ``sizes`` (``mesh.shape``)."""
    return math.prod(sizes[axis] for axis in BATCH_AXES)


def create_mesh(
    cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """The mesh ``config.mesh`` describes. On multi-slice TPUs (devices with a ``slice_index``)
    the ``dcn`` axis runs across slices and the others within one; elsewhere ``dcn`` is the
    outermost axis of the device order (across processes first)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    per_process = collections.Counter(d.process_index for d in devices)
    if len(set(per_process.values())) > 1:  # each process feeds batch_size / processes rows
        raise MeshError(
            f"the processes hold different numbers of devices ({dict(sorted(per_process.items()))}"
            " by process index): each process feeds an equal share of the batch, so give every "
            "process as many devices"
        )
    if hasattr(devices[0], "slice_index"):
        slices = len({d.slice_index for d in devices})
        if shape[0] != slices and (shape[0] > 1 or devices[0].platform == "tpu"):
            raise MeshError(
                f"config.mesh.dcn={cfg.dcn}: the devices form {slices} TPU slice(s) and dcn "
                f"runs across slices: set --config.mesh.dcn={slices}"
            )
        if shape[0] > 1:
            grid = mesh_utils.create_hybrid_device_mesh(
                (1, *shape[1:]), (shape[0], 1, 1), devices, allow_split_physical_axes=True
            )
            return Mesh(grid, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all mesh axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int) -> PartitionSpec:
    """Shards the largest dimension divisible by the fsdp axis; small arrays stay replicated."""
    if fsdp == 1 or int(np.prod(shape)) < min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def fsdp_misses(tree: Any, fsdp: int, min_size: int) -> float:
    """The share of ``tree``'s elements in arrays large enough for FSDP that stay replicated
    because no dimension divides by ``fsdp`` (0 without FSDP)."""
    arrays = [(x.shape, math.prod(x.shape)) for x in jax.tree.leaves(tree)]
    total = sum(size for _, size in arrays)
    if fsdp == 1 or not total:
        return 0.0
    missed = sum(
        size
        for shape, size in arrays
        if size >= min_size and fsdp_spec(shape, fsdp, min_size) == PartitionSpec()
    )
    return missed / total


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int) -> Any:
    """Shardings for a pytree of arrays (parameters and optimizer state alike, by shape)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp, min_size)), abstract_state
    )


def create_sharded(init: Callable[[], Any], mesh: Mesh, min_size: int) -> tuple[Any, Any]:
    """(``init()``, its shardings): the arrays are created in place, each in the sharding
    ``state_shardings`` gives it (never whole on one device first)."""
    shardings = state_shardings(jax.eval_shape(init), mesh, min_size)
    return jax.jit(init, out_shardings=shardings)(), shardings


def jit_in_mesh(fn: Callable, mesh: Mesh, **jit_kwargs) -> Callable:
    """``jax.jit(fn)``, traced with ``mesh`` as the context mesh (for ``per_batch_shard``) and
    compiled with ``cpu_runtime``'s options for the mesh's platform."""

    @functools.wraps(fn)
    def in_mesh(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    options = cpu_runtime.compiler_options(mesh.devices.flat)
    return jax.jit(in_mesh, compiler_options=options, **jit_kwargs)


def per_batch_shard(fn: Callable, shared: Sequence[int] = ()) -> Callable:
    """Runs ``fn`` on each device's slice of the leading (batch) axis of its arguments.

    For batch-wise ops that XLA's SPMD partitioner does not split: it runs the FFT on the whole
    gathered batch on every device, and a Pallas kernel (a custom call) likewise. Arguments at
    positions ``shared`` (or None) are passed whole to every device, e.g. a bias shared by the
    batch: the gradient of one sums over the shards. Without a context mesh (see
    ``jit_in_mesh``), or when the batch does not divide over the batch axes (e.g. a few preview
    images), ``fn`` runs as is.
    """

    @functools.wraps(fn)
    def wrapped(*args: jax.Array | None) -> Any:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return fn(*args)
        shards = batch_shards(mesh.shape)
        split = [i not in shared and x is not None for i, x in enumerate(args)]
        if shards == 1 or any(x.shape[0] % shards for x, s in zip(args, split, strict=True) if s):
            return fn(*args)
        spec = PartitionSpec(BATCH_AXES)
        in_specs = tuple(spec if s else PartitionSpec() for s in split)
        # check_vma off: a Pallas kernel's outputs carry no varying-axes type
        sharded = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)
        return sharded(*args)

    return wrapped


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pins an activation's leading (batch) axis to the mesh's batch axes, inside a step traced
    with a context mesh (``jit_in_mesh``): with FSDP, XLA then gathers weights, never the batch.
    A no-op without a mesh or when the batch does not divide over it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    shards = batch_shards(mesh.shape)
    if shards == 1 or x.shape[0] % shards:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH_AXES))
