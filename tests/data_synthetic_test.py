"""Synthetic scene set: determinism, idempotence, layout, and depth/label physics."""

import filecmp
import os

import numpy as np
import pytest
from cli import run_cli

from depthg_jax.data import datasets, synthetic

SIZE = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn") / "set")
    return synthetic.generate_dataset(root, num_train=6, num_val=2, size=SIZE, seed=0)


def test_same_seed_is_bit_identical_and_other_seed_differs(root, tmp_path):
    again = synthetic.generate_dataset(str(tmp_path / "a"), num_train=6, num_val=2, size=SIZE)
    for sub in ("images/train", "depth/train", "labels/train", "images/val"):
        files = sorted(os.listdir(os.path.join(root, sub)))
        _, mismatch, errors = filecmp.cmpfiles(
            os.path.join(root, sub), os.path.join(again, sub), files, shallow=False
        )
        assert not mismatch and not errors and files
    other = synthetic.generate_dataset(
        str(tmp_path / "b"), num_train=1, num_val=0, size=SIZE, seed=1
    )
    a = os.path.join(root, "images/train/000000.png")
    assert not filecmp.cmp(a, os.path.join(other, "images/train/000000.png"), shallow=False)


def test_scene_depends_only_on_seed_and_index_not_on_counts(root, tmp_path):
    fewer = synthetic.generate_dataset(str(tmp_path / "c"), num_train=2, num_val=1, size=SIZE)
    for f in ("images/train/000001.png", "depth/train/000001_zoedepth.png"):
        assert filecmp.cmp(os.path.join(root, f), os.path.join(fewer, f), shallow=False)


def test_generation_is_idempotent_and_refuses_foreign_folders(root, tmp_path):
    stamp = os.stat(os.path.join(root, "images/train/000000.png")).st_mtime_ns
    synthetic.generate_dataset(root, num_train=6, num_val=2, size=SIZE, seed=0)
    assert os.stat(os.path.join(root, "images/train/000000.png")).st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="not empty"):
        synthetic.generate_dataset(root, num_train=7, num_val=2, size=SIZE, seed=0)
    assert not [p for p in os.listdir(os.path.dirname(root)) if p.startswith(".synthetic-tmp")]


def test_set_reads_through_the_directory_code_with_labels_in_range(root):
    n = len(synthetic.SYNTHETIC_CLASSES)
    assert synthetic.SYNTHETIC_COLORS.shape == (n, 3)
    train = datasets.make_source("synthetic", root, "train", n)
    assert len(train) == 6 and len(datasets.make_source("synthetic", root, "val", n)) == 2
    seen = set()
    for i in range(len(train)):
        ex = train[i]
        assert ex["image"].shape == (SIZE, SIZE, 3) and ex["depth"].shape == (SIZE, SIZE)
        assert ex["label"].min() >= 0 and ex["label"].max() < n
        assert ex["depth"].min() == 0.0 and ex["depth"].max() == 255.0
        seen |= set(np.unique(ex["label"]).tolist())
    assert {synthetic.GROUND, synthetic.SKY, synthetic.BUILDING} <= seen
    assert len(seen & {synthetic.TREE, synthetic.VEHICLE, synthetic.PERSON}) >= 2


def test_depth_follows_the_scene_geometry():
    rng = np.random.default_rng([5, 0, 3])
    image, depth, label = synthetic.render_scene(rng, 96)
    sky = label == synthetic.SKY
    assert np.all(depth[sky] == synthetic.FAR)  # Sky is the farthest thing.
    assert np.all(depth[~sky] < synthetic.FAR)
    ground = label == synthetic.GROUND
    for c in range(96):  # Down a column, visible ground only comes nearer.
        d = depth[ground[:, c], c]
        assert np.all(np.diff(d) <= 0)
    # Ground rows reach the image bottom, nearer than every building.
    assert depth[-1][ground[-1]].max() < depth[label == synthetic.BUILDING].min()


@pytest.mark.slow
def test_cli_writes_the_set(tmp_path):
    args = ["--out", tmp_path / "cli", "--num_train=2", "--num_val=1", "--size=32"]
    run_cli("depthg_jax.data.synthetic", args, check=True)
    assert sorted(os.listdir(tmp_path / "cli" / "images" / "train")) == ["000000.png", "000001.png"]
    assert os.path.exists(tmp_path / "cli" / "depth" / "val" / "000000_zoedepth.png")
