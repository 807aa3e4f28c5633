"""Training: train state, optimiser, the DepthG loss, the jitted data-parallel step, the loop.

The step is one jitted program over a 1-D mesh ('data',): the global batch is sharded over
every device of every host, everything else is replicated, and means are over the global
batch, so results do not depend on the number of devices. The frozen backbone is a separate
replicated argument: never optimised, never checkpointed. (`train.parallelism="pmap"` runs
the same step under `jax.pmap`, see `make_pmap_train_step`.)
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthg_jax import (
    baselines,
    checkpoint,
    distributed,
    evaluate,
    losses,
    reports,
    sampling,
    schedules,
    seeds,
    setup_data,
    sharding,
    summaries,
    xla,
)
from depthg_jax import config as config_lib
from depthg_jax import workdir as workdir_lib
from depthg_jax.data import pipeline
from depthg_jax.image_ops import normalize_images
from depthg_jax.metric_writer import MetricWriter
from depthg_jax.models import head as head_lib
from depthg_jax.models import model as model_lib
from depthg_jax.preemption import Preemption


@flax.struct.dataclass
class TrainState:
    """Everything training changes: the step (batches done), trainable params, optimiser state."""

    step: jax.Array
    params: dict  # {"head", "cluster_probe", "linear_probe"}
    opt_state: optax.OptState


# --------------------------------------------------------------------------------------
# State and optimiser
# --------------------------------------------------------------------------------------


def hparams(config: ml_collections.ConfigDict) -> dict:
    """The per-member hyperparameters of a config as float32 scalars (a pytree).

    The loss and the optimiser read these rather than the config's Python floats, so a single
    run and each member of a population (depthg_jax.population, where every leaf gains a
    member axis) share one code path. Keys: config_lib.HPARAM_FIELDS.
    """
    out = {}
    for name, field in config_lib.HPARAM_FIELDS.items():
        section, leaf = field.split(".")
        out[name] = jnp.float32(config[section][leaf])
    return out


def make_optimizer(
    config: ml_collections.ConfigDict, hp: dict | None = None
) -> optax.GradientTransformation:
    """Adam with PyTorch defaults: the head at lr, each probe at probe_lr (docs/method.md).

    The learning rates come from `hp` (default `hparams(config)`); they may be traced.
    """
    hp = hparams(config) if hp is None else hp
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


def backbone_features(
    backbone_params: dict, batch: dict, *, model: model_lib.Model
) -> tuple[jax.Array, jax.Array]:
    """Frozen features of anchors and positives, one backbone pass, float32, no gradient."""
    n = batch["image"].shape[0]
    images = normalize_images(jnp.concatenate([batch["image"], batch["image_pos"]]))
    with model.precision():
        feats = model.backbone.apply({"params": backbone_params}, images)
    feats = jax.lax.stop_gradient(feats.astype(jnp.float32))
    return feats[:n], feats[n:]


def sample_coords(
    batch: dict, grid_hw: tuple[int, int], keys: jax.Array, num_side: int, *, config, hp=None
) -> tuple[jax.Array, jax.Array]:
    """(coords1, coords2) of anchors and positives: depth-guided FPS or uniform random.

    With hp["fps"] (a population sweeping loss.sampling), both are drawn from the same keys
    and hp["fps"] > 0.5 picks FPS per member: both computations are shared by all members.
    """
    cl = config.loss
    n = batch["depth"].shape[0]
    if hp is not None and "fps" in hp:
        fps = sample_coords(batch, grid_hw, keys, num_side, config=_with_sampling(config, "fps"))
        rnd = sample_coords(
            batch, grid_hw, keys, num_side, config=_with_sampling(config, "random")
        )
        use_fps = hp["fps"] > 0.5
        return tuple(jnp.where(use_fps, f, r) for f, r in zip(fps, rnd, strict=True))
    if cl.sampling == "fps":
        # Anchors and positives in one batched FPS: one sequential loop instead of two.
        coords = sampling.depth_fps_coords(
            jnp.concatenate([batch["depth"], batch["depth_pos"]]),
            feature_hw=grid_hw,
            num_side=num_side,
            mode=config.objective,
            fov=cl.fov,
            far=cl.far,
        )
        return coords[:n], coords[n:]
    return (
        sampling.random_coords(keys[0], n, num_side),
        sampling.random_coords(keys[1], n, num_side),
    )


def _with_sampling(config: ml_collections.ConfigDict, sampling: str):
    out = ml_collections.ConfigDict(config.to_dict())
    out.loss.sampling = sampling
    return out


def loss_params(
    config: ml_collections.ConfigDict, depth_shift, hp: dict | None = None
) -> losses.LossParams:
    hp = hparams(config) if hp is None else hp
    return losses.LossParams(
        intra_shift=hp["intra_shift"],
        inter_shift=hp["inter_shift"],
        neg_shift=hp["neg_shift"],
        depth_shift=depth_shift,
        pointwise=config.loss.pointwise,
        depth_mode=config.objective,
        fov=config.loss.fov,
        far=config.loss.far,
        depth_positive=config.loss.depth_positive,
    )


def depth_schedule_at(step: jax.Array, config: ml_collections.ConfigDict, hp=None):
    """(λ_d, b_d) for the batch at `step` (docs/release.md#schedules)."""
    cl = config.loss
    hp = hparams(config) if hp is None else hp
    return schedules.depth_schedule(
        step,
        hp["depth_weight"],
        hp["depth_shift"],
        cl.depth_decay_every,
        hp["depth_decay_rate"],
        mode=config.objective,
    )


def losses_from_features(
    params: dict,
    feats: jax.Array,
    feats_pos: jax.Array,
    batch: dict,
    key: jax.Array,
    step: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    model: model_lib.Model,
    num_side: int,
    hp: dict | None = None,
) -> tuple[jax.Array, dict]:
    """Total DepthG loss of one global batch and its parts, given the frozen features.

    `hp`: the per-member hyperparameters (`hparams`; default: the config's own).
    """
    cl = config.loss
    hp = hparams(config) if hp is None else hp
    n = feats.shape[0]
    keys = jax.random.split(key, 7)
    with model.precision():
        code = model.head.apply(
            {"params": params["head"]}, feats, deterministic=False, rngs={"dropout": keys[0]}
        )
        code_pos = model.head.apply(
            {"params": params["head"]}, feats_pos, deterministic=False, rngs={"dropout": keys[1]}
        )
    # The third, independent dropout mask acts on the features entering the correlations.
    feats_d = head_lib.channel_dropout(keys[2], feats, config.model.dropout)
    feats_pos_d = head_lib.channel_dropout(keys[3], feats_pos, config.model.dropout)
    coords1, coords2 = sample_coords(
        batch, feats.shape[1:3], keys[4:6], num_side, config=config, hp=hp
    )
    perms = sampling.negative_permutations(keys[6], cl.neg_samples, n)
    depth_weight, depth_shift = depth_schedule_at(step, config, hp)
    terms = losses.loss_terms(
        feats_d,
        feats_pos_d,
        code,
        code_pos,
        batch["depth"],
        batch["depth_pos"],
        coords1,
        coords2,
        perms,
        loss_params(config, depth_shift, hp),
    )
    probe = probe_losses(params, code, batch["label"], model=model)
    total = (
        hp["intra_weight"] * terms["intra"]
        + hp["inter_weight"] * terms["inter"]
        + hp["neg_weight"] * terms["neg"]
        + depth_weight * terms["depth"]
        + probe["loss_linear"]
        + probe["loss_cluster"]
    )
    metrics = {
        "loss": total,
        "loss_intra": terms["intra"],
        "loss_inter": terms["inter"],
        "loss_neg": terms["neg"],
        "loss_depth": terms["depth"],
        **probe,
        "depth_weight": depth_weight,
        "depth_shift": depth_shift,
    }
    return total, metrics


def probe_losses(params: dict, code: jax.Array, labels: jax.Array, *, model) -> dict:
    """Cluster and linear probe losses on the detached code (they never train the head)."""
    detached = jax.lax.stop_gradient(code)
    inner = model.cluster_probe.apply({"params": params["cluster_probe"]}, detached)
    logits = model.linear_probe.apply({"params": params["linear_probe"]}, detached)
    return {
        "loss_cluster": losses.cluster_probe_loss(inner),
        "loss_linear": losses.linear_probe_loss(logits, labels),
    }


def compute_losses(
    params: dict,
    backbone_params: dict,
    batch: dict,
    key: jax.Array,
    step: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    model: model_lib.Model,
    num_side: int,
) -> tuple[jax.Array, dict]:
    """Total DepthG loss of one global batch and its parts (docs/method.md)."""
    feats, feats_pos = backbone_features(backbone_params, batch, model=model)
    return losses_from_features(
        params, feats, feats_pos, batch, key, step, config=config, model=model, num_side=num_side
    )


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
    grad_fn = jax.value_and_grad(compute_losses, has_aux=True)
    (_, metrics), grads = grad_fn(
        state.params,
        backbone_params,
        batch,
        key,
        state.step,
        config=config,
        model=model,
        num_side=num_side,
    )
    new_state, metrics["grad_norm"] = apply_gradients(state, grads, config)
    metrics["num_samples"] = jnp.asarray(num_side, jnp.int32)
    metrics["finite"] = all_finite(metrics, new_state)
    return new_state, metrics


def all_finite(metrics: dict, state: TrainState) -> jax.Array:
    """One on-device bool: every metric (loss, grad norm...) and every state leaf is finite."""
    leaves = jax.tree.leaves((metrics, state.params, state.opt_state))
    flags = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags))


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
        local = backbone_features(backbone_params, local_batch, model=model)
        feats, feats_pos = (jax.lax.all_gather(f, axis, tiled=True) for f in local)
        batch = jax.tree.map(lambda x: jax.lax.all_gather(x, axis, tiled=True), local_batch)
        grad_fn = jax.value_and_grad(losses_from_features, has_aux=True)
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
        )
        grads = jax.lax.pmean(grads, axis)
        new_state, metrics["grad_norm"] = apply_gradients(state, grads, config)
        metrics["num_samples"] = jnp.asarray(num_side, jnp.int32)
        metrics["finite"] = all_finite(metrics, new_state)
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


