"""Device mesh, shardings, and host-local → global batches (data parallelism on every device)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over all devices of all hosts (or the given ones), axis 'data'."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the 'data' axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    """Raises unless the global batch splits evenly over devices and hosts."""
    n_dev = mesh.devices.size
    if global_batch_size % n_dev:
        raise ValueError(
            f"{what} {global_batch_size} is not divisible by the {n_dev} devices of the mesh; "
            f"use a multiple of {n_dev}"
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


def ensure_replicated(tree, mesh: Mesh):
    """Replicates a pytree on the mesh unless a leaf already is (the trainer's backbone is)."""
    devices = set(mesh.devices.flat)

    def place(x):
        if isinstance(x, jax.Array) and x.sharding.is_fully_replicated:
            if set(x.sharding.device_set) == devices:
                return x
        return jax.make_array_from_process_local_data(
            replicated(mesh), np.asarray(jax.device_get(x))
        )

    return jax.tree.map(place, tree)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    shards = {}
    for s in x.addressable_shards:
        start = s.index[0].start or 0
        shards.setdefault(start, s.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])

