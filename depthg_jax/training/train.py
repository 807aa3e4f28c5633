"""Training a head: train state, optimiser, the jitted data-parallel step, the driver.

The step is one jitted program over a 1-D mesh ('data',): the global batch is sharded over
every device of every host, everything else is replicated, and means are over the global
batch, so results do not depend on the number of devices. The frozen backbone is a separate
replicated argument: never optimised, never checkpointed. (`train.parallelism="pmap"` runs
the same step under `jax.pmap`, see `make_pmap_train_step`.)
"""

from __future__ import annotations

import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthg_jax import config as config_lib
from depthg_jax.evaluation import baselines, reports
from depthg_jax.method import objective
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import checkpoint, distributed, sharding, xla
from depthg_jax.runtime.metric_writer import MetricWriter
from depthg_jax.training import finite, loop, summaries
from depthg_jax.training import workdir as workdir_lib


@flax.struct.dataclass
class TrainState:
    """Everything training changes: the step (batches done), trainable params, optimiser state."""

    step: jax.Array
    params: dict  # {"head", "cluster_probe", "linear_probe"}
    opt_state: optax.OptState


# --------------------------------------------------------------------------------------
# State and optimiser
# --------------------------------------------------------------------------------------


def make_optimizer(
    config: ml_collections.ConfigDict, hp: dict | None = None
) -> optax.GradientTransformation:
    """Adam with PyTorch defaults: the head at lr, each probe at probe_lr (docs/method.md).

    The learning rates come from `hp` (default `objective.hparams(config)`); they may be traced.
    """
    hp = objective.hparams(config) if hp is None else hp
    return optax.multi_transform(
        {"head": optax.adam(hp["lr"]), "probe": optax.adam(hp["probe_lr"])},
        _param_groups,
    )


def _param_groups(params: dict) -> dict:
    group = {"head": "head", "cluster_probe": "probe", "linear_probe": "probe"}
    return {name: jax.tree.map(lambda _, g=group[name]: g, sub) for name, sub in params.items()}


def create_train_state(
    config: ml_collections.ConfigDict, model: model_lib.Model, key: jax.Array
) -> TrainState:
    params = model_lib.init_trainable(model, key)
    opt_state = make_optimizer(config).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------


def apply_gradients(
    state: TrainState, grads: dict, config, hp: dict | None = None
) -> tuple[TrainState, jax.Array]:
    updates, opt_state = make_optimizer(config, hp).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, optax.tree.norm(grads)


def update_from_features(
    state: TrainState,
    feats: jax.Array,
    feats_pos: jax.Array,
    batch: dict,
    key: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    model: model_lib.Model,
    num_side: int,
    hp: dict | None = None,
    reduce_grads=lambda grads: grads,
) -> tuple[TrainState, dict]:
    """Loss, gradient and Adam update given the batch's frozen features: the part of a step
    that the jit, pmap and population steps share (pmap passes its gradient mean)."""
    grad_fn = jax.value_and_grad(objective.losses_from_features, has_aux=True)
    (_, metrics), grads = grad_fn(
        state.params,
        feats,
        feats_pos,
        batch,
        key,
        state.step,
        config=config,
        model=model,
        num_side=num_side,
        hp=hp,
    )
    new_state, metrics["grad_norm"] = apply_gradients(state, reduce_grads(grads), config, hp)
    metrics["num_samples"] = jnp.asarray(num_side, jnp.int32)
    return new_state, metrics


def train_step(
    state: TrainState,
    backbone_params: dict,
    batch: dict,
    root_key: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    model: model_lib.Model,
    num_side: int,
) -> tuple[TrainState, dict]:
    """One optimiser update on one global batch. RNG is fold_in(root_key, step): resumable."""
    key = jax.random.fold_in(root_key, state.step)
    feats, feats_pos = objective.backbone_features(backbone_params, batch, model=model)
    new_state, metrics = update_from_features(
        state, feats, feats_pos, batch, key, config=config, model=model, num_side=num_side
    )
    metrics["finite"] = finite.all_finite(metrics, new_state)
    return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, model: model_lib.Model, mesh):
    """The step as configured: one jit over the mesh (default) or `jax.pmap`."""
    if config.train.parallelism == "pmap":
        return make_pmap_train_step(config, model, mesh)
    return make_jit_train_step(config, model, mesh)


def make_jit_train_step(config: ml_collections.ConfigDict, model: model_lib.Model, mesh):
    """The jitted step: state donated, outputs replicated; one compile per distinct S."""
    replicated = sharding.replicated(mesh)

    @xla.jit(static_argnames=("num_side",), donate_argnums=(0,))
    def step_fn(state, backbone_params, batch, root_key, num_side):
        new_state, metrics = train_step(
            state, backbone_params, batch, root_key, config=config, model=model, num_side=num_side
        )
        new_state = jax.lax.with_sharding_constraint(new_state, replicated)
        metrics = jax.lax.with_sharding_constraint(metrics, replicated)
        return new_state, metrics

    return step_fn


