"""Checkpoint policy (latest k + best by validation mIoU), train-state round trip, exports."""

import numpy as np
import pytest

from configs import demo
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import checkpoint


def _state(value):
    return {"step": np.asarray(value, np.int32), "w": np.full((3, 2), value, np.float32)}


def test_keeps_the_latest_k_and_the_best_by_cluster_miou(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path / "ckpt"), keep=2, save_every=1)
    mious = {1: 0.2, 2: 0.9, 3: 0.1, 4: 0.3, 5: 0.4}
    for step, miou in mious.items():
        metrics = {"val/cluster_miou": miou}
        checkpoint.save_train_state(manager, step, _state(step), {"pos": step}, metrics=metrics)
        manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [2, 4, 5]  # best (2) + latest two (4, 5)
    state, data_state, step = checkpoint.restore_train_state(manager, _state(0))
    assert step == 5 and data_state == {"pos": 5}
    np.testing.assert_array_equal(state["w"], np.full((3, 2), 5, np.float32))


def test_no_checkpoint_restores_none(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path / "ckpt"), keep=2, save_every=1)
    assert checkpoint.restore_train_state(manager, _state(0)) is None


def test_export_round_trip_and_refusals(tmp_path):
    import jax

    config = demo.get_config()
    params = model_lib.init_params(model_lib.ModelSpec.from_config(config), jax.random.key(0))
    checkpoint.save_export(str(tmp_path / "exp"), config, params)
    loaded_config, loaded = checkpoint.load_export(str(tmp_path / "exp"))
    assert loaded_config == config
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(FileExistsError, match="exists"):
        checkpoint.save_export(str(tmp_path / "exp"), config, params)
    with pytest.raises(ValueError, match="linear_probe"):
        checkpoint.save_export(str(tmp_path / "exp2"), config, {"backbone": {}, "head": {}})
    assert not (tmp_path / "exp2").exists()
    with pytest.raises(FileNotFoundError, match="not a depthg-jax export"):
        checkpoint.load_export(str(tmp_path))
    # An export whose params do not fit its own config is refused on load, naming both.
    wrong = demo.get_config()
    wrong.data.n_classes = config.data.n_classes + 1
    checkpoint.save_export(str(tmp_path / "exp3"), wrong, params)
    with pytest.raises(ValueError, match="cluster probe classes 6 \\(expected 7\\)"):
        checkpoint.load_export(str(tmp_path / "exp3"))