def samples_at(config: ml_collections.ConfigDict, step: int) -> int:
    """S for the batch at `step` (host side; the step is recompiled once per distinct S)."""
    return schedules.num_samples_at(
        step,
        config.loss.feature_samples,
        config.loss.samples_decay_every,
        config.loss.samples_decay_rate,
        mode=config.objective,
    )


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def require_finite_steps(config, pending: list[tuple[int, dict]]) -> None:
    """Fetches the on-device finite flags of the steps run since the last check, in one
    transfer, and clears `pending`; the first non-finite step raises (before anything of it
    can be checkpointed), naming the step (1-based) and the batch's example ids.

    Checked before every save, log and stop rather than every step, so the host does not wait
    for each step to finish (a NaN stays in the state: no later state is finite either).
    """
    flags = jax.device_get([metrics["finite"] for _, metrics in pending])
    bad_steps = [item for item, ok in zip(pending, flags, strict=True) if not ok]
    pending.clear()
    if bad_steps:
        require_finite_step(config, *bad_steps[0])


def require_finite_step(config, step: int, metrics: dict) -> None:
    """Fetches the step's on-device finite flag (one bool); a non-finite step raises before it
    can be checkpointed, naming the step (1-based) and the batch's example ids."""
    if bool(jax.device_get(metrics.get("finite", True))):
        return
    fetched = jax.device_get({k: v for k, v in metrics.items() if k != "finite"})
    values = {k: float(np.asarray(v)) for k, v in fetched.items() if np.ndim(v) == 0}
    bad = sorted(k for k, v in values.items() if not np.isfinite(v)) or ["the train state"]
    ids = _batch_example_ids(config, step - 1)
    where = f"; the batch's examples (anchor/positive): {ids}" if ids else ""
    raise FloatingPointError(
        f"non-finite values at step {step} in {bad}{where}; stopping before this state is "
        "checkpointed (lower the lr or check those examples' files)"
    )


