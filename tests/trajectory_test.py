"""Golden trajectory: 14 batches of reference-mode training, ours against the released step.

Both sides start from the same random tiny models ("mu/8" backbone, our initial head and
probes copied into torch) and see the same batches and negatives; dropout is 0 so the
runs are deterministic. The torch side is `bench/torch_reference_step.py`, our PyTorch
statement of the released training step with its decay block (intervals in the release's
units, global_step = 3 x batch). Depth decays every 4 batches (N = 12) and S every 5
(N = 15), so both schedules fire inside the run, the sample count at batch 0 too.
"""

import importlib.util
import os

import jax
import numpy as np
import pytest

from depthg_jax import config as base
from depthg_jax.method import objective as objective_lib
from depthg_jax.method import sampling
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import seeds, sharding
from depthg_jax.training import step as step_lib

pytestmark = pytest.mark.slow  # trains, or runs several processes

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
NUM_BATCHES = 14
BATCH, RES, N_CLASSES = 4, 48, 5


def _torch_reference():
    spec = importlib.util.spec_from_file_location(
        "torch_reference_step", os.path.join(BENCH, "torch_reference_step.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_ours(config, batches):
    """THE adapter to depthg_jax.training.train: trains on `batches` on a 1-device mesh.

    Returns the backbone and initial trainable params (host numpy), the final trainable
    params, and per batch the total loss, the S and depth weight λ_d used and the
    negatives our step drew (recomputed with depthg_jax.method.sampling from the step's own key,
    as the step does).
    """
    mesh = sharding.make_mesh(jax.devices()[:1])
    spec = model_lib.ModelSpec.from_config(config)
    objective = objective_lib.Objective.from_config(config)
    hp = objective_lib.hparams(config)
    k_backbone, k_state, k_step = seeds.run_keys(config.seed)
    backbone = model_lib.init_backbone(config.model, k_backbone)
    state = step_lib.create_train_state(spec, hp, k_state)
    initial = jax.device_get(state.params)
    backbone_dev = sharding.replicate(backbone, mesh)
    state = sharding.replicate(state, mesh)
    step_fn = step_lib.make_train_step("jit", spec, objective, mesh)
    out = {"loss": [], "num_side": [], "depth_weight": [], "perms": []}
    out["backbone"] = jax.device_get(backbone)
    for step, batch in enumerate(batches):
        num_side = objective.samples_at(step)
        # The step's key is fold_in(root, step); its 7th split draws the negatives.
        keys = jax.random.split(jax.random.fold_in(k_step, step), 7)
        out["perms"].append(
            np.asarray(sampling.negative_permutations(keys[6], config.loss.neg_samples, BATCH))
        )
        state, metrics = step_fn(
            state,
            backbone_dev,
            sharding.host_to_global(batch, mesh),
            k_step,
            hp,
            num_side=num_side,
        )
        metrics = jax.device_get(metrics)
        assert int(metrics["num_samples"]) == num_side
        out["loss"].append(float(metrics["loss"]))
        out["num_side"].append(num_side)
        out["depth_weight"].append(float(metrics["depth_weight"]))
    out["initial"] = initial
    out["final"] = jax.device_get(state.params)
    return out


def tiny_config(objective: str):
    config = base.get_config()
    config.objective = objective
    config.model.variant = "mu/8"
    config.model.allow_random_backbone = True
    config.model.dim = 16
    config.model.dropout = 0.0
    config.data.name = "synthetic"
    config.data.n_classes = N_CLASSES
    config.data.train_res = RES
    config.train.batch_size = BATCH
    loss = config.loss
    loss.sampling = "fps"
    loss.feature_samples = 5  # 25 of the 6 x 6 grid points
    loss.depth_decay_every, loss.depth_decay_rate = 4, 0.5
    loss.samples_decay_every, loss.samples_decay_rate = 5, 0.85  # S: 5 -> 4 -> 3 -> 2
    return config


def make_batches(num: int = NUM_BATCHES, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):

        def images():
            return rng.integers(0, 256, (BATCH, RES, RES, 3), dtype=np.uint8)

        def depth():
            return rng.uniform(1, 255, (BATCH, RES, RES)).astype(np.float32)

        def labels():
            return rng.integers(-1, N_CLASSES, (BATCH, RES, RES)).astype(np.int32)

        out.append(
            dict(
                image=images(),
                image_pos=images(),
                depth=depth(),
                depth_pos=depth(),
                label=labels(),
                label_pos=labels(),
            )
        )
    return out


def test_reference_trajectory_equals_the_released_step_with_its_decay_block():
    ref = _torch_reference()
    config = tiny_config("reference")
    batches = make_batches()
    ours = run_ours(config, batches)

    cl = config.loss
    torch_run = ref.TorchReferenceStep(
        variant=config.model.variant,
        dim=config.model.dim,
        n_classes=N_CLASSES,
        num_side=cl.feature_samples,
        dropout=0.0,
        loss=dict(
            intra=(cl.pos_intra_weight, cl.pos_intra_shift),
            inter=(cl.pos_inter_weight, cl.pos_inter_shift),
            neg=(cl.neg_inter_weight, cl.neg_inter_shift),
            depth=(cl.depth_weight, cl.depth_shift),
            neg_samples=cl.neg_samples,
            pointwise=cl.pointwise,
            decay_every_steps=12,  # the release's units: 3 x 4 batches
            depth_loss_decay_factor=cl.depth_decay_rate,
            fps_sample_decay_every_steps=15,  # 3 x 5 batches
            fps_sample_decay_factor=cl.samples_decay_rate,
            fps_min_samples=0,
        ),
    )
    torch_run.load_jax_params(ours["backbone"], ours["initial"])
    losses, sides, weights = [], [], []
    for batch, perms in zip(batches, ours["perms"], strict=True):
        sides.append(torch_run.num_side)
        weights.append(torch_run.depth_weight)
        losses.append(torch_run.step(batch, perms=perms))

    # The released timing, by hand: S decays after batches 0, 5, 10; λ_d after 4, 8, 12.
    assert sides == [5, 4, 4, 4, 4, 4, 3, 3, 3, 3, 3, 2, 2, 2]
    assert weights == pytest.approx([0.19] * 5 + [0.095] * 4 + [0.0475] * 4 + [0.02375])
    assert ours["num_side"] == sides
    np.testing.assert_allclose(ours["depth_weight"], weights, rtol=1e-6)
    np.testing.assert_allclose(ours["loss"], losses, rtol=1e-5)
    want = torch_run.head_params()
    for path, got in jax.tree_util.tree_leaves_with_path(ours["final"]):
        ref_leaf = want
        for key in path:
            ref_leaf = ref_leaf[key.key]
        np.testing.assert_allclose(got, ref_leaf, rtol=0, atol=1e-4, err_msg=str(path))
    # The run moved the head well beyond that tolerance.
    moved = np.abs(
        ours["final"]["head"]["linear"]["kernel"] - ours["initial"]["head"]["linear"]["kernel"]
    )
    assert moved.max() > 1e-3


def test_corrected_schedules_have_no_lag():
    # Corrected: the k-th decay is in effect from batch k·M, none at batch 0 (ours only).
    ours = run_ours(tiny_config("corrected"), make_batches(6))
    assert ours["num_side"] == [5, 5, 5, 5, 5, 4]
    np.testing.assert_allclose(ours["depth_weight"], [0.19] * 4 + [0.095] * 2, rtol=1e-6)
