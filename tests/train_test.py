"""Training: device independence, compile-once, config errors, and an end-to-end demo run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import make_program, random_batch, run_steps, setup, tiny_config

from depthg_jax import config as config_lib
from depthg_jax.method import objective as objective_lib
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import sharding
from depthg_jax.training import finite, trainer
from depthg_jax.training import step as step_lib


@pytest.mark.parametrize("sampling", ["fps", "random"])
@pytest.mark.slow
def test_step_is_device_count_independent(sampling):
    config = tiny_config(**{"loss.sampling": sampling})
    batches = [random_batch(config, s) for s in range(2)]
    params1, losses1, _ = run_steps(config, jax.devices()[:1], batches, 3)
    params8, losses8, _ = run_steps(config, jax.devices()[:8], batches, 3)
    np.testing.assert_allclose(losses1, losses8, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(losses1))


@pytest.mark.slow
def test_pmap_step_equals_the_jit_step_on_8_devices():
    # Dropout on: both paths draw the same masks from the same keys.
    batches = [random_batch(tiny_config(), s) for s in range(2)]
    params_jit, losses_jit, _ = run_steps(tiny_config(), jax.devices()[:8], batches, 3)
    pmap_config = tiny_config(**{"train.parallelism": "pmap"})
    params_pmap, losses_pmap, _ = run_steps(pmap_config, jax.devices()[:8], batches, 3)
    np.testing.assert_allclose(losses_pmap, losses_jit, rtol=1e-6, atol=1e-6)
    # Params after two Adam steps: the two programs sum in different orders, and Adam's
    # g / (|g| + eps) turns ~1e-7 gradient differences of near-zero gradients into ~1e-6
    # (1 of 1024 elements of one kernel at 1.4e-6 when measured).
    for a, b in zip(jax.tree.leaves(params_pmap), jax.tree.leaves(params_jit), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_step_compiles_once_per_num_samples():
    config = tiny_config()
    batches = [random_batch(config, s) for s in range(3)]
    mesh = sharding.make_mesh(jax.devices()[:2])
    _, backbone, state, k_step, hp = setup(config, mesh)
    step_fn = make_program(config, mesh)
    for batch in batches:
        state, _ = step_fn(state, backbone, sharding.host_to_global(batch, mesh), k_step, hp, 3)
    assert step_fn._cache_size() == 1
    for batch in batches[:2]:
        state, _ = step_fn(state, backbone, sharding.host_to_global(batch, mesh), k_step, hp, 2)
    assert step_fn._cache_size() == 2


@pytest.mark.slow
def test_training_reduces_the_loss_on_a_fixed_batch():
    config = tiny_config(**{"model.dropout": 0.0})
    batch = random_batch(config, 0)
    _, losses, _ = run_steps(config, jax.devices()[:1], [batch] * 8, 3)
    assert losses[-1] < losses[0], losses


def test_frozen_backbone_gets_no_update_and_is_not_in_the_state():
    config = tiny_config()
    spec = model_lib.ModelSpec.from_config(config)
    state = step_lib.create_train_state(spec, objective_lib.hparams(config), jax.random.key(1))
    assert set(state.params) == {"head", "cluster_probe", "linear_probe"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"objective": "paper"}, "config.objective"),
        ({"model.variant": "L/14"}, "config.model.variant"),
        ({"data.name": "imagenet"}, "config.data.name"),
        ({"data.train_res": 60}, "not a positive multiple of the patch size"),
        ({"loss.feature_samples": 9}, "exceed"),
        ({"model.allow_random_backbone": False}, "models.convert"),
        ({"data.name": "cocostuff27", "data.root": ""}, "config.data.root is empty"),
        ({"data.name": "directory", "data.root": "/nonexistent/x"}, "is not a directory"),
        ({"train.keep_checkpoints": 0}, "config.train.keep_checkpoints=0"),
        ({"train.num_steps": -5}, "config.train.num_steps=-5"),
        ({"train.log_every": 0}, "config.train.log_every=0"),
        ({"model.dim": 0}, "config.model.dim=0"),
        ({"data.n_classes": 0}, "config.data.n_classes=0"),
        ({"train.batch_size": 0}, "config.train.batch_size=0"),
        ({"model.dtype": "float8"}, "config.model.dtype"),
        ({"model.matmul_precision": "low"}, "config.model.matmul_precision"),
        ({"eval.crf_image": "jpeg"}, "config.eval.crf_image"),
        ({"train.parallelism": "pjit"}, "config.train.parallelism"),
    ],
)
def test_config_errors_are_clear(overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        config_lib.validate(tiny_config(**overrides))


def test_resolve_fills_derived_fields_into_a_new_locked_config(tmp_path):
    raw = tiny_config()
    resolved = config_lib.resolve(raw, str(tmp_path))
    assert raw.data.root == "" and raw.data.knn_variant == ""  # the input is not modified
    assert resolved.data.root == str(tmp_path / "synthetic_data")
    assert resolved.data.knn_variant == "mu/8"
    assert resolved.data.knn_path.endswith("knn/nns_mu-8_train_64.npz")
    assert (resolved.data.eval_name, resolved.data.eval_root) == ("synthetic", resolved.data.root)
    with pytest.raises(AttributeError):
        resolved.data.typo = 1
    assert config_lib.resolve(resolved, str(tmp_path)).to_dict() == resolved.to_dict()


def test_reference_validation_interval_falls_back_to_the_epoch_end():
    config = tiny_config(**{"objective": "reference", "train.eval_every": 100})
    # 4545 examples at batch 16: 285 batches an epoch; 100 > 285 / 4 -> each epoch's end.
    config.train.batch_size = 16
    assert config_lib.validation_interval(config, 4545) == 285
    assert config_lib.validation_interval(config, 488510) == 100
    config.objective = "corrected"
    assert config_lib.validation_interval(config, 4545) == 100


def test_batch_not_divisible_by_devices_is_refused():
    mesh = sharding.make_mesh(jax.devices()[:8])
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        sharding.check_batch_size(12, mesh, "config.train.batch_size")


@pytest.mark.slow
def test_train_and_evaluate_end_to_end_then_evaluate_and_segment_the_export(tmp_path):
    from PIL import Image

    from depthg_jax import evaluate, segment
    from depthg_jax.runtime import checkpoint

    config = tiny_config(
        **{"train.image_every": 4, "train.eval_every": 2, "train.report_baselines": True}
    )
    results = trainer.train_and_evaluate(config, str(tmp_path))
    for key in ("val/cluster_miou", "val/cluster_accuracy", "val/linear_miou"):
        assert 0.0 <= results["trained"][key] <= 1.0
    for baseline in ("untrained_head", "kmeans_untrained_head", "kmeans_backbone"):
        assert 0.0 <= results[baseline]["val/cluster_miou"] <= 1.0
    assert results["step"] == 4
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any("loss" in line for line in lines)
    grid = Image.open(tmp_path / "images" / "step_000004.png")
    assert grid.size[0] > 4 * 64 and grid.mode == "RGB"
    assert os.listdir(tmp_path / "tensorboard")
    export = str(tmp_path / "export")
    cfg, params = checkpoint.load_export(export)
    assert cfg.model.variant == "mu/8"
    assert set(params) == set(checkpoint.EXPORT_PARAMS)

    # The export evaluates with the paper's protocol and segments a folder of images.
    cfg.eval.crf = True
    evaluated, _, paths, selection = evaluate.run(export, cfg, str(tmp_path / "eval"))
    assert selection["checkpoint"] == "final" and selection["step"] == 4
    # export_best/ holds the best validated checkpoint (validated at steps 2 and 4).
    best = checkpoint.load_selection(str(tmp_path / "export_best"))
    scores = {
        row["step"]: row["val/cluster_miou"]
        for row in lines
        if "val/cluster_miou" in row and row["step"] in (2, 4)
    }
    assert best["checkpoint"] == "best" and best["step"] == max(scores, key=scores.get)
    assert best["score"] == pytest.approx(max(scores.values()))
    assert "evaluation split" in best["selected_on"]
    assert results["best"] == best
    assert 0.0 <= evaluated["cluster_crf"]["miou"] <= 1.0
    assert os.path.isfile(paths["results"])
    images = tmp_path / "photos"
    images.mkdir()
    Image.fromarray(np.full((40, 56, 3), 120, np.uint8)).save(images / "a.png")
    written, errors = segment.segment_folder(
        export, str(images), str(tmp_path / "seg"), res=64, progress=False
    )
    assert written == 1 and not errors
    assert Image.open(tmp_path / "seg" / "labels" / "a.png").size == (56, 40)

    # A second call resumes at the end and does not train further.
    again = trainer.train_and_evaluate(tiny_config(), str(tmp_path))
    assert again["step"] == 4
    np.testing.assert_allclose(
        again["trained"]["val/cluster_miou"], results["trained"]["val/cluster_miou"]
    )


def test_init_params_have_pytorch_default_scales():
    config = tiny_config()
    params = model_lib.init_trainable(model_lib.ModelSpec.from_config(config), jax.random.key(0))
    clusters = jax.tree.leaves(params["cluster_probe"])[0]
    assert clusters.shape == (config.data.n_classes, config.model.dim)
    assert abs(float(jnp.std(clusters)) - 1.0) < 0.35  # N(0, 1) centroids


def test_non_finite_metrics_stop_the_run_with_a_message():
    finite.check_finite(3, {"loss": np.float32(0.5)})
    with pytest.raises(FloatingPointError, match="non-finite metrics at step 7.*loss_depth"):
        finite.check_finite(7, {"loss": np.float32(0.5), "loss_depth": np.float32(np.nan)})


@pytest.mark.slow
@pytest.mark.parametrize("variant, res", [("v2-mu/14", 56), ("v3-mu/16", 64)])
def test_dinov2_and_dinov3_backbones_train_export_and_segment(tmp_path, variant, res):
    from PIL import Image

    from depthg_jax import segment
    from depthg_jax.runtime import checkpoint

    config = tiny_config(
        **{
            "model.variant": variant,
            "data.train_res": res,
            "data.eval_res": res,
            "train.num_steps": 2,
            "train.eval_every": 2,
        }
    )
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert results["step"] == 2 and 0.0 <= results["trained"]["val/cluster_miou"] <= 1.0
    cfg, params = checkpoint.load_export(str(tmp_path / "export"))
    assert cfg.model.variant == variant
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((30, 50, 3), 90, np.uint8)).save(photos / "a.png")
    written, errors = segment.segment_folder(
        str(tmp_path / "export"), str(photos), str(tmp_path / "seg"), res=res, progress=False
    )
    assert written == 1 and not errors


@pytest.mark.slow
def test_export_best_without_a_validated_checkpoint_says_so(tmp_path):
    from depthg_jax.training import exports

    trainer.train_and_evaluate(tiny_config(**{"train.num_steps": 2}), str(tmp_path))
    assert not (tmp_path / "export_best").exists()  # nothing validated in training
    with pytest.raises(FileNotFoundError, match="no validated checkpoint to pick the best from"):
        exports.export_run(str(tmp_path), str(tmp_path / "best"), best=True)
    assert exports.export_run(str(tmp_path), str(tmp_path / "latest"))["step"] == 2
