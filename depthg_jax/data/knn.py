"""KNN positives: nearest-neighbour tables of backbone features, and the command that makes them.

Each training example is paired with one of its nearest neighbours (docs/data.md). The table
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

import dataclasses
import io
import logging
import os
import zipfile
from collections.abc import Callable, Sequence

import numpy as np
from etils import epath

from depthg_jax import commands
from depthg_jax.data import datasets, streams
from depthg_jax.method.image_ops import l2_normalize, normalize_images

log = logging.getLogger(__name__)

KNN_COMMAND = "python -m depthg_jax.data.knn --config=<your config> --config.model.weights=<DINO>"


def knn_table_path(root: str, split: str, variant: str, res: int) -> str:
    """Where the KNN table of (dataset root or records dir, split, backbone, crop size) lives."""
    safe_variant = variant.replace("/", "-")
    return os.path.join(str(root), "knn", f"nns_{safe_variant}_{split}_{res}.npz")


def find_knn_table(root: str, split: str, res: int, variant: str = "", command=KNN_COMMAND) -> str:
    """The table for (root, split, res): of the given variant, or else the only one there.

    With no variant, exactly one ``nns_*_<split>_<res>.npz`` must exist; several are an error
    naming them (set data.knn_variant), none an error naming the command that makes one.
    Paths may be local or anything etils.epath reads (gs://).
    """
    if variant:
        return knn_table_path(root, split, variant, res)
    folder = epath.Path(root) / "knn"
    suffix = f"_{split}_{res}.npz"
    found = sorted(
        p.name
        for p in (folder.iterdir() if folder.exists() else [])
        if p.name.startswith("nns_") and p.name.endswith(suffix)
    )
    if len(found) > 1:
        raise ValueError(
            f"Several KNN tables for split {split!r} at {res} px in {folder}: {found}; "
            "choose one with data.knn_variant (or data.knn_path)"
        )
    if not found:
        raise FileNotFoundError(
            f"No KNN table {folder / ('nns_<variant>' + suffix)}. Make it with: {command}"
        )
    return str(folder / found[0])


def compute_knn(features: np.ndarray, k: int = 30, chunk_size: int = 512) -> np.ndarray:
    """Exact cosine top-k of each row among all rows: (N,D) float32 -> (N,k) int32.

    Rank 0 is always the row itself; the rest follow by decreasing cosine similarity of the
    L2-normalised features (float32), ties by increasing index. Memory: chunk_size x N floats.
    """
    f = l2_normalize(np.asarray(features, np.float32), axis=1, eps=1e-10)
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


def source_fingerprint(source) -> str | None:
    """SHA-256 over (id, image file size, mtime) of every example of a loose-file source, so a
    table made for the same ids but other images is caught; None for other sources."""
    import hashlib

    records = getattr(source, "records", None)
    if not records:
        return None
    digest = hashlib.sha256()
    try:
        for rec in records:
            st = os.stat(rec.image)
            digest.update(f"{rec.id}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except (OSError, AttributeError, TypeError):
        return None
    return digest.hexdigest()


def save_knn_table(
    path: str, indices: np.ndarray, ids: Sequence[str], fingerprint: str | None = None
) -> None:
    """Writes a KNN table atomically (temporary name beside it, then rename; local or gs://).

    fingerprint: `source_fingerprint` of the images it was computed on (checked on load)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    extra = {"fingerprint": np.asarray(fingerprint)} if fingerprint else {}
    np.savez(buffer, indices=np.asarray(indices, np.int32), ids=np.asarray(list(ids)), **extra)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)  # atomic; a concurrent writer of the same table may have been first


def load_knn_table(
    path: str,
    ids: Sequence[str] | None = None,
    command=KNN_COMMAND,
    fingerprint: str | None = None,
    num_neighbors: int | None = None,
) -> np.ndarray:
    """Loads a KNN table's (N,k) indices; checks its ids against the split's when given, and
    its images' fingerprint when both the table and the caller have one.

    The indices are checked too (`check_knn_indices`): integers, one row per example, more
    columns than num_neighbors (when given), every index in [0, N), each row starting with
    itself. Any failure is a ValueError naming the table and `command`, which remakes it."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No KNN table at {path}. Make it with: {command}")
    try:
        with np.load(io.BytesIO(path.read_bytes())) as z:
            indices = np.asarray(z["indices"])
            table_ids = [str(i) for i in z["ids"]]
            table_print = str(z["fingerprint"]) if "fingerprint" in z.files else None
    except (OSError, ValueError, KeyError, MemoryError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"KNN table {path} is unreadable ({e}); make it again with: {command}"
        ) from e
    if ids is not None and list(ids) != table_ids:
        raise ValueError(
            f"KNN table {path} was made for another list of {len(table_ids)} examples than "
            f"this split's {len(ids)}; remake it with: {command}"
        )
    if fingerprint and table_print and fingerprint != table_print:
        raise ValueError(
            f"KNN table {path} was made for the same {len(table_ids)} ids but other image files "
            f"(their sizes or modification times differ); remake it with: {command}"
        )
    try:
        check_knn_indices(indices, len(table_ids), num_neighbors, where=f"KNN table {path}")
    except ValueError as e:
        raise ValueError(f"{e}; remake it with: {command}") from None
    return indices


def check_knn_indices(
    indices: np.ndarray, n: int, num_neighbors: int | None = None, where: str = "KNN table"
) -> None:
    """Raises ValueError (starting with `where`) unless `indices` is a KNN table of n examples:
    an integer (n, k) array, k > num_neighbors (k >= 1 without it), every index in [0, n) and
    rank 0 of each row the row itself (as `compute_knn` makes it)."""
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{where} holds {indices.dtype} indices, not integers")
    if indices.ndim != 2 or indices.shape[0] != n:
        raise ValueError(
            f"{where} has indices of shape {indices.shape}, expected ({n}, k): one row per example"
        )
    need = 1 if num_neighbors is None else num_neighbors + 1
    if indices.shape[1] < need:
        raise ValueError(
            f"{where} has {indices.shape[1]} columns but data.num_neighbors={num_neighbors} needs "
            f"at least {need} (rank 0 is the example itself)"
        )
    outside = (indices < 0) | (indices >= n)
    if outside.any():
        row = int(np.flatnonzero(outside.any(axis=1))[0])
        raise ValueError(
            f"{where} has {int(outside.sum())} indices outside [0, {n}), e.g. row {row}: "
            f"{indices[row, : min(8, indices.shape[1])].tolist()}"
        )
    not_self = indices[:, 0] != np.arange(n)
    if not_self.any():
        row = int(np.flatnonzero(not_self)[0])
        raise ValueError(
            f"{where}: {int(not_self.sum())} rows do not start with the example itself, e.g. "
            f"row {row} starts with {int(indices[row, 0])}"
        )


def extract_features(
    source,
    feature_fn: Callable[[np.ndarray], np.ndarray],
    *,
    res: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    progress: bool = False,
) -> np.ndarray:
    """Pooled features (N,D) of every example of a source, in source order.

    Each process reads its share of every global batch (as the eval loader does, padded at
    the end). feature_fn maps this host's float32 ImageNet-normalised images (b,R,R,3) to the
    features of the whole global batch (G,D) in global order (single process: G = b); a
    (G,h,w,C) feature map is average-pooled over h, w.
    """
    import grain
    from tqdm import tqdm

    n = len(source)
    batches = -(-n // global_batch_size)
    stream = streams.EvalStream(
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
    for images in tqdm(it, total=batches, desc="knn features", unit="batch", disable=not progress):
        f = np.asarray(feature_fn(normalize_images(images)), np.float32)
        if f.ndim == 4:
            f = f.mean(axis=(1, 2))
        if f.shape[0] != global_batch_size:
            raise ValueError(
                f"feature_fn returned {f.shape[0]} rows for a global batch of {global_batch_size}"
            )
        feats.append(f)
    out = np.concatenate(feats)[:n]
    if not np.all(np.isfinite(out)):
        bad = np.flatnonzero(~np.all(np.isfinite(out), axis=1))
        raise FloatingPointError(
            f"non-finite backbone features for {len(bad)} example(s), e.g. "
            f"{source.ids[bad[0]]!r}: check the backbone weights"
        )
    return out


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
    progress: bool = False,
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
        progress=progress,
    )
    table = compute_knn(feats, k=min(k, len(source)))
    if path is not None:
        save_knn_table(path, table, source.ids, source_fingerprint(source))
        log.info("Wrote KNN table %s (%d x %d)", path, *table.shape)
    return table


def backbone_features(spec):
    """features(params, images) of the KNN command: the frozen backbone of `spec` (a ModelSpec)
    on ImageNet-normalised float32 images (B, R, R, 3)."""
    from depthg_jax.models import model as model_lib

    return lambda p, images: model_lib.frozen_features(spec, p, images, normalized=True)


def embedding_program(features, *, dropout: float = 0.0):
    """The jitted (params, images, key) -> pooled, L2-normalised features (B, C) that
    `make_sharded_feature_fn` runs; dropout > 0 applies channel dropout drawn from `key`."""
    import jax.numpy as jnp

    from depthg_jax.models.head import channel_dropout
    from depthg_jax.runtime import xla

    @xla.jit
    def embed(p, images, key):
        f = features(p, images).astype(jnp.float32)
        if dropout:
            f = channel_dropout(key, f, dropout)
        return l2_normalize(f.mean(axis=(1, 2)), eps=1e-10)

    return embed


def make_sharded_feature_fn(features, params, *, dropout: float = 0.0, dropout_key=None, mesh=None):
    """A feature_fn running `features(params, images)` jitted over every device of every
    process (batch on 'data', a backbone's parameters split over 'model' by
    models/partitioning.py; `mesh` defaults to all devices on 'data'), returning pooled,
    L2-normalised features in global order.

    dropout > 0: channel dropout (Dropout2d) on the feature map before pooling, a fresh mask
    per image and call from `dropout_key` (the release's KNN features;
    docs/release.md#knn-features).
    """
    import jax
    from jax.experimental import multihost_utils

    from depthg_jax.models import partitioning
    from depthg_jax.runtime import sharding

    mesh = sharding.make_mesh() if mesh is None else mesh
    batch_sharding = sharding.batch_sharding(mesh)
    params = partitioning.place_params(params, mesh)
    if dropout and dropout_key is None:
        raise ValueError("KNN feature dropout needs a dropout_key")
    embed = embedding_program(features, dropout=dropout)
    calls = [0]

    def feature_fn(local_images: np.ndarray) -> np.ndarray:
        images = jax.make_array_from_process_local_data(batch_sharding, local_images)
        key = jax.random.fold_in(dropout_key, calls[0]) if dropout else jax.random.key(0)
        calls[0] += 1
        out = embed(params, images, key)
        return np.asarray(multihost_utils.process_allgather(out, tiled=True))

    return feature_fn


# --------------------------------------------------------------------------------------
# The command: python -m depthg_jax.data.knn --config=...
# --------------------------------------------------------------------------------------


def default_table_path(data_cfg, variant: str) -> str:
    """data.knn_path, else the standard table of (root, train split, variant, train_res)."""
    return data_cfg.get("knn_path", "") or knn_table_path(
        data_cfg.root, data_cfg.train_split, variant, data_cfg.train_res
    )


def make_knn_table(
    config,
    *,
    per_device_batch: int = 8,
    k: int = 30,
    progress: bool = False,
    source=None,
    path: str | None = None,
) -> str:
    """Computes and writes the KNN table of config.data's train split; returns its path.

    The backbone is config.model.weights (a random one, seeded as the trainer seeds it, only
    if config.model.allow_random_backbone) of data.knn_variant, else model.variant. `source`
    and `path` default to the loose-file split and its standard table (prepared records pass
    theirs).
    """
    import jax

    from depthg_jax.models import model as model_lib
    from depthg_jax.models import partitioning
    from depthg_jax.runtime import distributed, seeds, sharding

    data_cfg = config.data
    check_knn_args(per_device_batch, k, data_cfg.get("num_neighbors", 1))
    variant = data_cfg.get("knn_variant", "") or config.model.variant
    path = path or default_table_path(data_cfg, variant)
    if source is None:
        source = datasets.make_source(
            data_cfg.name, data_cfg.root, data_cfg.train_split, data_cfg.n_classes
        )
    if len(source) <= data_cfg.get("num_neighbors", 1):
        raise ValueError(
            f"{source.name} has {len(source)} examples, too few for data.num_neighbors="
            f"{data_cfg.num_neighbors} neighbours besides each example itself"
        )
    if variant != config.model.variant:
        log.warning(
            "KNN table from a %s backbone (model.variant is %s)", variant, config.model.variant
        )
    mesh = sharding.mesh_for(config)
    params = partitioning.load_backbone(config.model, seeds.run_keys(config.seed)[0], mesh, variant)
    dropout = float(data_cfg.get("knn_dropout", 0.0))
    spec = dataclasses.replace(model_lib.ModelSpec.from_config(config), variant=variant)
    feature_fn = make_sharded_feature_fn(
        backbone_features(spec),
        params,
        dropout=dropout,
        dropout_key=seeds.knn_dropout_key(config.seed) if dropout else None,
        mesh=mesh,
    )
    build_knn_table(
        source,
        feature_fn,
        res=data_cfg.train_res,
        global_batch_size=per_device_batch * sharding.data_size(mesh),
        k=k,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        path=path,
        progress=progress and jax.process_index() == 0,
    )
    distributed.sync("knn_table_written")
    return path


def check_knn_args(per_device_batch: int, k: int, num_neighbors: int) -> None:
    """The KNN command's numbers: ValueError naming the flag unless a table can be made."""
    if per_device_batch < 1:
        raise ValueError(f"--per_device_batch={per_device_batch}: needs at least 1 image")
    if k <= max(1, num_neighbors):
        raise ValueError(
            f"--k={k} stores too few neighbours: rank 0 is the example itself and training "
            f"draws from ranks 1..data.num_neighbors={num_neighbors}; use --k > {num_neighbors}"
        )


def main(argv: Sequence[str]) -> None:
    import jax
    from absl import flags

    from depthg_jax.runtime import distributed

    del argv
    distributed.initialize()
    config = flags.FLAGS.config
    path = make_knn_table(
        config, per_device_batch=flags.FLAGS.per_device_batch, k=flags.FLAGS.k, progress=True
    )
    if jax.process_index() == 0:
        print(f"KNN table: {path}")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    from depthg_jax.runtime import distributed

    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_integer("per_device_batch", 8, "Images per device per step.", lower_bound=1)
    flags.DEFINE_integer("k", 30, "Neighbours stored per example (rank 0 = itself).", lower_bound=2)
    distributed.define_flags()
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    _define_flags()
    commands.run_main(main)
