"""Reading prepared ArrayRecord datasets: random-access sources for the grain pipeline.

`python -m depthg_jax.data.prepare` writes each dataset once, as TFDS ArrayRecord shards
(`depthg_jax.data.builders`), under ``<data_dir>/<name>/<config>/<version>/`` (local or
``gs://``: every path here goes through `etils.epath`; ``gs://`` needs gcsfs installed).
`RecordSource` presents a prepared split exactly as the loose-file `ExampleSource` does: the
same example dicts (``id``, ``image`` uint8 (H,W,3), ``depth`` float32 (H,W) in [0,255],
``label`` int32 (H,W), -1 = ignore), in the same order, so the existing `TrainStream` /
`EvalStream` machinery of `depthg_jax.data.pipeline` (seeded order, KNN positives, per-host
sharding, iterator state) gives the same batches as the loose files for the same seed.

The trainer reads records when ``data.data_dir`` is set: the train split from the ``train``
config (five-crops), the eval split from the ``eval`` config (original images), and the KNN
table stored beside the train records (see `knn_table_path`), with no path flag.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable

import numpy as np
from etils import epath

from depthg_jax.data import datasets, images, knn

log = logging.getLogger(__name__)

ROLES = {"train": "train", "eval": "eval"}  # Loader role -> builder config.
PREPARE_COMMAND = (
    "python -m depthg_jax.data.prepare --dataset={name} --manual_dir=DIR --data_dir={data_dir}"
)
KNN_COMMAND = (
    "python -m depthg_jax.data.prepare --dataset={name} --data_dir={data_dir} --knn "
    "--config=<your config> --config.model.weights=<DINO>"
)


def builder_class(name: str):
    from depthg_jax.data import builders

    if name not in builders.BUILDERS:
        raise ValueError(
            f"No records builder for dataset {name!r}; one of {sorted(builders.BUILDERS)}"
        )
    return builders.BUILDERS[name]


def open_builder(name: str, data_dir: str, config: str, *, must_exist: bool = True):
    """The builder of (dataset, config) over data_dir, at this code's version.

    With must_exist, a missing version is an error: naming a prepared version of another
    builder version when there is one, else the command that prepares it.
    """
    cls = builder_class(name)
    builder = cls(config=config, data_dir=str(data_dir))
    if must_exist and not builder.is_prepared():
        config_dir = epath.Path(data_dir) / name / config
        others = sorted(
            d.name
            for d in (config_dir.iterdir() if config_dir.exists() else [])
            if (d / "dataset_info.json").exists() and d.name != str(cls.VERSION)
        )
        if others:
            raise ValueError(
                f"{config_dir} holds {name}/{config} prepared by builder version(s) "
                f"{', '.join(others)}, but this code reads version {cls.VERSION} (see the "
                f"builder's RELEASE_NOTES); prepare it again: "
                + PREPARE_COMMAND.format(name=name, data_dir=data_dir)
            )
        raise FileNotFoundError(
            f"No prepared {name}/{config} version {cls.VERSION} at {builder.data_dir}; make it "
            "with: " + PREPARE_COMMAND.format(name=name, data_dir=data_dir)
        )
    return builder


def _decode(read: Callable, data: bytes, what: str):
    try:
        return read(io.BytesIO(data))
    except ValueError as e:
        raise ValueError(f"Corrupt {what}: {e}") from e


class RecordSource:
    """Random-access source of a prepared split: the same example dicts as `ExampleSource`."""

    def __init__(self, builder, split: str, *, n_classes: int):
        import tensorflow_datasets as tfds

        meta = builder.info.metadata or {}
        if split not in builder.info.splits:
            raise ValueError(
                f"{builder.data_dir} has no split {split!r}; it has {sorted(builder.info.splits)}"
            )
        self.builder = builder
        self.split = split
        self.n_classes = n_classes
        self.name = f"{builder.name}/{builder.builder_config.name}:{split}"
        self.label_lut = datasets.identity_lut(n_classes)
        self.data_dir = epath.Path(builder.data_dir)
        skip = tfds.decode.SkipDecoding()
        # Decoded here with the loose path's PIL readers, so arrays are bit-identical to it.
        self._data = builder.as_data_source(
            split, decoders={"image": skip, "depth": skip, "label": skip}
        )
        self._shards = self._find_shards(builder, split)
        self._ids = list(meta.get("ids", {}).get(split, []))
        if len(self._ids) != len(self._data):
            raise ValueError(
                f"{builder.data_dir}: metadata lists {len(self._ids)} ids for split {split!r} "
                f"but it has {len(self._data)} records; prepare it again"
            )
        if not self._ids:
            raise ValueError(f"Dataset {self.name!r} has no examples")
        stored = int(meta.get("n_classes", 0))
        if stored and stored != n_classes:
            raise ValueError(
                f"{builder.data_dir} holds {stored} classes but data.n_classes is {n_classes}"
            )

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"RecordSource({self.name!r}, {len(self)} examples)"

    def _find_shards(self, builder, split: str) -> list[tuple[str, int, int]]:
        """(file, first example, end) of each shard of the split, each opened once: a shard cut
        short or with a damaged footer is an error naming it now, not at its first read."""
        from array_record.python import array_record_module

        shards, start = [], 0
        for f in builder.info.splits[split].file_instructions:
            shard = (str(f.filename), start, start + f.take)
            shards.append(shard)
            start += f.take
            try:
                reader = array_record_module.ArrayRecordReader(shard[0])
                readable = reader.num_records() if reader.ok() else 0
            except RuntimeError as e:
                raise ValueError(self._shard_error(shard, e)) from None
            with contextlib.suppress(RuntimeError):  # a failed reader's close repeats its error
                reader.close()
            if readable != f.examples_in_shard:
                reason = f"{readable} records readable of the {f.examples_in_shard} written"
                raise ValueError(self._shard_error(shard, reason + " (truncated?)"))
        return shards

    def _shard_error(self, shard: tuple[str, int, int], error: BaseException) -> str:
        reason = " ".join(str(error).split())
        return (
            f"Corrupt records shard {shard[0]} (examples {shard[1]}..{shard[2] - 1} of "
            f"{self.name}): {reason}; delete {self.data_dir} and prepare it again: "
            + PREPARE_COMMAND.format(name=self.builder.name, data_dir=self.data_dir.parents[2])
        )

    def _read(self, index: int) -> dict:
        """The raw record (bytes fields) at index; a shard that fails is an error naming it."""
        try:
            rec = self._data[index]
            if not isinstance(rec.get("image"), bytes | np.ndarray) or rec.get("label") is None:
                raise RuntimeError("the record is empty")
            return rec
        except (RuntimeError, OSError) as e:
            shard = next(s for s in self._shards if s[1] <= index < s[2])
            raise ValueError(self._shard_error(shard, e)) from None

    def read_raw_label(self, index: int) -> tuple[str, np.ndarray]:
        """(where, stored label values (H,W), 255 = ignore) of a record: its label only."""
        rec = self._read(index)
        where = f"record {index} ({self._ids[index]!r}) of {self.data_dir}"
        raw = _decode(datasets.read_label_png, rec["label"], f"label in {where}")
        return where, raw[..., 0] if raw.ndim == 3 else raw

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def __getitem__(self, index: int) -> dict:
        rec = self._read(index)
        image_id = rec["id"].decode() if isinstance(rec["id"], bytes) else str(rec["id"])
        where = f"record {index} ({image_id!r}) of {self.data_dir}"
        image = _decode(images.read_image, rec["image"], f"image in {where}")
        depth = _decode(datasets.read_label_png, rec["depth"], f"depth in {where}")
        raw = _decode(datasets.read_label_png, rec["label"], f"label in {where}")
        if depth.ndim == 3:
            depth = depth[..., 0]
        if raw.ndim == 3:
            raw = raw[..., 0]
        label, n_bad = datasets.map_labels(raw, self.label_lut, self.n_classes)
        if n_bad:
            log.warning(
                "%s: %d label pixels of %s are outside the %d classes; set to ignore (-1)",
                self.name,
                n_bad,
                image_id,
                self.n_classes,
            )
        return {
            "id": image_id,
            "image": image,
            "depth": datasets.decode_depth(depth, "depth.png"),
            "label": label,
        }


def make_source(
    name: str, data_dir: str, split: str, n_classes: int, *, role: str = "train"
) -> RecordSource:
    """The prepared split of a dataset, from the builder config of the loader's role."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}; one of {sorted(ROLES)}")
    return RecordSource(open_builder(name, data_dir, ROLES[role]), split, n_classes=n_classes)


