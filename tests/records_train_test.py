"""A few training steps on prepared records equal the same run on the loose files."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import demo
from depthg_jax.data import datasets, five_crop, knn, prepare, records
from depthg_jax.training import trainer

pytestmark = pytest.mark.slow  # trains, or runs several processes


def tiny(**data):
    config = demo.get_config()
    config.data.name = "directory"
    config.data.n_classes = 3
    config.data.train_res = 32
    config.data.eval_res = 32
    config.loss.feature_samples = 3
    config.loss.neg_samples = 2
    config.train.batch_size = 8
    config.train.num_steps = 3
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.image_every = 0
    config.train.checkpoint_every = 100
    config.train.report_baselines = False
    config.eval.batch_size = 8
    config.data.update(data)
    return config


def test_training_on_records_equals_training_on_loose_files(tmp_path):
    root, crops, data_dir = (str(tmp_path / d) for d in ("download", "crops", "records"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 8)):
        for i in range(n):
            for sub, arr, ext in (
                ("images", rng.integers(0, 256, (64, 72, 3), np.uint8), ".png"),
                ("labels", rng.integers(0, 3, (64, 72), np.uint8), ".png"),
                ("depth", rng.integers(0, 256, (64, 72), np.uint8), "_zoedepth.png"),
            ):
                os.makedirs(f"{root}/{sub}/{split}", exist_ok=True)
                Image.fromarray(arr).save(f"{root}/{sub}/{split}/{i}{ext}")
    prepare.prepare("directory", root, data_dir)
    five_crop.write_five_crops(datasets.make_source("directory", root, "train", 3), crops, "train")

    loose_cfg = tiny(root=crops, eval_name="directory", eval_root=root, knn_variant="mu/8")
    rec_cfg = tiny(data_dir=data_dir, knn_variant="mu/8")
    # Each KNN table from the (random, seeded) training backbone, by its own command path.
    knn.make_knn_table(loose_cfg, per_device_batch=1, k=10)
    rec_path = records.make_knn_table(rec_cfg, per_device_batch=1, k=10)
    source = records.make_source("directory", data_dir, "train", 3)
    np.testing.assert_array_equal(
        knn.load_knn_table(rec_path, source.ids),
        knn.load_knn_table(knn.knn_table_path(crops, "train", "mu/8", 32)),
    )
    results = {}
    for name, cfg in (("loose", loose_cfg), ("records", rec_cfg)):
        workdir = tmp_path / f"run_{name}"
        results[name] = trainer.train_and_evaluate(cfg, str(workdir))
        lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        results[name]["losses"] = [m["loss"] for m in lines if "loss" in m]
    loose, rec = results["loose"], results["records"]
    assert len(loose["losses"]) == 3
    np.testing.assert_allclose(rec["losses"], loose["losses"], rtol=0, atol=1e-6)
    for key, value in loose["trained"].items():
        np.testing.assert_allclose(rec["trained"][key], value, rtol=0, atol=1e-6, err_msg=key)
