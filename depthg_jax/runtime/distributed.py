"""Multi-host start-up and the few cross-process helpers the drivers need.

Every command that can run on several hosts defines the same flags (`define_flags`) and
calls `initialize()` before touching devices.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import flags


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """--distributed (TPU/SLURM auto-detection) or --coordinator_address/--num_processes/
    --process_id (any cluster, and CPU tests with gloo); on `flag_values` (a command's own)."""
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() with auto-detection (TPU pods).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0 (multi-host runs outside TPU/SLURM).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "num_processes", None, "Number of processes (multi-host).", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "process_id", None, "This process's index (multi-host).", flag_values=flag_values
    )


def initialize(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Joins the other processes of a multi-host run (a no-op for a single process)."""
    f = flag_values
    if f.coordinator_address or (f.num_processes or 1) > 1:
        # CPU processes need a collectives backend (accelerators bring their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f.coordinator_address,
            num_processes=f.num_processes,
            process_id=f.process_id,
        )
    elif f.distributed:
        jax.distributed.initialize()


def describe() -> str:
    return (
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices "
        f"({jax.devices()[0].platform})"
    )


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a collective: all must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def sync(name: str) -> None:
    """A barrier across processes (a no-op for one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