# --- KNN tables beside the records -----------------------------------------------------------


def knn_table_path(source: RecordSource, variant: str, res: int) -> str:
    """``<records version dir>/knn/nns_<variant>_<split>_<res>.npz`` (the loose naming)."""
    return knn.knn_table_path(str(source.data_dir), source.split, variant, res)


def _knn_command(source: RecordSource) -> str:
    return KNN_COMMAND.format(name=source.builder.name, data_dir=source.data_dir.parents[2])


def load_neighbors(data_cfg, source: RecordSource) -> np.ndarray:
    """The KNN table the trainer uses for the records' train split (found beside them)."""
    command = _knn_command(source)
    path = data_cfg.get("knn_path", "") or knn.find_knn_table(
        str(source.data_dir),
        source.split,
        data_cfg.train_res,
        data_cfg.get("knn_variant", ""),
        command=command,
    )
    return knn.load_knn_table(
        path, source.ids, command=command, num_neighbors=data_cfg.get("num_neighbors")
    )


def make_knn_table(config, *, per_device_batch: int = 8, k: int = 30) -> str:
    """The KNN table of config.data's prepared train split (`knn.make_knn_table` on the
    records), stored beside them."""
    data_cfg = config.data
    variant = data_cfg.get("knn_variant", "") or config.model.variant
    source = make_source(
        data_cfg.name, data_cfg.data_dir, data_cfg.train_split, data_cfg.n_classes, role="train"
    )
    return knn.make_knn_table(
        config,
        per_device_batch=per_device_batch,
        k=k,
        progress=True,
        source=source,
        path=knn_table_path(source, variant, data_cfg.train_res),
    )