def _batch_example_ids(config, batch_index: int) -> list[str]:
    """The (anchor/positive) ids of global batch `batch_index` (error path; [] if unknown)."""
    try:
        from depthg_jax.data import knn, streams

        source = pipeline.make_source(config.data, config.data.train_split)
        neighbors = knn.load_knn_table(pipeline.knn_path(config.data), source.ids)
        stream = streams.TrainStream(
            source, neighbors, res=config.data.train_res, num_neighbors=config.data.num_neighbors,
            seed=config.seed, global_batch_size=config.train.batch_size, process_index=0,
            process_count=1,
        )  # fmt: skip
        ids = source.ids
        g0 = batch_index * config.train.batch_size
        pairs = (stream.indices(g) for g in range(g0, g0 + config.train.batch_size))
        return [f"{ids[a]}/{ids[p]}" for a, p in pairs]
    except Exception:  # noqa: BLE001 - prepared records, or the table moved: no ids to add
        return []


def check_eval_split(config: ml_collections.ConfigDict) -> None:
    """Refuses at start an evaluation split that is missing, empty or has no labels."""
    data = config_lib.eval_data(config)
    try:
        source = pipeline.make_source(data, data.eval_split, role="eval")
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(
            f"the evaluation split {data.eval_split!r} of {data.name} at "
            f"{data.root or data.data_dir} cannot be read: {e}"
        ) from e
    records = getattr(source, "records", None)
    if records is not None and not any(getattr(r, "label", None) for r in records):
        raise ValueError(
            f"the evaluation split {data.eval_split!r} of {data.name} at {data.root} has no "
            f"labels ({len(records)} images): validation needs labelled images"
        )


