"""Input pipeline: seeded, per-host sharded train and eval batches (grain, no TensorFlow),
and the prefetcher that puts them on the device mesh ahead of the step.

Which example each host reads at each position is `depthg_jax.data.streams`' business; this
module turns streams into grain iterators with checkpointable state.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import grain

from depthg_jax.data import datasets, knn, streams
from depthg_jax.runtime import sharding

log = logging.getLogger(__name__)


def make_source(data_cfg, split: str, *, release_depth_cast: bool = False, role: str = "train"):
    """The example source named by a data config (name, root, n_classes) for a split; with
    data.data_dir set, the prepared records of the role's builder config (records.py)."""
    if data_cfg.get("data_dir", ""):
        if release_depth_cast:
            raise ValueError(
                "prepared records do not yet apply the release's Potsdam depth cast: train "
                "potsdam3 under objective='reference' from loose files (data.root)"
            )
        from depthg_jax.data import records  # TFDS is only imported for prepared records.

        return records.make_source(
            data_cfg.name, data_cfg.data_dir, split, data_cfg.n_classes, role=role
        )
    return datasets.make_source(
        data_cfg.name,
        data_cfg.root,
        split,
        data_cfg.n_classes,
        release_depth_cast=release_depth_cast,
    )


def knn_path(data_cfg) -> str:
    """data.knn_path if set, else the table for (root, train split, train_res) of
    data.knn_variant, or, with no variant set, the only such table in <root>/knn/."""
    return data_cfg.get("knn_path", "") or knn.find_knn_table(
        data_cfg.root, data_cfg.train_split, data_cfg.train_res, data_cfg.get("knn_variant", "")
    )


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
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    release_depth_cast: bool = False,
) -> grain.DatasetIterator:
    """Infinite iterator of host-local training batches (see module docstring).

    Batches: image uint8 (b,R,R,3), depth float32 (b,R,R), label int32 (b,R,R) and the same
    three for the KNN positive with suffix "_pos"; b = global_batch_size // process_count.
    The iterator has get_state()/set_state() for checkpointing.
    """
    source = make_source(data_cfg, data_cfg.train_split, release_depth_cast=release_depth_cast)
    if data_cfg.get("data_dir", ""):
        from depthg_jax.data import records

        neighbors = records.load_neighbors(data_cfg, source)
    else:
        neighbors = knn.load_knn_table(
            knn_path(data_cfg),
            source.ids,
            fingerprint=knn.source_fingerprint(source),
            num_neighbors=data_cfg.num_neighbors,
        )
    stream = streams.TrainStream(
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
        self.stream = streams.EvalStream(
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
    release_depth_cast: bool = False,
) -> EvalLoader:
    """Eval batches of data_cfg.eval_split at data_cfg.eval_res (see module docstring).

    Batches: image uint8 (b,E,E,3), depth float32 (b,E,E), label int32 (b,E,E), valid bool (b,).
    max_batches > 0 stops after that many batches (the same on every host).
    """
    source = make_source(
        data_cfg, data_cfg.eval_split, release_depth_cast=release_depth_cast, role="eval"
    )
    return EvalLoader(
        data_cfg,
        source,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        max_batches=max_batches,
    )


class Prefetcher:
    """Moves host batches onto the mesh in a background thread, `size` batches ahead.

    Each item carries the loader's state *after* that batch, so a checkpoint taken after
    consuming it resumes with exactly the next batch, however far the thread has read ahead.
    """

    def __init__(self, loader: Any, mesh, size: int = 2):
        self._loader = loader
        self._mesh = mesh
        self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._loader)
                state = self._loader.get_state()
                item = (sharding.host_to_global(batch, self._mesh), state)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced to the consumer, never swallowed
            self._queue.put(e)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> tuple[dict, Any]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
