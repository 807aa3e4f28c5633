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
import time
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
        in the main run the experiment: every hyperparameter with its values across the
        sessions (whether they differ, so the dashboard shows those first) and the metric tags
        read from each session's run beside them ("val/..." as validation metrics)."""
        if not self._active:
            return
        from tensorboard.plugins.hparams import plugin_data_pb2

        start = time.time()
        values = {member: _plain(hp) for member, hp in sessions.items()}
        self._add_hparams(None, "experiment", _experiment(values.values(), metrics))
        for member, hp in values.items():
            info = plugin_data_pb2.SessionStartInfo(start_time_secs=start)
            for name, value in hp.items():
                _set_value(info.hparams[name], value)
            self._add_hparams(member, "session_start_info", info)
        self._flush({None, *sessions})

    def _add_hparams(self, member: str | None, kind: str, message) -> None:
        """Writes one hparams plugin summary (TensorBoard's protos, as tensorboardX's)."""
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2
        from tensorboardX.proto import summary_pb2 as tbx_summary_pb2

        data = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION)
        getattr(data, kind).CopyFrom(message)
        summary = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(
                    tag=f"_hparams_/{kind}",
                    metadata=metadata.create_summary_metadata(data),
                    tensor=metadata.NULL_TENSOR,
                )
            ]
        )
        as_tbx = tbx_summary_pb2.Summary.FromString(summary.SerializeToString())
        self._writer(member).file_writer.add_summary(as_tbx)

    def _flush(self, members) -> None:
        for member in members:
            self._writer(member).flush()

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
        for writer in [self._tb, *self._runs.values()]:
            if writer is not None:
                writer.close()


def _set_value(target, value) -> None:
    """A google.protobuf Value from a bool, float or str."""
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, float):
        target.number_value = value
    else:
        target.string_value = value


def _experiment(sessions, metrics: Sequence[str]):
    """The HParams experiment: each hyperparameter's type and values over the sessions."""
    from tensorboard.plugins.hparams import api_pb2

    seen: dict[str, list] = {}
    for hp in sessions:
        for name, value in hp.items():
            seen.setdefault(name, []).append(value)
    infos = []
    for name, values in seen.items():
        info = api_pb2.HParamInfo(name=name, differs=len(set(values)) > 1)
        if all(isinstance(v, float) for v in values):
            info.type = api_pb2.DATA_TYPE_FLOAT64
            info.domain_interval.min_value = min(values)
            info.domain_interval.max_value = max(values)
        else:
            is_bool = all(isinstance(v, bool) for v in values)
            info.type = api_pb2.DATA_TYPE_BOOL if is_bool else api_pb2.DATA_TYPE_STRING
            for value in sorted(set(values), key=str):
                _set_value(info.domain_discrete.values.add(), value if is_bool else str(value))
        infos.append(info)
    metric_infos = [
        api_pb2.MetricInfo(
            name=api_pb2.MetricName(tag=tag),
            dataset_type=api_pb2.DATASET_VALIDATION
            if tag.startswith("val/")
            else api_pb2.DATASET_TRAINING,
        )
        for tag in metrics
    ]
    return api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos)


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