def check_finite(step: int, metrics: dict) -> None:
    bad = {k: v for k, v in metrics.items() if not np.all(np.isfinite(v))}
    if bad:
        raise FloatingPointError(
            f"non-finite metrics at step {step}: {bad}; stopping (lower the lr or check the data)"
        )


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))


class _Validator:
    """In-training validation on the evaluation split (no flip, no CRF), and its data."""

    def __init__(self, config, backbone_params, mesh):
        self.config = config
        self.backbone_params = backbone_params
        self.mesh = mesh
        self.eval_data = config_lib.eval_data(config)
        self.depth_cast = config_lib.release_depth_cast(config, self.eval_data.name)

    def loader(self, max_batches: int):
        return pipeline.make_eval_loader(
            self.eval_data,
            global_batch_size=self.config.eval.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            max_batches=max_batches,
            release_depth_cast=self.depth_cast,
        )

    def __call__(self, trainable: dict) -> dict:
        return evaluate.evaluate_loader(
            model_lib.full_params(self.backbone_params, trainable),
            self.config.model,
            self.config.data.n_classes,
            self.loader(self.config.train.eval_batches),
            flip=False,
            crf=False,
            mesh=self.mesh,
            progress=False,
        )


def _train_examples(config: ml_collections.ConfigDict) -> int:
    return len(pipeline.make_source(config.data, config.data.train_split))


@dataclasses.dataclass
class Run:
    """A started training run: everything the loop needs, set up the same way for a single
    head and for a population (`start_run`)."""

    config: ml_collections.ConfigDict  # resolved
    workdir: str
    mesh: Any
    model: model_lib.Model
    backbone_params: dict  # replicated on the mesh
    k_step: jax.Array
    manager: Any
    loader: Any
    validate: _Validator
    eval_every: int
    state: Any  # restored, or freshly initialised
    initial_params: dict  # host copy of the initial trainable params (baselines)
    finished: dict | None  # results.json of a run that already ended, else None


@dataclasses.dataclass(frozen=True)
class Reporting:
    """How the loop turns a run's outputs into logged scalars (a population: per member)."""

    log_scalars: Callable[[dict], dict] = lambda fetched: fetched
    # -> scalars written and attached to the checkpoint (must hold train.best_metric)
    val_scalars: Callable[[Any], dict] = reports.val_summary
    format_val: Callable[[int, Any], str] = reports.format_val
    picture_grids: bool = True  # train.image_every summaries (a single head's predictions)


