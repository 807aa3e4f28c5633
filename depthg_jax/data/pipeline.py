"""Input pipeline: seeded, per-host sharded train and eval batches (grain, no TensorFlow).

Train stream. Global example positions g = 0, 1, 2, ... run over epochs of the split; epoch
e visits the examples in the permutation `default_rng([seed, 0, e]).permutation(N)`, so the
order is reshuffled every epoch and nothing is dropped at an epoch boundary (a batch may span
two epochs). Global batch t holds positions t*G .. t*G+G-1; process p reads the contiguous
slice p*b .. p*b+b-1 of it (b = G / process_count), so hosts never overlap and together read
every position once. The positive of position g is KNN rank 1 + default_rng([seed, 1, g])
.integers(num_neighbors) of its anchor: a pure function of (seed, g), which is what makes the
stream resumable: the iterator's state is one batch counter.

Eval. Global batch t holds split examples t*G .. t*G+G-1 in file order; positions past the
end are padding (zero image and depth, label -1, valid=False). Every host yields
ceil(N / G) batches.

Transform: `depthg_jax.data.transforms.resize_center_crop` at R = train_res / eval_res.
"""

from __future__ import annotations

import logging
import math
import os
import sys

import grain
import numpy as np

from depthg_jax.data import datasets, knn
from depthg_jax.data.transforms import resize_center_crop

log = logging.getLogger(__name__)


def make_source_from_config(data_cfg, split: str, role: str = "train"):
    """The example source named by data_cfg (name, root, n_classes) for a split; with
    data.data_dir set, the prepared records of the role's builder config (records.py)."""
    if data_cfg.get("data_dir", ""):
        from depthg_jax.data import records

        return records.make_source(
            data_cfg.name, data_cfg.data_dir, split, data_cfg.n_classes, role=role
        )
    return datasets.make_source(data_cfg.name, data_cfg.root, split, data_cfg.n_classes)


def eval_data_config(data_cfg):
    """The data section evaluation reads: data.eval_name/eval_root where set, else the same."""
    import ml_collections

    out = ml_collections.ConfigDict(data_cfg.to_dict())
    if data_cfg.get("eval_name", ""):
        out.name = data_cfg.eval_name
    if data_cfg.get("eval_root", ""):
        out.root = data_cfg.eval_root
    return out


def resolve_knn_path(data_cfg) -> str:
    """data.knn_path if set, else the table for (root, train split, train_res) of
    data.knn_variant, or, with no variant set, the only such table in <root>/knn/."""
    path = data_cfg.get("knn_path", "")
    if path:
        return path
    return knn.find_knn_table(
        data_cfg.root, data_cfg.train_split, data_cfg.train_res, data_cfg.get("knn_variant", "")
    )


def _check_process_args(global_batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of "
            f"process_count {process_count}"
        )
    return global_batch_size // process_count


class TrainStream:
    """Host-local, infinite, random-access stream of (anchor, positive) training examples."""

    def __init__(
        self,
        source: datasets.ExampleSource,
        neighbors: np.ndarray,
        *,
        res: int,
        num_neighbors: int,
        seed: int,
        global_batch_size: int,
        process_index: int,
        process_count: int,
    ):
        self.local_batch = _check_process_args(global_batch_size, process_index, process_count)
        if num_neighbors < 1 or neighbors.shape[1] <= num_neighbors:
            raise ValueError(
                f"num_neighbors {num_neighbors} needs a KNN table with more than that many "
                f"columns (rank 0 is the image itself); the table has {neighbors.shape[1]}"
            )
        self.source = source
        self.neighbors = neighbors
        self.res = res
        self.num_neighbors = num_neighbors
        self.seed = seed
        self.global_batch = global_batch_size
        self.process_index = process_index
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def global_position(self, i: int) -> int:
        """Global stream position of this host's i-th element."""
        t, j = divmod(i, self.local_batch)
        return t * self.global_batch + self.process_index * self.local_batch + j

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.source))
            self._perms = {epoch: perm, **{e: p for e, p in self._perms.items() if e > epoch - 2}}
        return perm

    def indices(self, g: int) -> tuple[int, int]:
        """(anchor, positive) split indices of global position g."""
        epoch, pos = divmod(g, len(self.source))
        anchor = int(self._permutation(epoch)[pos])
        rank = 1 + int(np.random.default_rng([self.seed, 1, g]).integers(self.num_neighbors))
        return anchor, int(self.neighbors[anchor, rank])

    def __getitem__(self, i: int) -> dict:
        anchor, positive = self.indices(self.global_position(i))
        a = resize_center_crop(self.source[anchor], self.res)
        p = resize_center_crop(self.source[positive], self.res)
        return {**a, **{k + "_pos": v for k, v in p.items()}}


