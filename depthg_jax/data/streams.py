"""Index math of the input: which example each host reads at each position (no I/O here).

Train stream. Global example positions g = 0, 1, 2, ... run over epochs of the split; epoch
e visits the examples in the permutation `default_rng([seed, 0, e]).permutation(N)`, so the
order is reshuffled every epoch and nothing is dropped at an epoch boundary (a batch may span
two epochs). Global batch t holds positions t*G .. t*G+G-1; process p reads the contiguous
slice p*b .. p*b+b-1 of it (b = G / process_count), so hosts never overlap and together read
every position once. The positive of position g is KNN rank 1 + default_rng([seed, 1, g])
.integers(num_neighbors) of its anchor: a pure function of (seed, g), which is what makes the
stream resumable: the iterator's state is one batch counter.

Eval stream. Global batch t holds split examples t*G .. t*G+G-1 in file order; positions past
the end are padding (zero image and depth, label -1, valid=False). Every host yields
ceil(N / G) batches (or the number asked).

Transform: `depthg_jax.data.transforms.resize_center_crop` at R = train_res / eval_res.
"""

from __future__ import annotations

import sys

import numpy as np

from depthg_jax.data import datasets
from depthg_jax.data.transforms import resize_center_crop


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
