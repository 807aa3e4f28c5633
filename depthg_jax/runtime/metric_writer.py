"""Training metrics: JSON lines and TensorBoard events, written by process 0 only."""

from __future__ import annotations

import json
import os

import jax
import numpy as np


class MetricWriter:
    """Appends {"step", scalars...} rows to <workdir>/metrics.jsonl and TensorBoard events."""

    def __init__(self, workdir: str):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self._active:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self._active:
            return
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def write_histogram(self, step: int, name: str, counts) -> None:
        """Counts per integer id (e.g. pixels per cluster): a metrics.jsonl row
        {"step", name: [counts]} and a TensorBoard histogram with one bucket per id."""
        if not self._active:
            return
        counts = np.asarray(counts, np.int64)
        self._jsonl.write(json.dumps({"step": step, name: counts.tolist()}) + "\n")
        self._jsonl.flush()
        ids = np.arange(len(counts), dtype=np.float64)
        used = ids[counts > 0]
        if self._tb is not None and len(used):
            self._tb.add_histogram_raw(
                name,
                min=float(used.min()),
                max=float(used.max()),
                num=int(counts.sum()),
                sum=float((ids * counts).sum()),
                sum_squares=float((ids**2 * counts).sum()),
                bucket_limits=(ids + 0.5).tolist(),
                bucket_counts=counts.tolist(),
                global_step=step,
            )
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
