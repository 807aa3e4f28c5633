"""The device mesh ('data', 'model'), shardings, placement, and host-local <-> global batches.

Every program runs on one 2-D mesh of all devices of all hosts: `make_mesh(model=M)` has M
devices along 'model' and the rest along 'data'. Batches split their leading axis over
'data' (`batch_sharding`); the frozen backbone's parameters split over 'model' by the rules
beside the ViT (models/partitioning.py); everything else (heads, probes, optimiser state,
hyperparameters) is replicated. M = 1 (`config.mesh.model`, the default) is plain data
parallelism over every device, as before the mesh had a second axis. docs/pods.md argues the
layout.

Each row of the mesh (the M devices of one 'data' index) lies inside one process, so every
process feeds whole rows and its share of a batch is its rows: the batch divided by the
number of processes, as with data parallelism alone.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
AXES = (DATA_AXIS, MODEL_AXIS)


def make_mesh(devices: list | None = None, model: int = 1) -> Mesh:
    """A (devices / model, model) mesh over all devices of all hosts (or the given ones).

    Devices keep JAX's order (grouped by process), so each row of `model` devices lies in one
    process; a `model` that does not divide each process's devices is refused.
    """
    devices = jax.devices() if devices is None else list(devices)
    model = int(model)
    if model < 1 or len(devices) % model:
        raise ValueError(
            f"mesh.model={model} does not divide the {len(devices)} devices: use a divisor of "
            f"{len(devices)}"
        )
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // model, model)
    for row in grid:
        processes = {d.process_index for d in row}
        if len(processes) > 1:
            local = sum(d.process_index == row[0].process_index for d in devices)
            raise ValueError(
                f"mesh.model={model} spans processes {sorted(processes)}: each process has "
                f"{local} devices, and a row of the 'model' axis must lie inside one process "
                f"(use a divisor of {local}; docs/pods.md#multi-host)"
            )
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def model_axis(config) -> int:
    """config.mesh.model (1 for configs written before the mesh had a 'model' axis)."""
    mesh_cfg = config.get("mesh") if hasattr(config, "get") else None
    return int(mesh_cfg.get("model", 1)) if mesh_cfg is not None else 1


def mesh_for(config, devices: list | None = None) -> Mesh:
    """The mesh a config asks for: config.mesh.model along 'model', over all devices."""
    return make_mesh(devices, model_axis(config))


def data_size(mesh: Mesh) -> int:
    """Devices along 'data': the ways a batch splits."""
    return int(mesh.shape[DATA_AXIS])


def model_size(mesh: Mesh) -> int:
    """Devices along 'model': the ways a backbone parameter splits."""
    return int(mesh.shape[MODEL_AXIS])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the 'data' axis, replicated along 'model'."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    """Raises unless the global batch splits evenly over the 'data' axis and the hosts."""
    n_data, n_model = data_size(mesh), model_size(mesh)
    if global_batch_size % n_data:
        where = f"the {n_data} devices of the mesh"
        if n_model > 1:
            where += f"'s 'data' axis ({mesh.devices.size} devices / mesh.model={n_model})"
        raise ValueError(
            f"{what} {global_batch_size} is not divisible by {where}; use a multiple of {n_data}"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"{what} {global_batch_size} is not divisible by {jax.process_count()} processes"
        )


def host_to_global(batch: dict, mesh: Mesh) -> dict:
    """Assembles each process's share of a batch into global arrays sharded over 'data'."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def replicate(tree, mesh: Mesh):
    """Places a host pytree (identical on every host) replicated on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def place(tree, shardings, dtype=None):
    """Puts every leaf of `tree` on its sharding (a matching tree of NamedShardings).

    Host leaves (numpy, identical on every host) are cut into the shards this process's
    devices hold, and only those are copied; device arrays already on their sharding are kept
    as they are, others are moved (a reshard on device). `dtype` casts floating leaves first
    (one leaf at a time on the host: never a second copy of the whole tree).
    """

    def put(x, sharding):
        if dtype is not None and jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
            x = x.astype(dtype) if isinstance(x, jax.Array) else np.asarray(x).astype(dtype)
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            return _reshard(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def _reshard(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    if x.is_fully_addressable and sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.jit(lambda y: y, out_shardings=sharding)(x)


def host_copy(tree):
    """A numpy copy of a pytree of (possibly sharded, multi-host) arrays, on every process.

    A leaf whose shards this process holds in full (every replicated leaf; every backbone
    leaf, since a 'model' row lies inside one process) is assembled from its local shards;
    any other is gathered from the processes that hold it.
    """

    def fetch(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable or x.sharding.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        out = np.empty(x.shape, x.dtype)
        covered = np.zeros(x.shape, bool)
        for shard in x.addressable_shards:
            out[shard.index] = np.asarray(shard.data)
            covered[shard.index] = True
        if covered.all():
            return out
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    shards = {}
    for s in x.addressable_shards:
        start = s.index[0].start or 0
        shards.setdefault(start, s.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def shard_bytes(x) -> int:
    """Bytes one device holds of an array (or ShapeDtypeStruct) with a sharding."""
    shape = x.sharding.shard_shape(x.shape)
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