def make_pmap_train_step(config: ml_collections.ConfigDict, model: model_lib.Model, mesh):
    """The same step under `jax.pmap` (single process), for comparison and old habits.

    Each device runs the backbone on its shard (the ~90% of the step), then the features and
    batch are all-gathered so the batch-global parts of the loss (negatives shuffled across
    the whole batch, the pointwise mean) see the global batch exactly as the jit step does;
    gradients are then averaged explicitly (`pmean`). Takes and returns the same global
    arrays as the jit step, so the loop does not care which one runs.
    """
    if jax.process_count() > 1:
        raise ValueError('train.parallelism="pmap" runs in single-process runs only; use "jit"')
    devices = list(mesh.devices.flat)
    n_dev = len(devices)
    axis = "batch"

    def device_step(state, backbone_params, local_batch, root_key, num_side):
        key = jax.random.fold_in(root_key, state.step)
        local = objective.backbone_features(backbone_params, local_batch, model=model)
        feats, feats_pos = (jax.lax.all_gather(f, axis, tiled=True) for f in local)
        batch = jax.tree.map(lambda x: jax.lax.all_gather(x, axis, tiled=True), local_batch)
        new_state, metrics = update_from_features(
            state, feats, feats_pos, batch, key, config=config, model=model,
            num_side=num_side, reduce_grads=lambda grads: jax.lax.pmean(grads, axis),
        )  # fmt: skip
        metrics["finite"] = finite.all_finite(metrics, new_state)
        return new_state, metrics

    compiled = {}

    def step_fn(state, backbone_params, batch, root_key, num_side):
        if num_side not in compiled:
            compiled[num_side] = jax.pmap(
                lambda s, b, x, k: device_step(s, b, x, k, num_side),
                axis_name=axis,
                in_axes=(None, None, 0, None),
                out_axes=None,
                devices=devices,
            )
        local = jax.tree.map(
            lambda x: np.asarray(x).reshape((n_dev, -1) + x.shape[1:]), batch
        )
        new_state, metrics = compiled[num_side](state, backbone_params, local, root_key)
        replicated = sharding.replicated(mesh)
        return jax.device_put((new_state, metrics), replicated)

    return step_fn


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


@workdir_lib.exclusive
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains DepthG as configured, evaluates, exports; resumes from `workdir` if it has a run."""
    workdir = os.path.abspath(workdir)
    config = config_lib.resolve(config, workdir)
    if config.sweep.grid or config.sweep.random or config.sweep.members:
        raise ValueError(
            "config.sweep names a population: train it with depthg_jax.training.population."
            "train_and_evaluate (python -m depthg_jax.main does)"
        )
    run = loop.start_run(
        config, workdir, init_state=lambda model, key: create_train_state(config, model, key)
    )
    if run.finished is not None:
        print(f"{workdir} already finished: results.json kept", flush=True)
        return run.finished
    writer = MetricWriter(workdir)
    step_fn = make_train_step(config, run.model, run.mesh)
    outcome = loop.run_loop(run, step_fn, writer, loop.Reporting())
    if "preempted_at" in outcome:
        writer.close()
        return {"preempted_at": outcome["preempted_at"]}
    state, final = loop.finish_training(run, outcome)
    final_step = int(jax.device_get(state.step))
    if outcome["last_val_step"] != final_step:
        print(reports.format_val(final_step, final), flush=True)
    backbone_params, mesh = run.backbone_params, run.mesh
    results = {"step": final_step, "trained": reports.val_summary(final)}
    if config.train.report_baselines:
        results.update(_baselines(config, run.validate, run.initial_params, backbone_params, mesh))
        print(reports.format_baselines(results), flush=True)
    summaries.write_image_summary(
        workdir,
        final_step,
        model_lib.full_params(backbone_params, state.params),
        config,
        run.validate.loader(1),
        final,
    )
    writer.write(final_step, results["trained"])
    writer.close()
    results["best"] = _export(config, workdir, state, backbone_params, run.manager, final)
    distributed.sync("export")
    if jax.process_index() == 0:
        for name in ("export", "export_best"):
            path = os.path.join(workdir, name)
            if os.path.isdir(path):
                print(reports.describe_checkpoint(path, checkpoint.load_selection(path)))
    return results


def _baselines(config, validate, initial_params, backbone_params, mesh) -> dict:
    """The untrained head's probe and k-means baselines (the demo's reference points)."""
    initial_params = sharding.replicate(initial_params, mesh)
    out = {"untrained_head": reports.val_summary(validate(initial_params))}
    initial = model_lib.full_params(backbone_params, initial_params)
    for name, embed, params in (
        ("kmeans_untrained_head", baselines.code_embedding(config.model), initial),
        ("kmeans_backbone", baselines.backbone_embedding(config.model), backbone_params),
    ):
        result = baselines.evaluate_kmeans(
            embed,
            params,
            config.data.n_classes,
            validate.loader(0),
            seed=config.seed,
            mesh=mesh,
        )
        out[name] = reports.val_summary(result)
    return out


def _export(config, workdir, state, backbone_params, manager, final) -> dict | None:
    """Writes export/ (the final head) and export_best/ (the best validated checkpoint, with
    its step and score); process 0 only. Returns the best checkpoint's selection record."""
    final_step = int(jax.device_get(state.step))
    best = checkpoint.best_selection(manager, config.train.best_metric)
    if jax.process_index() != 0:
        return best
    backbone = jax.device_get(backbone_params)
    final_selection = {
        "checkpoint": "final",
        "step": final_step,
        "metric": config.train.best_metric,
        "score": reports.val_summary(final).get(config.train.best_metric),
    }
    exports = [("export", jax.device_get(state.params), final_selection)]
    if best is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        best_state = checkpoint.restore_train_state(manager, abstract, best["step"])[0]
        exports.append(("export_best", jax.device_get(best_state.params), best))
    for name, trainable, selection in exports:
        checkpoint.replace_export(
            os.path.join(workdir, name),
            config,
            model_lib.full_params(backbone, trainable),
            selection=selection,
        )
    results = {"step": final_step, "trained": reports.val_summary(final), "best": best}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        import json

        json.dump(results, f, indent=2)
    return best