def start_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    init_state: Callable[[model_lib.Model, jax.Array], Any],
    validator: type[_Validator] = _Validator,
) -> Run:
    """Guards the workdir, builds model and data, restores the latest intact checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.guard_resume(config, workdir)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")

    model = model_lib.build_model(config.model, config.data.n_classes)
    k_backbone, k_state, k_step = seeds.run_keys(config.seed)
    backbone_params = model_lib.init_backbone(config.model, k_backbone)
    setup_data.prepare_data(config)
    check_eval_split(config)
    write_config(config, workdir)
    backbone_params = sharding.replicate(backbone_params, mesh)

    state = sharding.replicate(init_state(model, k_state), mesh)
    initial_params = jax.device_get(state.params)  # host copy: the step donates `state`
    manager = checkpoint.make_manager(
        os.path.join(workdir, "checkpoints"),
        keep=config.train.keep_checkpoints,
        save_every=config.train.checkpoint_every,
        best_metric=config.train.best_metric,
    )
    loader = pipeline.make_train_loader(
        config.data,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        release_depth_cast=config_lib.release_depth_cast(config, config.data.name),
    )
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = checkpoint.restore_train_state(manager, abstract_state, set_aside=True)
    if restored is not None:
        state, data_state, start = restored
        loader.set_state(data_state)
        print(f"Resumed from {workdir}/checkpoints at step {start}", flush=True)
    resumed_at = restored[2] if restored is not None else 0
    if jax.process_index() == 0:
        workdir_lib.truncate_metrics(workdir, resumed_at)
    finished = workdir_lib.finished_results(workdir, resumed_at, config.train.num_steps)
    eval_every = config_lib.validation_interval(config, _train_examples(config))
    if eval_every != config.train.eval_every:
        print(
            f"Validating every {eval_every} batches (each epoch's end): "
            f"train.eval_every={config.train.eval_every} exceeds a quarter epoch",
            flush=True,
        )
    return Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        model=model,
        backbone_params=backbone_params,
        k_step=k_step,
        manager=manager,
        loader=loader,
        validate=validator(config, backbone_params, mesh),
        eval_every=eval_every,
        state=state,
        initial_params=initial_params,
        finished=finished,
    )


def finish_training(run: Run, outcome: dict):
    """Saves the final state and returns (state, its validation): the last in-loop one if it
    was of the final step, else a fresh one."""
    state, final = outcome["state"], outcome["last_val"]
    final_step = int(jax.device_get(state.step))
    checkpoint.finish(run.manager)
    if final_step not in run.manager.all_steps():
        checkpoint.save_train_state(
            run.manager, final_step, state, outcome["data_state"], force=True
        )
    checkpoint.finish(run.manager)
    if final is None or outcome["last_val_step"] != final_step:
        final = run.validate(state.params)
    return state, final


@workdir_lib.exclusive
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains DepthG as configured, evaluates, exports; resumes from `workdir` if it has a run."""
    workdir = os.path.abspath(workdir)
    config = config_lib.resolve(config, workdir)
    if config.sweep.grid or config.sweep.random or config.sweep.members:
        raise ValueError(
            "config.sweep names a population: train it with depthg_jax.population."
            "train_and_evaluate (python -m depthg_jax.main does)"
        )
    run = start_run(
        config, workdir, init_state=lambda model, key: create_train_state(config, model, key)
    )
    if run.finished is not None:
        print(f"{workdir} already finished: results.json kept", flush=True)
        return run.finished
    writer = MetricWriter(workdir)
    outcome = run_loop(run, make_train_step(config, run.model, run.mesh), writer, Reporting())
    if "preempted_at" in outcome:
        writer.close()
        return {"preempted_at": outcome["preempted_at"]}
    state, final = finish_training(run, outcome)
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


