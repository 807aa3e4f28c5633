"""Training metrics: JSON lines and TensorBoard events, written by process 0 only.

`<workdir>/metrics.jsonl` holds one {"step", scalars...} row per write. `<workdir>/tensorboard/`
holds TensorBoard events (tensorboardX, no TensorFlow): the scalars, text (the resolved
config), pictures and hyperparameters for TensorBoard's HParams dashboard. A sweep's members
each get their own run, `tensorboard/<member>/`: a scalar written as "<member>/<tag>" goes
there as "<tag>", so TensorBoard draws the members on one chart per tag and the HParams
dashboard lists one session per member. Open with `tensorboard --logdir <workdir>/tensorboard`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np

TENSORBOARD_DIR = "tensorboard"


def run_directory(member: str) -> str:
    """A member's TensorBoard run folder name: its name with anything but letters, digits and
    `._=-` replaced by `_` (so a name can neither nest folders nor leave the log folder)."""
    safe = re.sub(r"[^A-Za-z0-9._=-]", "_", member)
    return safe if safe.strip(".") else safe.replace(".", "_")


class MetricWriter:
    """Appends {"step", scalars...} rows to <workdir>/metrics.jsonl and TensorBoard events.

    members: a sweep's member names; each gets its own TensorBoard run (see the module doc).
    """

    def __init__(self, workdir: str, members: Sequence[str] = ()):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._runs: dict[str, object] = {}
        self._logdir = os.path.join(workdir, TENSORBOARD_DIR)
        self._members = tuple(members)
        directories = [run_directory(m) for m in self._members]
        if len(set(directories)) != len(directories):
            raise ValueError(
                f"sweep member names {list(self._members)} give clashing TensorBoard run folders "
                f"{directories}; rename them"
            )
        if self._active:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tb = self._writer(None)

    @property
    def members(self) -> tuple[str, ...]:
        return self._members

    @property
    def active(self) -> bool:
        """Whether this process writes (process 0)."""
        return self._active

    def _writer(self, member: str | None):
        """The TensorBoard writer of the main run (member None) or of a member's run."""
        if member is None and self._tb is not None:
            return self._tb
        if member is not None and member in self._runs:
            return self._runs[member]
        from tensorboardX import SummaryWriter

        if member is not None and member not in self._members:
            raise ValueError(f"{member!r} is not one of this writer's members {self._members}")
        path = self._logdir if member is None else os.path.join(self._logdir, run_directory(member))
        writer = SummaryWriter(path)
        if member is not None:
            self._runs[member] = writer
        return writer

    def _route(self, key: str) -> tuple[str | None, str]:
        """("<member>", "<tag>") for a key "<member>/<tag>" of a member, else (None, key)."""
        head, sep, rest = key.partition("/")
        if sep and head in self._members:
            return head, rest
        return None, key

    def write(self, step: int, metrics: dict) -> None:
        if not self._active:
            return
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        touched = set()
        for k, v in scalars.items():
            member, tag = self._route(k)
            self._writer(member).add_scalar(tag, v, step)
            touched.add(member)
        self._flush(touched)

    def write_text(self, tag: str, text: str, step: int = 0, member: str | None = None) -> None:
        """Markdown text (TensorBoard's Text tab; tensorboardX files it as "<tag>/text_summary")."""
        if self._active:
            self._writer(member).add_text(tag, text, step)
            self._flush({member})

    def write_image(
        self, tag: str, image: np.ndarray, step: int, member: str | None = None
    ) -> None:
        """An RGB uint8 (H, W, 3) picture (TensorBoard's Images tab)."""
        if self._active:
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"{tag}: expected RGB uint8 (H, W, 3), got {image.dtype} "
                                 f"{image.shape}")  # fmt: skip
            self._writer(member).add_image(tag, image, step, dataformats="HWC")
            self._flush({member})

    def write_hparams(self, sessions: Mapping[str | None, Mapping], metrics: Sequence[str]) -> None:
        """Hyperparameters for the HParams dashboard: one session per run (None: the main run,
        a single training; else a member's run) with its {name: number, string or bool}, and
        the experiment (every hyperparameter's name and the metric tags to show beside them,
        read from each session's run) in the main run."""
        if not self._active:
            return
        from tensorboardX.summary import hparams

        union = {}
        for values in sessions.values():
            union.update({k: v for k, v in values.items() if k not in union})
        experiment, _, _ = hparams(_plain(union), dict.fromkeys(metrics, 0.0))
        self._tb.file_writer.add_summary(experiment)
        for member, values in sessions.items():
            _, start, _ = hparams(_plain(values), {})
            self._writer(member).file_writer.add_summary(start)
        self._flush({None, *sessions})

    def _flush(self, members) -> None:
        for member in members:
            self._writer(member).flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        for writer in [self._tb, *self._runs.values()]:
            if writer is not None:
                writer.close()


def _plain(values: Mapping) -> dict:
    """Hyperparameter values as TensorBoard takes them: bool, float or str."""
    out = {}
    for name, value in values.items():
        if isinstance(value, (bool, np.bool_)):
            out[name] = bool(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            out[name] = float(value)
        else:
            out[name] = str(value)
    return out