def _to_iterator(ds: grain.MapDataset, data_cfg) -> grain.DatasetIterator:
    prefetch = max(1, int(data_cfg.get("prefetch", 2)))
    # Decoding releases the GIL, so threads beyond the core count still help (bench/RESULTS.md).
    threads = int(data_cfg.get("read_threads", 0)) or max(4, min(16, os.cpu_count() or 1))
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads))
    it_ds = ds.to_iter_dataset(options)
    workers = int(data_cfg.get("worker_count", 0))
    if workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it_ds)


def make_train_loader(
    data_cfg, *, global_batch_size: int, seed: int, process_index: int, process_count: int
) -> grain.DatasetIterator:
    """Infinite iterator of host-local training batches (see module docstring).

    Batches: image uint8 (b,R,R,3), depth float32 (b,R,R), label int32 (b,R,R) and the same
    three for the KNN positive with suffix "_pos"; b = global_batch_size // process_count.
    The iterator has get_state()/set_state() for checkpointing.
    """
    source = make_source_from_config(data_cfg, data_cfg.train_split)
    if data_cfg.get("data_dir", ""):
        from depthg_jax.data import records

        neighbors = records.load_neighbors(data_cfg, source)
    else:
        neighbors = knn.load_knn_table(resolve_knn_path(data_cfg), source.ids)
    stream = TrainStream(
        source,
        neighbors,
        res=data_cfg.train_res,
        num_neighbors=data_cfg.num_neighbors,
        seed=seed,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    ds = grain.MapDataset.source(stream).batch(stream.local_batch, drop_remainder=True)
    return _to_iterator(ds, data_cfg)


class EvalStream:
    """Host-local eval examples of a fixed number of batches, padded with valid=False."""

    def __init__(self, source, *, res, global_batch_size, process_index, process_count, batches):
        self.local_batch = _check_process_args(global_batch_size, process_index, process_count)
        self.source = source
        self.res = res
        self.global_batch = global_batch_size
        self.process_index = process_index
        self.batches = batches

    def __len__(self) -> int:
        return self.batches * self.local_batch

    def __getitem__(self, i: int) -> dict:
        t, j = divmod(i, self.local_batch)
        g = t * self.global_batch + self.process_index * self.local_batch + j
        if g >= len(self.source):
            r = self.res
            return {
                "image": np.zeros((r, r, 3), np.uint8),
                "depth": np.zeros((r, r), np.float32),
                "label": np.full((r, r), datasets.IGNORE, np.int32),
                "valid": np.bool_(False),
            }
        return {**resize_center_crop(self.source[g], self.res), "valid": np.bool_(True)}


class EvalLoader:
    """Re-iterable eval batches: each iteration is a fresh pass over the split.

    Attributes: num_examples (examples in the split), num_batches (= len(self), the same on
    every host), local_batch_size.
    """

    def __init__(
        self, data_cfg, source, *, global_batch_size, process_index, process_count, max_batches=0
    ):
        self.data_cfg = data_cfg
        self.num_examples = len(source)
        batches = math.ceil(self.num_examples / global_batch_size)
        if max_batches > 0:
            batches = min(batches, max_batches)
        self.num_batches = batches
        self.stream = EvalStream(
            source,
            res=data_cfg.eval_res,
            global_batch_size=global_batch_size,
            process_index=process_index,
            process_count=process_count,
            batches=batches,
        )
        self.local_batch_size = self.stream.local_batch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        ds = grain.MapDataset.source(self.stream).batch(self.local_batch_size)
        return _to_iterator(ds, self.data_cfg)


def make_eval_loader(
    data_cfg,
    *,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    max_batches: int = 0,
) -> EvalLoader:
    """Eval batches of data_cfg.eval_split at data_cfg.eval_res (see module docstring).

    Batches: image uint8 (b,E,E,3), depth float32 (b,E,E), label int32 (b,E,E), valid bool (b,).
    max_batches > 0 stops after that many batches (the same on every host).
    """
    source = make_source_from_config(data_cfg, data_cfg.eval_split, role="eval")
    return EvalLoader(
        data_cfg,
        source,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        max_batches=max_batches,
    )
