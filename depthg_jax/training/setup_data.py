"""Data preparation the trainer does on first use: the generated demo set and its KNN table.

Real datasets must already exist with their KNN table (the loader's error names the command
that makes it); only the synthetic set is generated here.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from depthg_jax.data import knn, synthetic
from depthg_jax.runtime import distributed


def prepare_data(config: ml_collections.ConfigDict) -> None:
    """Generates the synthetic set (process 0) and its KNN table if missing (resolved config)."""
    data = config.data
    if data.name != "synthetic":
        return
    if jax.process_index() == 0:
        synthetic.generate_dataset(
            data.root,
            num_train=data.synthetic_train,
            num_val=data.synthetic_val,
            size=data.synthetic_size,
            seed=data.synthetic_seed,
        )
    distributed.sync("synthetic-data")
    if not os.path.exists(data.knn_path):
        print(f"Building the KNN table {data.knn_path} with the configured backbone", flush=True)
        knn.make_knn_table(config)
