"""Helpers shared by the tests (conftest.py exposes them as fixtures too): the demo config
shrunk to seconds, random batches, and a train step set up on a mesh."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from depthg_jax import config as config_lib
from depthg_jax.method import objective as objective_lib
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import sharding
from depthg_jax.training import step as step_lib

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(**overrides):
    """The demo config shrunk to seconds: 64-px synthetic scenes, S=3, a few steps."""
    config = config_lib.sibling_config(str(REPO_CONFIGS / "demo.py"), "demo")
    config.data.synthetic_train = 16
    config.data.synthetic_val = 8
    config.data.synthetic_size = 64
    config.data.train_res = 64
    config.data.eval_res = 64
    config.loss.feature_samples = 3
    config.loss.neg_samples = 2
    config.train.batch_size = 8
    config.train.num_steps = 4
    config.train.log_every = 2
    config.train.eval_every = 0
    config.train.image_every = 0
    config.train.checkpoint_every = 2
    config.train.report_baselines = False
    config.eval.batch_size = 8
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return config


def random_batch(config, seed=0):
    """A training batch of random images, depth and labels at the config's sizes."""
    return random_host_batch(
        config.train.batch_size, config.data.train_res, config.data.n_classes, seed
    )


def random_host_batch(b: int, r: int, n: int, seed: int = 0) -> dict:
    """b anchors and b positives: uint8 images, depth in [0, 255], labels in [-1, n)."""
    rng = np.random.default_rng(seed)

    def image():
        return rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8)

    def depth():
        return rng.uniform(0, 255, (b, r, r)).astype(np.float32)

    def label():
        return rng.integers(-1, n, (b, r, r)).astype(np.int32)

    return {
        "image": image(),
        "depth": depth(),
        "label": label(),
        "image_pos": image(),
        "depth_pos": depth(),
        "label_pos": label(),
    }


def setup(config, mesh):
    """(spec, replicated backbone, replicated state, step key, replicated hp) of a config."""
    spec = model_lib.ModelSpec.from_config(config)
    hp = objective_lib.hparams(config)
    k_backbone, k_state, k_step = jax.random.split(jax.random.key(0), 3)
    backbone = sharding.replicate(model_lib.init_backbone(config.model, k_backbone), mesh)
    state = sharding.replicate(step_lib.create_train_state(spec, hp, k_state), mesh)
    return spec, backbone, state, k_step, sharding.replicate(hp, mesh)


def setup_population(config, table, mesh):
    """(spec, replicated backbone, replicated population state, step key, replicated
    per-member hp, the jitted population step) of a sweep config's member table."""
    from depthg_jax.training import population

    spec = model_lib.ModelSpec.from_config(config)
    k_backbone, k_state, k_step = jax.random.split(jax.random.key(0), 3)
    backbone = sharding.replicate(model_lib.init_backbone(config.model, k_backbone), mesh)
    state = step_lib.create_population_state(
        spec, objective_lib.hparams(config), k_state, len(table)
    )
    hp = sharding.replicate(population.member_hparams(table), mesh)
    program = population.make_population_step(
        "jit", spec, population.shared_objective(config, table), mesh
    )
    return spec, backbone, sharding.replicate(state, mesh), k_step, hp, program


def make_program(config, mesh):
    spec = model_lib.ModelSpec.from_config(config)
    objective = objective_lib.Objective.from_config(config)
    return step_lib.make_train_step(config.train.parallelism, spec, objective, mesh)


def run_steps(config, devices, batches, num_side):
    """Params, losses and the program after one step per batch at S = num_side."""
    mesh = sharding.make_mesh(devices)
    _, backbone, state, k_step, hp = setup(config, mesh)
    program = make_program(config, mesh)
    losses = []
    for batch in batches:
        state, metrics = program(
            state, backbone, sharding.host_to_global(batch, mesh), k_step, hp, num_side=num_side
        )
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses, program


def synthetic_export(root, params, *, crf: bool = False) -> str:
    """`root/export`: params saved with the demo config on a generated 5-image synthetic
    validation split under `root/data` (48 px scenes, 32 px evaluation, batch 8)."""
    from depthg_jax.data import synthetic
    from depthg_jax.runtime import checkpoint

    config = config_lib.sibling_config(str(REPO_CONFIGS / "demo.py"), "demo")
    config.data.root = str(Path(root) / "data")
    config.data.synthetic_train, config.data.synthetic_val = 1, 5
    config.data.synthetic_size = 48
    config.data.eval_res = 32
    config.eval.batch_size = 8
    config.eval.crf = crf
    synthetic.generate_dataset(
        config.data.root, num_train=1, num_val=5, size=48, seed=config.data.synthetic_seed
    )
    checkpoint.save_export(str(Path(root) / "export"), config, params)
    return str(Path(root) / "export")


def numpy_fps(points: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """docs/method.md as a plain loop: running min squared distance, first index on ties."""
    nearest = np.full(len(points), np.inf, points.dtype)
    taken = np.zeros(len(points), bool)
    order = [start]
    taken[start] = True
    for _ in range(n - 1):
        d = ((points - points[order[-1]]) ** 2).sum(-1)
        nearest = np.minimum(nearest, d)
        pick = int(np.argmax(np.where(taken, -np.inf, nearest)))
        order.append(pick)
        taken[pick] = True
    return np.array(order)
