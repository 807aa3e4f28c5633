"""Prepares a dataset once as TFDS ArrayRecord shards (and its KNN table) for every host.

    python -m depthg_jax.data.prepare --dataset=cocostuff27 --manual_dir=DIR --data_dir=DIR

writes ``<data_dir>/<dataset>/{train,eval}/<version>/`` (`depthg_jax.data.builders`: train =
five-crops, Potsdam uncropped; eval = the original evaluation images). Each config is
written to a temporary folder and renamed when complete, so a failed or killed run leaves
no version that looks finished; running the command again resumes: finished configs are
kept as they are (a finished version is never overwritten: delete it to remake it) and an
unfinished one starts over: one run prepares a dataset at a time (a lock file,
``<data_dir>/<dataset>/.prepare.lock``, local folders only) and removes the ``incomplete.*``
folders and files a killed run left there before it starts. Then the KNN table of the prepared
train split:

    python -m depthg_jax.data.prepare --dataset=cocostuff27 --data_dir=DIR --knn \\
        --config=configs/coco.py --config.model.weights=DINO

stored beside the records, where the trainer (``--config.data.data_dir=DIR``) finds it.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from depthg_jax import commands
from depthg_jax.data import builders, outputs, records

log = logging.getLogger(__name__)

LOCK_FILE = ".prepare.lock"
# What TFDS leaves when killed: "<config>/incomplete.<6 chars>_<version>/" while writing a
# version, ".config/incomplete.<32 hex>.<name>" while writing its metadata.
_INCOMPLETE = re.compile(r"^incomplete\.([A-Z0-9]{6}_.+|[0-9a-f]{32}\..+)$")


def stale_incomplete(dataset_dir: str | os.PathLike) -> list[Path]:
    """TFDS's temporary folders and files under a dataset's folder (one level of configs)."""
    root = Path(dataset_dir)
    if not root.is_dir():
        return []
    found = []
    for config_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        found += sorted(p for p in config_dir.iterdir() if _INCOMPLETE.match(p.name))
    return found


def prepare(
    dataset: str, manual_dir: str, data_dir: str, configs: Sequence[str] = builders.CONFIGS
) -> list[str]:
    """Prepares each builder config of the dataset not yet prepared; returns their folders."""
    import tensorflow_datasets as tfds

    if dataset not in builders.BUILDERS:
        raise ValueError(f"Unknown dataset {dataset!r}; one of {sorted(builders.BUILDERS)}")
    cls = builders.BUILDERS[dataset]
    if not manual_dir or not os.path.isdir(manual_dir):
        raise FileNotFoundError(
            f"--manual_dir={manual_dir!r} is not a folder. {cls.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    unknown = sorted(set(configs) - set(builders.CONFIGS))
    if unknown or not configs:
        raise ValueError(f"--configs={','.join(configs)}: choose among {list(builders.CONFIGS)}")
    dataset_dir = os.path.join(str(data_dir), dataset)
    with outputs.WriterLock(dataset_dir, LOCK_FILE, "prepare"):
        if "://" not in dataset_dir:
            outputs.remove_stale(stale_incomplete(dataset_dir), "incomplete.* folders/files")
        return _prepare(tfds, cls, dataset, manual_dir, data_dir, configs)


def _prepare(tfds, cls, dataset, manual_dir, data_dir, configs) -> list[str]:
    tfds.disable_progress_bar()  # The builders show one bar per split, with its length.
    out = []
    for config in configs:
        builder = records.open_builder(dataset, data_dir, config, must_exist=False)
        if builder.is_prepared():
            print(f"{builder.data_dir}: already prepared (version {cls.VERSION}); kept as is")
        else:
            builder.check_manual_dir(manual_dir)  # Before anything is written.
            # Nothing is downloaded; TFDS still wants a download folder.
            with tempfile.TemporaryDirectory() as downloads:
                builder.download_and_prepare(
                    download_dir=downloads,
                    download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
                )
            sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
            print(f"{builder.data_dir}: prepared {sizes}")
        out.append(str(builder.data_dir))
    return out


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.knn:
        import jax

        if FLAGS.config is None:
            raise app.UsageError("--knn needs --config (its model and data.train_res)")
        config = FLAGS.config
        with config.unlocked():
            config.data.name = FLAGS.dataset
            config.data.data_dir = FLAGS.data_dir
        if FLAGS.distributed:
            jax.distributed.initialize()
        path = records.make_knn_table(config, per_device_batch=FLAGS.per_device_batch, k=FLAGS.k)
        if jax.process_index() == 0:
            print(f"KNN table: {path}")
        return
    prepare(FLAGS.dataset, FLAGS.manual_dir, FLAGS.data_dir, FLAGS.configs)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    flags.DEFINE_enum("dataset", None, sorted(builders.BUILDERS), "Dataset to prepare.")
    flags.DEFINE_string("manual_dir", "", "The local download (its builder's layout).")
    flags.DEFINE_string("data_dir", None, "Where the records go (local folder or gs://).")
    flags.DEFINE_list("configs", list(builders.CONFIGS), "Builder configs to prepare.")
    flags.DEFINE_bool("knn", False, "Instead: compute the prepared train split's KNN table.")
    config_flags.DEFINE_config_file("config", None, "With --knn: experiment config file.")
    flags.DEFINE_integer(
        "per_device_batch", 8, "With --knn: images per device per step.", lower_bound=1
    )
    flags.DEFINE_integer(
        "k", 30, "With --knn: neighbours stored per example (rank 0 = itself).", lower_bound=2
    )
    flags.DEFINE_bool("distributed", False, "With --knn: call jax.distributed.initialize.")
    flags.mark_flags_as_required(["dataset", "data_dir"])
    commands.run_main(main)
