"""KNN positives: nearest-neighbour tables of backbone features, and the command that makes them.

Each training example is paired with one of its nearest neighbours (SPEC §8). The table
holds, for every example of a split, the indices of its top-k examples by cosine similarity of
global-average-pooled, L2-normalised backbone features (rank 0 is the example itself), exact,
in float32, ties broken by the lower index. It is computed on the train transform's crop
(resize shorter side, centre crop at data.train_res) and stored next to the dataset at

    <root>/knn/nns_<variant with '/' -> '-'>_<split>_<res>.npz   (keys: indices, ids)

so the trainer finds it from its config alone; the stored ids are checked against the split
when loading, so a table from another split, list or dataset is an error, not silent garbage.

Make one (all local devices; with --distributed, all processes of a multi-host job):

    python -m depthg_jax.data.knn --config=configs/coco.py --config.model.weights=PATH
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

KNN_COMMAND = "python -m depthg_jax.data.knn --config=<your config> --config.model.weights=<DINO>"


def knn_table_path(root: str, split: str, variant: str, res: int) -> str:
    """Where the KNN table of (dataset root, split, backbone variant, crop size) lives."""
    safe_variant = variant.replace("/", "-")
    return os.path.join(root, "knn", f"nns_{safe_variant}_{split}_{res}.npz")


def find_knn_table(root: str, split: str, res: int, variant: str = "") -> str:
    """The table for (root, split, res): of the given variant, or else the only one there.

    With no variant, exactly one ``nns_*_<split>_<res>.npz`` must exist; several are an error
    naming them (set data.knn_variant), none an error naming the command that makes one.
    """
    if variant:
        return knn_table_path(root, split, variant, res)
    folder = os.path.join(root, "knn")
    suffix = f"_{split}_{res}.npz"
    found = sorted(
        f
        for f in (os.listdir(folder) if os.path.isdir(folder) else [])
        if f.startswith("nns_") and f.endswith(suffix)
    )
    if len(found) > 1:
        raise ValueError(
            f"Several KNN tables for split {split!r} at {res} px in {folder}: {found}; "
            "choose one with data.knn_variant (or data.knn_path)"
        )
    if not found:
        raise FileNotFoundError(
            f"No KNN table {os.path.join(folder, 'nns_<variant>' + suffix)}. "
            f"Make it with: {KNN_COMMAND}"
        )
    return os.path.join(folder, found[0])


def normalize_features(features: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """L2-normalises rows (float32), as F.normalize: x / max(||x||, eps)."""
    f = np.asarray(features, np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), eps)


def compute_knn(features: np.ndarray, k: int = 30, chunk_size: int = 512) -> np.ndarray:
    """Exact cosine top-k of each row among all rows: (N,D) float32 -> (N,k) int32.

    Rank 0 is always the row itself; the rest follow by decreasing cosine similarity of the
    L2-normalised features (float32), ties by increasing index. Memory: chunk_size x N floats.
    """
    f = normalize_features(features)
    n = f.shape[0]
    if f.ndim != 2 or n == 0:
        raise ValueError(f"features must be (N,D) with N > 0, got shape {f.shape}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} neighbours need 1 <= k <= N={n} examples")
    out = np.empty((n, k), np.int32)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = f[start:stop] @ f.T
        rows_in_chunk = np.arange(stop - start)
        sims[rows_in_chunk, np.arange(start, stop)] = np.inf  # Self first, whatever the ties.
        # The k-th largest value per row; every value >= it is a candidate (ties included),
        # then candidates are ordered by (-similarity, index) and the first k kept.
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        rows, cols = np.nonzero(sims >= kth[:, None])
        order = np.lexsort((cols, -sims[rows, cols], rows))
        rows, cols = rows[order], cols[order]
        starts = np.searchsorted(rows, rows_in_chunk)
        out[start:stop] = cols[starts[:, None] + np.arange(k)]
    return out


def save_knn_table(path: str, indices: np.ndarray, ids: Sequence[str]) -> None:
    """Writes a KNN table atomically (temporary file, then rename)."""
    from depthg_jax import files

    table = {"indices": np.asarray(indices, np.int32), "ids": np.asarray(list(ids))}
    files.write_atomic(path, lambda f: np.savez(f, **table))


def load_knn_table(path: str, ids: Sequence[str] | None = None) -> np.ndarray:
    """Loads a KNN table's (N,k) indices; checks its ids against the split's when given."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No KNN table at {path}. Make it with: {KNN_COMMAND}")
    with np.load(path) as z:
        indices = np.asarray(z["indices"])
        table_ids = [str(i) for i in z["ids"]]
    if ids is not None and list(ids) != table_ids:
        raise ValueError(
            f"KNN table {path} was made for another list of {len(table_ids)} examples than "
            f"this split's {len(ids)}; remake it with: {KNN_COMMAND}"
        )
    if indices.ndim != 2 or indices.shape[0] != len(table_ids):
        raise ValueError(f"KNN table {path} has indices of shape {indices.shape}")
    return indices


