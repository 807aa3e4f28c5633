"""Every random key of a run, derived from config.seed in one place.

The trainer, the KNN command and export all need the same backbone init for a random
backbone (demo, tests), so the derivation must not be repeated.
"""

from __future__ import annotations

import jax


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(backbone init, train-state init, per-step root) keys of a run."""
    k_backbone, k_state, k_step = jax.random.split(jax.random.key(seed), 3)
    return k_backbone, k_state, k_step


def knn_dropout_key(seed: int) -> jax.Array:
    """Root key of the KNN features' release-style dropout (folded with the batch index)."""
    return jax.random.fold_in(jax.random.key(seed), 0x6B6E6E)  # "knn"
