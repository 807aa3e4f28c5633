"""The train step as a library: train state, optimiser, the jitted data-parallel step.

The step is one jitted program over the mesh ('data', 'model') (runtime/sharding.py): the
global batch is sharded over 'data', the frozen backbone's parameters over 'model' (as
models/partitioning.py places them; the program takes the shardings of its arguments), the
trainable state and hyperparameters are replicated, and means are over the global batch, so
results do not depend on the mesh. The frozen backbone is a separate argument: never
optimised, never checkpointed. (`train.parallelism="pmap"` runs the same step under
`jax.pmap` with mesh.model=1, see `make_pmap_train_step`.)

A program takes (state, backbone_params, batch, root_key, hp, num_side=S); `BoundStep` binds
the run's constants (backbone, key, hyperparameters, the S schedule) so the loop calls
`step(state, batch, step_index)` and knows nothing of the objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from depthg_jax.method import objective as objective_lib
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import sharding, xla
from depthg_jax.training import finite


@flax.struct.dataclass
class TrainState:
    """Everything training changes: the step (batches done), trainable params, optimiser state."""

    step: jax.Array
    params: dict  # {"head", "cluster_probe", "linear_probe"}
    opt_state: optax.OptState


def make_optimizer(hp: dict) -> optax.GradientTransformation:
    """Adam with PyTorch defaults: the head at hp["lr"], each probe at hp["probe_lr"]
    (docs/method.md). The rates may be traced (a population's per-member rates)."""
    return optax.multi_transform(
        {"head": optax.adam(hp["lr"]), "probe": optax.adam(hp["probe_lr"])},
        _param_groups,
    )


def _param_groups(params: dict) -> dict:
    group = {"head": "head", "cluster_probe": "probe", "linear_probe": "probe"}
    return {name: jax.tree.map(lambda _, g=group[name]: g, sub) for name, sub in params.items()}


def create_train_state(spec: model_lib.ModelSpec, hp: dict, key: jax.Array) -> TrainState:
    params = model_lib.init_trainable(spec, key)
    opt_state = make_optimizer(hp).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def apply_gradients(state: TrainState, grads: dict, hp: dict) -> tuple[TrainState, jax.Array]:
    updates, opt_state = make_optimizer(hp).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, optax.tree.norm(grads)


def update_from_features(
    state: TrainState,
    feats: jax.Array,
    feats_pos: jax.Array,
    batch: dict,
    key: jax.Array,
    hp: dict,
    *,
    spec: model_lib.ModelSpec,
    objective: objective_lib.Objective,
    num_side: int,
    reduce_grads=lambda grads: grads,
) -> tuple[TrainState, dict]:
    """Loss, gradient and Adam update given the batch's frozen features: the part of a step
    that the jit, pmap and population steps share (pmap passes its gradient mean)."""
    grad_fn = jax.value_and_grad(objective_lib.losses_from_features, has_aux=True)
    (_, metrics), grads = grad_fn(
        state.params, feats, feats_pos, batch, key, state.step,
        spec=spec, objective=objective, num_side=num_side, hp=hp,
    )  # fmt: skip
    new_state, metrics["grad_norm"] = apply_gradients(state, reduce_grads(grads), hp)
    metrics["num_samples"] = jnp.asarray(num_side, jnp.int32)
    return new_state, metrics


def train_step(
    state: TrainState,
    backbone_params: dict,
    batch: dict,
    root_key: jax.Array,
    hp: dict,
    *,
    spec: model_lib.ModelSpec,
    objective: objective_lib.Objective,
    num_side: int,
) -> tuple[TrainState, dict]:
    """One optimiser update on one global batch. RNG is fold_in(root_key, step): resumable."""
    key = jax.random.fold_in(root_key, state.step)
    feats, feats_pos = objective_lib.pair_features(spec, backbone_params, batch)
    return update_from_features(
        state, feats, feats_pos, batch, key, hp, spec=spec, objective=objective, num_side=num_side
    )


def make_train_step(parallelism: str, spec, objective, mesh):
    """The step program as configured: one jit over the mesh (default) or `jax.pmap`."""
    if parallelism == "pmap":
        return make_pmap_train_step(spec, objective, mesh)
    return make_jit_train_step(spec, objective, mesh)


def make_jit_train_step(spec, objective, mesh):
    """The jitted step: state donated, outputs replicated; one compile per distinct S."""
    return jit_program(train_step, spec, objective, mesh)


def jit_program(body, spec, objective, mesh):
    """A step body (train_step, a population's step) as one program over the mesh: state
    donated, the finite flag added, outputs replicated; one compile per distinct S."""
    replicated = sharding.replicated(mesh)

    @xla.jit(static_argnames=("num_side",), donate_argnums=(0,))
    def program(state, backbone_params, batch, root_key, hp, num_side):
        new_state, metrics = body(
            state, backbone_params, batch, root_key, hp,
            spec=spec, objective=objective, num_side=num_side,
        )  # fmt: skip
        metrics["finite"] = finite.all_finite(metrics, new_state)
        new_state = jax.lax.with_sharding_constraint(new_state, replicated)
        metrics = jax.lax.with_sharding_constraint(metrics, replicated)
        return new_state, metrics

    return program


def make_pmap_train_step(spec, objective, mesh):
    """The same step under `jax.pmap` (single process), for comparison and old habits.

    Each device runs the backbone on its shard (the ~90% of the step), then the features and
    batch are all-gathered so the batch-global parts of the loss (negatives shuffled across
    the whole batch, the pointwise mean) see the global batch exactly as the jit step does;
    gradients are then averaged explicitly (`pmean`). Takes and returns the same global
    arrays as the jit step, so the loop does not care which one runs.
    """
    if jax.process_count() > 1:
        raise ValueError('train.parallelism="pmap" runs in single-process runs only; use "jit"')
    if sharding.model_size(mesh) > 1:
        raise ValueError(
            'train.parallelism="pmap" replicates the backbone on every device: it runs with '
            'mesh.model=1 only; use "jit" to split the backbone over the mesh'
        )
    devices = list(mesh.devices.flat)
    n_dev = len(devices)
    axis = "batch"

    def device_step(state, backbone_params, local_batch, root_key, hp, num_side):
        key = jax.random.fold_in(root_key, state.step)
        local = objective_lib.pair_features(spec, backbone_params, local_batch)
        feats, feats_pos = (jax.lax.all_gather(f, axis, tiled=True) for f in local)
        batch = jax.tree.map(lambda x: jax.lax.all_gather(x, axis, tiled=True), local_batch)
        new_state, metrics = update_from_features(
            state, feats, feats_pos, batch, key, hp, spec=spec, objective=objective,
            num_side=num_side, reduce_grads=lambda grads: jax.lax.pmean(grads, axis),
        )  # fmt: skip
        metrics["finite"] = finite.all_finite(metrics, new_state)
        return new_state, metrics

    compiled = {}

    def step_fn(state, backbone_params, batch, root_key, hp, num_side):
        if num_side not in compiled:
            compiled[num_side] = jax.pmap(
                lambda s, b, x, k, h: device_step(s, b, x, k, h, num_side),
                axis_name=axis,
                in_axes=(None, None, 0, None, None),
                out_axes=None,
                devices=devices,
            )
        local = jax.tree.map(lambda x: np.asarray(x).reshape((n_dev, -1) + x.shape[1:]), batch)
        new_state, metrics = compiled[num_side](state, backbone_params, local, root_key, hp)
        return jax.device_put((new_state, metrics), sharding.replicated(mesh))

    return step_fn


@dataclasses.dataclass(frozen=True)
class BoundStep:
    """A step program with the run's constants bound: `step(state, batch, step_index)`.

    The S schedule is the objective's: the loop passes the batch's index and never needs to
    know which S it runs at (the program compiles once per distinct S).
    """

    program: Callable[..., tuple[Any, dict]]
    backbone_params: dict
    root_key: jax.Array
    hp: dict
    objective: objective_lib.Objective

    def __call__(self, state, batch: dict, step_index: int):
        return self.program(
            state,
            self.backbone_params,
            batch,
            self.root_key,
            self.hp,
            num_side=self.objective.samples_at(step_index),
        )


# --------------------------------------------------------------------------------------
# Populations: the same state with a leading member axis P on params and optimiser state
# --------------------------------------------------------------------------------------


def create_population_state(
    spec: model_lib.ModelSpec, hp: dict, key: jax.Array, num_members: int
) -> TrainState:
    """P copies of the single run's initial state (same init: paired comparisons)."""
    single = create_train_state(spec, hp, key)

    def stack(x):
        return jnp.broadcast_to(x, (num_members,) + x.shape)

    return TrainState(
        step=single.step,
        params=jax.tree.map(stack, single.params),
        opt_state=jax.tree.map(stack, single.opt_state),
    )


def member_params(params: dict, i: int) -> dict:
    """Member i's trainable params out of the population's."""
    return jax.tree.map(lambda x: x[i], params)