def run_loop(run: Run, step_fn, writer: MetricWriter, reporting: Reporting) -> dict:
    """Runs the steps from state.step to num_steps; returns the final state and last validation,
    or {"preempted_at": step} after a SIGTERM/SIGINT (a checkpoint of that step is saved).

    step_fn(state, backbone_params, batch, key, num_side=S) -> (state, metrics with "finite").
    """
    config, manager, eval_every, state = run.config, run.manager, run.eval_every, run.state
    prefetch = pipeline.Prefetcher(run.loader, run.mesh, size=config.data.prefetch)
    start = int(jax.device_get(state.step))
    num_steps = config.train.num_steps
    data_state = run.loader.get_state()
    last_val: dict | None = None
    last_val_step = -1
    progress = _progress(start, num_steps)
    t_last, steps_since = time.perf_counter(), 0
    try:
        with Preemption() as preemption:
            if distributed.any_process(preemption.requested):
                progress.write(f"{preemption.signal_name} before step {start + 1}: "
                               "nothing new to save; exiting")  # fmt: skip
                return {"preempted_at": start}
            pending: list[tuple[int, dict]] = []  # (step, metrics) not yet checked finite
            for step in range(start, num_steps):
                batch, data_state = next(prefetch)
                state, metrics = step_fn(
                    state, run.backbone_params, batch, run.k_step, num_side=samples_at(config, step)
                )
                steps_since += 1
                done = step + 1
                pending.append((done, metrics))
                progress.update(1)
                logging_step = done % config.train.log_every == 0 or done == num_steps
                validating = bool(eval_every and done % eval_every == 0)
                if logging_step or validating or manager.should_save(done):
                    require_finite_steps(config, pending)
                if logging_step:
                    fetched = jax.device_get(metrics)
                    fetched.pop("finite", None)
                    scalars = reporting.log_scalars(fetched)
                    check_finite(done, scalars)
                    rate = steps_since / (time.perf_counter() - t_last)
                    scalars["steps_per_s"] = rate
                    scalars["images_per_s"] = rate * config.train.batch_size
                    t_last, steps_since = time.perf_counter(), 0
                    writer.write(done, scalars)
                    postfix = {"img_s": f"{scalars['images_per_s']:.1f}"}
                    if "loss" in scalars:
                        postfix["loss"] = f"{scalars['loss']:.4f}"
                    progress.set_postfix(**postfix)
                val_metrics = None
                if validating:
                    last_val, last_val_step = run.validate(state.params), done
                    val_metrics = reporting.val_scalars(last_val)
                    writer.write(done, val_metrics)
                    progress.write(reporting.format_val(done, last_val))
                pictures = reporting.picture_grids and config.train.image_every
                if pictures and done % config.train.image_every == 0:
                    summaries.write_image_summary(
                        run.workdir,
                        done,
                        model_lib.full_params(run.backbone_params, state.params),
                        config,
                        run.validate.loader(1),
                        last_val,
                    )
                # Every validated step is saved, so the best checkpoint is one the release
                # would have kept (docs/release.md#checkpoint-choice).
                checkpoint.save_train_state(
                    manager, done, state, data_state, metrics=val_metrics,
                    force=val_metrics is not None,
                )  # fmt: skip
                check_now = jax.process_count() == 1 or done % config.train.log_every == 0
                if check_now and distributed.any_process(preemption.requested):
                    require_finite_steps(config, pending)
                    checkpoint.finish(manager)
                    if done not in manager.all_steps():
                        checkpoint.save_train_state(manager, done, state, data_state, force=True)
                        checkpoint.finish(manager)
                    progress.write(
                        f"{preemption.signal_name}: saved a checkpoint at step {done}; exiting"
                    )
                    return {"preempted_at": done}
    except BaseException:
        checkpoint.abandon_in_flight(manager)  # finished or removed, never half-written
        raise
    finally:
        prefetch.close()
        progress.close()
    return {
        "state": state,
        "data_state": data_state,
        "last_val": last_val,
        "last_val_step": last_val_step,
    }


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


def _progress(start: int, total: int):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
