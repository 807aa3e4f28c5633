"""Finite or nothing: an on-device all-finite flag per step, checked in batches on the host
before anything of a step is saved or logged; the error names the step and its examples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from depthg_jax.data import pipeline


def all_finite(metrics: dict, state) -> jax.Array:
    """One on-device bool: every metric (loss, grad norm...) and every state leaf is finite."""
    leaves = jax.tree.leaves((metrics, state.params, state.opt_state))
    flags = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags))


def require_finite_steps(config, pending: list[tuple[int, dict]]) -> None:
    """Fetches the on-device finite flags of the steps run since the last check, in one
    transfer, and clears `pending`; the first non-finite step raises (before anything of it
    can be checkpointed), naming the step (1-based) and the batch's example ids.

    Checked before every save, log and stop rather than every step, so the host does not wait
    for each step to finish (a NaN stays in the state: no later state is finite either).
    """
    flags = jax.device_get([metrics["finite"] for _, metrics in pending])
    bad_steps = [item for item, ok in zip(pending, flags, strict=True) if not ok]
    pending.clear()
    if bad_steps:
        require_finite_step(config, *bad_steps[0])


def require_finite_step(config, step: int, metrics: dict) -> None:
    """Fetches the step's on-device finite flag (one bool); a non-finite step raises before it
    can be checkpointed, naming the step (1-based) and the batch's example ids."""
    if bool(jax.device_get(metrics.get("finite", True))):
        return
    fetched = jax.device_get({k: v for k, v in metrics.items() if k != "finite"})
    values = {k: float(np.asarray(v)) for k, v in fetched.items() if np.ndim(v) == 0}
    bad = sorted(k for k, v in values.items() if not np.isfinite(v)) or ["the train state"]
    ids = _batch_example_ids(config, step - 1)
    where = f"; the batch's examples (anchor/positive): {ids}" if ids else ""
    raise FloatingPointError(
        f"non-finite values at step {step} in {bad}{where}; stopping before this state is "
        "checkpointed (lower the lr or check those examples' files)"
    )


def _batch_example_ids(config, batch_index: int) -> list[str]:
    """The (anchor/positive) ids of global batch `batch_index` (error path; [] if unknown)."""
    try:
        from depthg_jax.data import knn, streams

        source = pipeline.make_source(config.data, config.data.train_split)
        neighbors = knn.load_knn_table(
            pipeline.knn_path(config.data), source.ids, num_neighbors=config.data.num_neighbors
        )
        stream = streams.TrainStream(
            source, neighbors, res=config.data.train_res, num_neighbors=config.data.num_neighbors,
            seed=config.seed, global_batch_size=config.train.batch_size, process_index=0,
            process_count=1,
        )  # fmt: skip
        ids = source.ids
        g0 = batch_index * config.train.batch_size
        pairs = (stream.indices(g) for g in range(g0, g0 + config.train.batch_size))
        return [f"{ids[a]}/{ids[p]}" for a, p in pairs]
    except Exception:  # noqa: BLE001 - prepared records, or the table moved: no ids to add
        return []


def check_finite(step: int, metrics: dict) -> None:
    bad = {k: v for k, v in metrics.items() if not np.all(np.isfinite(v))}
    if bad:
        raise FloatingPointError(
            f"non-finite metrics at step {step}: {bad}; stopping (lower the lr or check the data)"
        )