def extract_features(
    source,
    feature_fn: Callable[[np.ndarray], np.ndarray],
    *,
    res: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """Pooled features (N,D) of every example of a source, in source order.

    Each process reads its share of every global batch (as the eval loader does, padded at
    the end). feature_fn maps this host's float32 ImageNet-normalised images (b,R,R,3) to the
    features of the whole global batch (G,D) in global order (single process: G = b); a
    (G,h,w,C) feature map is average-pooled over h, w.
    """
    import grain

    from depthg_jax.data import pipeline
    from depthg_jax.data.transforms import normalize_images

    n = len(source)
    batches = -(-n // global_batch_size)
    stream = pipeline.EvalStream(
        source,
        res=res,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        batches=batches,
    )
    ds = grain.MapDataset.source(stream).map(lambda ex: ex["image"]).batch(stream.local_batch)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
    feats = []
    for images in it:
        f = np.asarray(feature_fn(normalize_images(images)), np.float32)
        if f.ndim == 4:
            f = f.mean(axis=(1, 2))
        if f.shape[0] != global_batch_size:
            raise ValueError(
                f"feature_fn returned {f.shape[0]} rows for a global batch of {global_batch_size}"
            )
        feats.append(f)
    return np.concatenate(feats)[:n]


def build_knn_table(
    source,
    feature_fn: Callable[[np.ndarray], np.ndarray],
    *,
    res: int,
    global_batch_size: int,
    k: int = 30,
    process_index: int = 0,
    process_count: int = 1,
    path: str | None = None,
) -> np.ndarray:
    """Features of a source (see extract_features) -> (N, min(k,N)) KNN table; saved if path.

    Every process holds the same table and writes it (atomically), so hosts without a
    shared disk each get their copy and a shared disk simply gets the same file.
    """
    feats = extract_features(
        source,
        feature_fn,
        res=res,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    table = compute_knn(feats, k=min(k, len(source)))
    if path is not None:
        save_knn_table(path, table, source.ids)
        log.info("Wrote KNN table %s (%d x %d)", path, *table.shape)
    return table


def make_sharded_feature_fn(variant: str, params, dtype: str = "float32"):
    """A feature_fn running DinoViT jitted over all devices of all processes (batch on 'data').

    Host-local images become one global array sharded P('data') over a 1-D mesh; the pooled,
    L2-normalised features are gathered back to every process in global order.
    """
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from depthg_jax import xla
    from depthg_jax.models.vit import DinoViT

    model = DinoViT(variant, dtype=jnp.dtype(dtype))
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = NamedSharding(mesh, P("data"))
    params = jax.device_put(params, NamedSharding(mesh, P()))

    @xla.jit
    def embed(p, images):
        f = model.apply({"params": p}, images).mean(axis=(1, 2))
        return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-10)

    def feature_fn(local_images: np.ndarray) -> np.ndarray:
        images = jax.make_array_from_process_local_data(batch_sharding, local_images)
        out = embed(params, images)
        return np.asarray(multihost_utils.process_allgather(out, tiled=True))

    return feature_fn


def make_knn_table(config, *, per_device_batch: int = 8, k: int = 30) -> str:
    """Computes and writes the KNN table of config.data's train split; returns its path.

    Uses config.model.weights (random init only if config.model.allow_random_backbone) and
    the variant config.data.knn_variant or else config.model.variant.
    """
    import jax

    from depthg_jax.data import pipeline

    data_cfg = config.data
    variant = data_cfg.get("knn_variant", "") or config.model.variant
    path = data_cfg.get("knn_path", "") or knn_table_path(
        data_cfg.root, data_cfg.train_split, variant, data_cfg.train_res
    )
    source = pipeline.make_source_from_config(data_cfg, data_cfg.train_split)
    params = load_params(config, variant)
    global_batch = per_device_batch * jax.device_count()
    build_knn_table(
        source,
        make_sharded_feature_fn(variant, params, config.model.get("dtype", "float32")),
        res=data_cfg.train_res,
        global_batch_size=global_batch,
        k=k,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        path=path,
    )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("knn_table_written")
    return path


def load_params(config, variant: str):
    """Backbone params: converted weights, or the trainer's seeded random init when allowed.

    For the training variant this is exactly the backbone `train.train_and_evaluate` uses, so
    a demo run's neighbours come from the same (random) features it trains on.
    """
    import jax
    import jax.numpy as jnp

    from depthg_jax import train

    if variant == config.model.variant:
        return train.init_backbone(config, train.build_models(config), train.run_keys(config)[0])
    if config.model.weights:
        raise ValueError(
            f"config.model.weights holds {config.model.variant} weights but the KNN table is "
            f"requested for data.knn_variant={variant!r}: run the KNN command with "
            f"--config.model.variant={variant} and that variant's weights"
        )
    from depthg_jax.models.vit import DinoViT, patch_size

    train.check_backbone_weights(config)
    log.warning("KNN table from a RANDOMLY initialised %s backbone (no weights given)", variant)
    dummy = jnp.zeros((1, 2 * patch_size(variant), 2 * patch_size(variant), 3), jnp.float32)
    return DinoViT(variant).init(jax.random.key(config.seed), dummy)["params"]


def main(argv: Sequence[str]) -> None:
    del argv
    import jax

    if FLAGS.distributed:
        if FLAGS.coordinator_address:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(
                coordinator_address=FLAGS.coordinator_address,
                num_processes=FLAGS.num_processes,
                process_id=FLAGS.process_id,
            )
        else:
            jax.distributed.initialize()
    path = make_knn_table(FLAGS.config, per_device_batch=FLAGS.per_device_batch, k=FLAGS.k)
    if jax.process_index() == 0:
        print(f"KNN table: {path}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_integer("per_device_batch", 8, "Images per device per step.")
    flags.DEFINE_integer("k", 30, "Neighbours stored per example (rank 0 = itself).")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize (multi-host).")
    flags.DEFINE_string("coordinator_address", "", "host:port; CPU tests only (gloo).")
    flags.DEFINE_integer("num_processes", 1, "With --coordinator_address.")
    flags.DEFINE_integer("process_id", 0, "With --coordinator_address.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
